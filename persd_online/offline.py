"""The offline side of the paper's methods, in one process: a sandbox executor, the student, adapters, training.

The online loop runs these parts as Ray actors; the offline commands (`collect`, `train`, `eval`) run them
in the calling process with the same classes:
- `open_pool`, and `PoolExecutor` over its pool (defined in `executor.py`, beside the loop's `SandboxExecutor`): the
  `verify.Executor` seam over an in-process `sandbox.SandboxPool` (calls made in the same event-loop tick become
  one batch, run in a thread so the event loop stays free);
- `local_student`: a `student.Student` over the in-process vLLM engine, with the engine's environment set
  first (it must be in place before vLLM is imported);
- `resolve_adapter` / `load_adapter`: an adapter given as a published version directory (`.../vNNNN`) or as a
  directory holding `adapters/` (a run directory or a `train --out` directory), its newest version;
- `train_offline`: `trainer.LoraTrainer` fed from a list of examples for a number of epochs.

Offline training differs from the stream in two settings only: staleness does not apply (the data set is fixed
before training starts, so every example is "stale" after the first version), and replay is off (epochs
already repeat the data).
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from persd_online import adapters
from persd_online.config import Config, StudentConfig
from persd_online.executor import PoolExecutor as PoolExecutor  # the offline commands' executor
from persd_online.records import Example
from persd_online.tasks import Task

if TYPE_CHECKING:
    from persd_online.student import Student
    from sandbox.pool import SandboxPool

log = logging.getLogger(__name__)

OFFLINE_INFO = "offline.json"  # written by `train` into its --out directory: data, method, epochs, teacher


def open_pool(config: Config) -> SandboxPool:
    """A sandbox pool with the config's limits (close it, or use it as a context manager)."""
    from sandbox.pool import SandboxPool

    return SandboxPool(config.sandbox.workers, timeout=config.sandbox.timeout_s, memory_mb=config.sandbox.memory_mb,
                       pin_cpus=config.sandbox.pin_cpus)


def seen_task(task: Task) -> Task | None:
    """The task scored on its seen tests instead of its hidden ones (None: it has no seen tests)."""
    if task.seen_tests is None:
        return None
    return task.model_copy(update={"tests": task.seen_tests})


def local_student(config: StudentConfig, model_path: str | Path, work_dir: str | Path) -> Student:
    """The student with its engine in this process. Sets the engine's environment first: call it before
    anything imports vLLM (a script doing so needs an `if __name__ == "__main__":` guard)."""
    from persd_online.engine import engine_env

    for key, value in engine_env(config).items():
        os.environ.setdefault(key, value)
    from persd_online.student import Student

    return Student(config, model_path, work_dir)


def resolve_adapter(path: str | Path) -> tuple[int, Path]:
    """(version, directory) of a published adapter: `path` itself, or the newest version under `path/adapters`."""
    path = Path(path)
    if adapters.is_published(path):
        chosen = path
    else:
        versions = adapters.published_versions(path / "adapters")
        if not versions:
            raise FileNotFoundError(f"{path} is not a published adapter (no {adapters.MARKER} marker) and holds no "
                                    f"published versions under {path / 'adapters'}")
        chosen = adapters.version_dir(path / "adapters", versions[-1])
    meta = adapters.read_metadata(chosen)
    version = meta["version"] if meta is not None else int(chosen.name.lstrip("v") or 1)
    return max(int(version), 1), chosen


def load_adapter(student: Student, path: str | Path | None) -> int:
    """Serve the adapter at `path` on `student` (None: the base student); returns the version to ask for."""
    if path is None:
        return 0
    version, directory = resolve_adapter(path)
    student.load_adapter(version, directory)
    return version


def offline_info(adapter: str | Path | None) -> dict[str, Any] | None:
    """What `train` recorded about an adapter's data (method, examples, teacher), if it was trained offline."""
    if adapter is None:
        return None
    for directory in (Path(adapter), Path(adapter).parent.parent):
        info = directory / OFFLINE_INFO
        if info.is_file():
            return json.loads(info.read_text())
    return None


def read_examples(path: str | Path) -> list[Example]:
    """Examples from a JSONL file written by `collect` (one `Example` per line)."""
    examples = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if line.strip():
                try:
                    examples.append(Example.model_validate_json(line))
                except ValueError as exc:
                    raise ValueError(f"{path}:{number}: not an Example record: {exc}") from None
    return examples


def write_examples(path: str | Path, examples: Iterable[Example]) -> int:
    """Write examples as JSONL atomically; returns how many."""
    from persd_online import atomic

    lines = [e.model_dump_json() + "\n" for e in examples]
    atomic.write_text(Path(path), "".join(lines))
    return len(lines)


def train_offline(config: Config, model_path: str | Path, examples: list[Example], out: str | Path,
                  epochs: int = 1, info: dict[str, Any] | None = None) -> list[int]:
    """Train a LoRA adapter on `examples` for `epochs` epochs (shuffled each epoch, seeded), publishing versions
    under `out/adapters/` every `trainer.publish_every_steps` steps and at the end; returns the versions.

    Each epoch feeds the examples under epoch-tagged ids (`<id>#e<k>`): the trainer never trains one id twice.
    """
    from persd_online.trainer import LoraTrainer, setup_process

    if not examples:
        raise ValueError("no examples to train on")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    config = config.model_copy(update={
        "max_staleness": 1 << 30,
        "trainer": config.trainer.model_copy(update={"replay_fraction": 0.0}),
    })
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    setup_process(config.trainer)
    trainer = LoraTrainer(config, model_path, out)
    rng = random.Random(config.trainer.seed)
    versions: list[int] = []
    unpublished = 0
    for epoch in range(epochs):
        order = list(examples)
        rng.shuffle(order)
        tag = "" if epoch == 0 else f"#e{epoch}"
        trainer.add([e.model_copy(update={"example_id": e.example_id + tag}) for e in order])
        while trainer.examples.fresh:
            loss = trainer.train_step()
            if loss is None:
                continue
            unpublished += 1
            log.info("epoch %d step %d: loss %.4f", epoch + 1, trainer.stats.train_steps, loss)
            if trainer.publish_due():
                versions.append(trainer.publish().version)
                unpublished = 0
    if unpublished:
        versions.append(trainer.publish().version)
    from persd_online import atomic

    atomic.write_text(out / OFFLINE_INFO, json.dumps({
        **(info or {}), "epochs": epochs, "examples": len(examples), "train_steps": trainer.stats.train_steps,
        "duplicates_dropped": trainer.stats.duplicates_dropped, "versions": versions,
        "final_loss": trainer.stats.loss}, indent=1))
    return versions

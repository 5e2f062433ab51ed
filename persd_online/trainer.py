"""The streaming LoRA trainer: examples in, optimizer steps, adapter versions out.

`LoraTrainer` composes three parts: the learner (`learner.py`: the model with its LoRA adapter, the optimizer,
one optimizer step), the example buffer (`example_buffer.py`: fresh examples, replay, the staleness and
duplicate drops) and the checkpoints (`trainer_checkpoint.py`); it counts, and publishes the learner's
adapter as versions (`adapters.py`). `TrainerActor` runs it in a Ray actor that pulls from the loop's example
queue, after `setup_process` has set what is process-wide. The same `LoraTrainer` serves offline training from
a file (`persd-online train`).

Invariants:
- versions only go forward: version v+1 is published under `adapters/vNNNN` through `adapters.publish_version`
  (staging dir, fsync, rename, the marker last), so a reader never sees a half-written version, and an
  existing version is never overwritten, also after a resume; its metadata names the examples its steps took;
- optimizer, scheduler and RNG state persist across publishes (a version continues the previous one) and
  across checkpoints: a checkpoint holds the learner's state and the trainer's (version, counters, example
  buffer, steps not yet published), and a resumed trainer never publishes a step twice;
- process-wide settings (core pinning, torch threads, the global seed) are set once where a training process
  starts (`setup_process`), never by the parts.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch

from persd_online import adapters
from persd_online.config import Config, TrainerConfig
from persd_online.example_buffer import Draw, ExampleBuffer
from persd_online.learner import Learner, StepResult
from persd_online.records import AdapterVersion, Example
from persd_online.replay import ReplayBuffer
from persd_online.trainer_checkpoint import TrainerCheckpoints

log = logging.getLogger(__name__)

PULL_TIMEOUT_S = 0.5
RECENT_STEPS = 256  # steps whose intervals `report` returns: more than take place between two reads


def examples_per_step(config: TrainerConfig) -> int:
    """Examples in one optimizer step (fresh and replayed)."""
    return config.batch_examples * config.grad_accum_steps


def fresh_per_version(config: TrainerConfig) -> int:
    """Fresh examples one adapter version consumes once the replay buffer is warm (the staleness gate's unit)."""
    total = examples_per_step(config)
    return max(1, total - math.floor(total * config.replay_fraction)) * config.publish_every_steps


def pin_to_cores(cores: list[int] | None) -> set[int]:
    """Pin this process to those of `cores` that exist here; returns the cores pinned to (empty: none)."""
    if not cores or not hasattr(os, "sched_setaffinity"):
        return set()
    usable = set(cores) & os.sched_getaffinity(0)
    if not usable:
        log.warning("trainer.cpu_cores %s are not available here (%s); not pinning", cores,
                    sorted(os.sched_getaffinity(0)))
        return set()
    os.sched_setaffinity(0, usable)
    return usable


def setup_process(config: TrainerConfig) -> None:
    """Set what is process-wide for training: core pinning, torch's thread count, and the global torch seed
    (it fixes the LoRA initialisation). Call once where the training process starts, before `LoraTrainer`."""
    cores = pin_to_cores(config.cpu_cores)
    if config.torch_threads or cores:
        torch.set_num_threads(config.torch_threads or len(cores))
    torch.manual_seed(config.seed)


@dataclass
class TrainerStats:
    """Counters and last-step figures (what `stats()` reports and checkpoints keep)."""

    train_steps: int = 0
    examples_trained: int = 0
    replayed: int = 0
    stale_dropped: int = 0
    stale_replayed: int = 0
    duplicates_dropped: int = 0
    truncated: int = 0
    tokens_trained: int = 0
    busy_s: float = 0.0
    loss: float | None = None
    step_s: float | None = None
    train_tokens_per_s: float | None = None
    examples_per_s: float | None = None


@dataclass
class _Pending:
    """What the next published version will record."""

    example_ids: list[str] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    staleness_max: int = 0
    since: float = field(default_factory=time.monotonic)


class LoraTrainer:
    """A LoRA adapter over the student's base model, trained step by step on streamed examples.

    `root` is a run directory (or any directory): versions go to `root/adapters`, checkpoints to
    `root/checkpoints`. An existing checkpoint there is restored.
    """

    def __init__(self, config: Config, model_path: str | Path, root: str | Path) -> None:
        t = self.config = config.trainer
        self.max_staleness = config.max_staleness
        self.adapters_dir = Path(root) / "adapters"
        self.learner = Learner(t, model_path, config.student.prompt_format)
        self.examples = ExampleBuffer(examples_per_step(t), t.replay_fraction, config.max_staleness,
                                      ReplayBuffer(t.replay_capacity, t.max_reuse, t.seed),
                                      stale_to_replay=t.stale_labels == "replay")
        self.checkpoints = TrainerCheckpoints(Path(root) / "checkpoints")
        self.stats = TrainerStats()
        # the last steps' (start, end) in epoch seconds, for the loop's stage timeline (it reads every few s)
        self._recent_steps: deque[tuple[float, float]] = deque(maxlen=RECENT_STEPS)
        self.version = adapters.latest(self.adapters_dir)
        self._pending = _Pending()
        if self.restore():
            log.info("trainer resumed at step %d, version %d, %d examples trained",
                     self.stats.train_steps, self.version, self.stats.examples_trained)

    # --- examples in --------------------------------------------------------------------------------------
    def add(self, examples: list[Example]) -> None:
        """Queue fresh examples for the next steps."""
        self.examples.add(examples)

    def ready(self) -> bool:
        """Whether enough fresh examples wait for a full step."""
        return self.examples.ready()

    # --- one optimizer step -------------------------------------------------------------------------------
    def train_step(self) -> float | None:
        """One optimizer step on up to one step's worth of examples; None if no fresh example was usable."""
        draw = self.examples.draw(self.version)
        self.stats.stale_dropped += draw.stale_dropped
        self.stats.stale_replayed += draw.stale_replayed
        self.stats.duplicates_dropped += draw.duplicates_dropped
        if not draw.fresh:
            return None
        result = self.learner.step(draw.fresh + draw.replayed)
        self._account(draw, result)
        return result.loss

    def _account(self, draw: Draw, result: StepResult) -> None:
        s = self.stats
        s.train_steps += 1
        s.examples_trained += len(draw.fresh)
        s.replayed += len(draw.replayed)
        s.truncated += result.truncated
        s.tokens_trained += result.tokens
        s.busy_s += result.elapsed_s
        end = time.time()
        self._recent_steps.append((round(end - result.elapsed_s, 3), round(end, 3)))
        s.loss, s.step_s = result.loss, result.elapsed_s
        s.train_tokens_per_s, s.examples_per_s = result.tokens / result.elapsed_s, result.examples / result.elapsed_s
        self.examples.trained(draw.fresh)
        for example in draw.fresh:
            self._pending.example_ids.append(example.example_id)
            if example.adapter_version is not None:
                self._pending.staleness_max = max(self._pending.staleness_max,
                                                  self.version - example.adapter_version)
        self._pending.losses.append(result.loss)

    # --- versions out -------------------------------------------------------------------------------------
    def pending_steps(self) -> int:
        """Optimizer steps taken since the last published version."""
        return len(self._pending.losses)

    def publish_due(self) -> bool:
        """Whether the configured step count or interval since the last version has passed."""
        steps = self.pending_steps()
        every_s = self.config.publish_every_s
        return steps >= self.config.publish_every_steps or (
            steps > 0 and every_s is not None and time.monotonic() - self._pending.since >= every_s)

    def publish(self) -> AdapterVersion:
        """Write the current adapter as the next version, atomically, marker last."""
        version = self.version + 1
        pending = self._pending
        record = AdapterVersion(
            version=version, path=str(adapters.version_dir(self.adapters_dir, version)),
            step=self.stats.train_steps, examples_seen=self.stats.examples_trained,
            loss=sum(pending.losses) / len(pending.losses) if pending.losses else None,
            example_ids=pending.example_ids)
        meta = record.model_dump() | {"trained_on_version": self.version, "staleness_max": pending.staleness_max,
                                      "max_staleness": self.max_staleness, "created": time.time()}
        adapters.publish_version(self.adapters_dir, version, self.learner.save_adapter, meta)
        self.version = version
        self._pending = _Pending()
        log.info("published adapter v%d (step %d, %d examples, loss %s)", version, record.step,
                 record.examples_seen, f"{record.loss:.4f}" if record.loss is not None else "n/a")
        return record

    # --- checkpoints --------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Persist everything a resumed trainer needs; older checkpoints are removed once this one is named."""
        return self.checkpoints.save(self.learner, self.version, {
            "stats": vars(self.stats), **self.examples.state(), "pending": vars(self._pending) | {"since": None}})

    def restore(self) -> bool:
        """Load the latest checkpoint under `checkpoints/`, if any; True if one was loaded."""
        state = self.checkpoints.restore(self.learner)
        if state is None:
            return False
        # Never reuse a version number, also one published after this checkpoint was taken; the steps the
        # checkpoint had not yet published are then in that newer version already: do not publish them again.
        newer_published = self.version > state["version"]
        self.version = max(state["version"], self.version)
        self.stats = TrainerStats(**state["stats"])
        self.examples.load_state(state)
        pending = state["pending"]
        if newer_published:
            self._adopt_versions_after(state["version"])
        else:
            self._pending = _Pending(pending["example_ids"], pending["losses"], pending["staleness_max"])
        return True

    def _adopt_versions_after(self, checkpointed: int) -> None:
        """Versions published after the checkpoint hold the steps taken since it: continue from the newest one's
        weights and counters, and take the examples they trained out of the buffers. Trained again from the
        checkpoint, those examples would give the same weights again: a version with no effect, which the
        student refuses."""
        trained: set[str] = set()
        meta: dict[str, Any] = {}
        for version in adapters.published_versions(self.adapters_dir):
            if version > checkpointed:
                directory = adapters.version_dir(self.adapters_dir, version)
                read = adapters.read_metadata(directory)
                if read is None:
                    raise FileNotFoundError(f"published adapter {directory} has no {adapters.VERSION_FILE}")
                meta = read
                trained.update(meta["example_ids"])
        self.learner.load_adapter(adapters.version_dir(self.adapters_dir, self.version))
        self.stats.train_steps, self.stats.examples_trained = meta["step"], meta["examples_seen"]
        self.examples.adopt(trained)
        log.info("versions v%d..v%d were published after the checkpoint: continuing from v%d", checkpointed + 1,
                 self.version, self.version)

    def report(self) -> dict[str, Any]:
        """The counters and last-step figures, plus the version and buffer sizes."""
        return vars(self.stats) | {"version": self.version, "replay_size": len(self.examples.replay),
                                   "fresh_pending": len(self.examples.fresh), "ready": self.ready(),
                                   "recent_steps": list(self._recent_steps)}


class TrainerActor:
    """A `LoraTrainer` in a Ray actor; the loop gives it turns (`train`) and the examples come through a Ray queue.

    `train()` is one turn: pull what has arrived, step while a full step is ready, publish when due. The loop's
    trainer role calls it again and again: at once in the disaggregated placement (a turn waits up to `wait_s`
    for examples), in training phases in the colocated one (a turn ends with the step that publishes a
    version). `stats()` and `checkpoint()` are answered alongside a turn (threaded actor; one lock serialises
    every change to the trainer). `finish()` takes one last step on what it holds, publishes any steps not yet
    published, and checkpoints: nothing handed to the trainer is lost at the end of a run.

    Every turn runs on one thread of its own: the actor's calls arrive on any of its threads, and optimizer steps
    taken from several threads grew the process to 16 GB (glibc keeps a heap per thread, each as large as a
    step's peak; an end-to-end run was OOM-killed).
    """

    def __init__(self, config: Config, model_path: str, root: str, queue: Any) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        setup_process(config.trainer)
        self.trainer = LoraTrainer(config, model_path, root)
        self.queue = queue
        self._lock = threading.RLock()
        self._steps = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainer-steps")
        self.queue_wait_s = 0.0

    def train(self, wait_s: float = PULL_TIMEOUT_S, until_publish: bool = False) -> dict[str, Any]:
        """One turn: pull the queue (waiting up to `wait_s` for an example when no step is ready), then step while
        a full step is ready, pulling what arrives meanwhile; with `until_publish`, end after the step that
        publishes a version. Returns the stats."""
        return self._steps.submit(self._turn, wait_s, until_publish).result()

    def finish(self) -> dict[str, Any]:
        """The end of a run: a last step on what is held, the steps not yet published as a version, a
        checkpoint. Returns the final stats."""
        return self._steps.submit(self._finish).result()

    def _turn(self, wait_s: float, until_publish: bool) -> dict[str, Any]:
        self._pull(wait_s if not self.trainer.ready() else 0.0)
        while self.trainer.ready():
            published = self._step()
            if published and until_publish:
                break
            self._pull(0.0)
        self.trainer.learner.release_cache()
        return self.stats()

    def _finish(self) -> dict[str, Any]:
        self._pull(0.0)
        with self._lock:
            if self.trainer.examples.fresh:
                self.trainer.train_step()
            if self.trainer.pending_steps():
                self.trainer.publish()
            self.trainer.save_checkpoint()
        self.trainer.learner.release_cache()
        return self.stats()

    def _pull(self, wait_s: float) -> None:
        from ray.util.queue import Empty

        start = time.monotonic()
        try:
            items = [self.queue.get(block=True, timeout=wait_s)] if wait_s > 0 else []
            waiting = self.queue.qsize()
            if waiting:
                items += self.queue.get_nowait_batch(waiting)
        except Empty:
            items = []
        self.queue_wait_s += time.monotonic() - start
        with self._lock:
            self.trainer.add(items)

    def _step(self) -> bool:
        """One optimizer step; True if it published a version."""
        with self._lock:
            self.trainer.train_step()
            published = self.trainer.publish_due()
            if published:
                self.trainer.publish()
            if self.trainer.stats.train_steps % self.trainer.config.checkpoint_every_steps == 0:
                self.trainer.save_checkpoint()
            return published

    def stats(self) -> dict[str, Any]:
        """Counters and last-step figures (loss, tokens/s, examples/s, step time, queue wait, buffer sizes)."""
        return self.trainer.report() | {"queue_wait_s": self.queue_wait_s}

    def checkpoint(self) -> str:
        """Checkpoint now; returns the checkpoint directory."""
        with self._lock:
            return str(self.trainer.save_checkpoint())


def start_trainer(config: Config, model_path: str | Path, root: str | Path, queue: Any,
                  timeout_s: float = 600.0) -> ray.actor.ActorHandle:
    """A `TrainerActor` with the configured resources and restarts, its model loaded (or TimeoutError)."""
    t = config.trainer
    actor = ray.remote(TrainerActor).options(
        **t.resources.ray_options(), max_task_retries=t.resources.max_restarts,
        max_concurrency=4,
    ).remote(config, str(model_path), str(root), queue)
    try:
        ray.get(actor.stats.remote(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        ray.kill(actor, no_restart=True)
        raise TimeoutError(f"the trainer did not load {model_path} within {timeout_s:.0f} s") from None
    return actor

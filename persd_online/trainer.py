"""The streaming LoRA trainer: examples in, optimizer steps, adapter versions out.

`LoraTrainer` holds the student's base model with a peft LoRA adapter and trains it on examples as they
arrive; `TrainerActor` runs it in a Ray actor that pulls from the loop's example queue. The same
`LoraTrainer` serves offline training from a file (`persd-online train`).

A step takes `batch_examples * grad_accum_steps` examples: a `replay_fraction` share from the replay
buffer (`replay.py`) once it holds any, the rest fresh, oldest first. Fresh examples that are stale
(`staleness.is_stale` against the trainer's published version) or were trained already are dropped and
counted. The step's examples are split into micro-batches by token budget (`batching.py`) whose gradients
accumulate; the loss is the mean over completion tokens, and logits are computed only where it is taken
(the 49k-token LM head is a large share of a small model's compute).

Invariants:
- versions only go forward: version v+1 is written with peft's `save_pretrained` into `adapters/vNNNN`
  through `atomic.publish_dir` (staging dir, fsync, rename, `COMPLETE` marker last), so a reader never
  sees a half-written version, and an existing version is never overwritten, also after a resume;
- optimizer, scheduler and RNG state persist across publishes (a version continues the previous one) and
  across checkpoints: `checkpoints/trainer-NNNNN/` (adapter, optimizer, scheduler, RNG, step, version,
  examples seen, pending fresh examples, replay buffer), named by `checkpoints/trainer.json`, written last;
- no code path assumes CUDA: `device: auto` trains on a GPU in bf16 when there is one, else fp32 on CPU.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch
import torch.nn.functional as F

from persd_online import atomic
from persd_online.batching import IGNORE, Encoded, collate, encode, plan_micro_batches
from persd_online.config import Config, TrainerConfig
from persd_online.records import AdapterVersion, Example
from persd_online.replay import ReplayBuffer
from persd_online.staleness import is_stale

log = logging.getLogger(__name__)

MARKER = "COMPLETE"  # the student loads only directories holding it (persd_online.student.MARKER)
VERSION_FILE = "adapter_version.json"
POINTER = "trainer.json"
PULL_TIMEOUT_S = 0.5
STOP_TIMEOUT_S = 600.0
_SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def examples_per_step(config: TrainerConfig) -> int:
    """Examples in one optimizer step (fresh and replayed)."""
    return config.batch_examples * config.grad_accum_steps


def fresh_per_version(config: TrainerConfig) -> int:
    """Fresh examples one adapter version consumes once the replay buffer is warm (the staleness gate's unit)."""
    total = examples_per_step(config)
    return max(1, total - math.floor(total * config.replay_fraction)) * config.publish_every_steps


def published_versions(adapters_dir: Path) -> list[int]:
    """Complete versions under `adapters_dir`, ascending."""
    return sorted(int(p.name[1:]) for p in adapters_dir.glob("v[0-9][0-9][0-9][0-9]") if (p / MARKER).is_file())


def resolve_device(config: TrainerConfig) -> tuple[torch.device, torch.dtype]:
    """The device and dtype `device`/`dtype: auto` stand for here (bf16 on a GPU, fp32 on CPU)."""
    name = config.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("trainer.device is 'cuda' but torch sees no CUDA device; use 'auto' or 'cpu'")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(config.dtype)
    if dtype is None:
        dtype = torch.bfloat16 if name == "cuda" else torch.float32
    return torch.device(name), dtype


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


@dataclass
class TrainerStats:
    """Counters and last-step figures (what `stats()` reports and checkpoints keep)."""

    train_steps: int = 0
    examples_trained: int = 0
    replayed: int = 0
    stale_dropped: int = 0
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
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

        t = self.config = config.trainer
        self.max_staleness = config.max_staleness
        self.prompt_format = config.student.prompt_format
        self.adapters_dir = Path(root) / "adapters"
        self.checkpoints_dir = Path(root) / "checkpoints"
        cores = pin_to_cores(t.cpu_cores)
        if t.torch_threads or cores:
            torch.set_num_threads(t.torch_threads or len(cores))
        torch.manual_seed(t.seed)
        self.device, self.dtype = resolve_device(t)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=self.dtype).to(self.device)
        lora = LoraConfig(r=t.lora.r, lora_alpha=t.lora.alpha, lora_dropout=t.lora.dropout,
                          target_modules=list(t.lora.target_modules), task_type="CAUSAL_LM")
        self.model = get_peft_model(base, lora)
        self.model.peft_config["default"].base_model_name_or_path = str(model_path)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
        self.scheduler = get_scheduler(_SCHEDULES[t.schedule], self.optimizer, num_warmup_steps=t.warmup_steps,
                                       num_training_steps=t.schedule_steps)
        self.replay = ReplayBuffer(t.replay_capacity, t.max_reuse, t.seed)
        self.rng = random.Random(t.seed)
        self.fresh: list[Example] = []
        self.seen: set[str] = set()
        self.stats = TrainerStats()
        self.version = max(published_versions(self.adapters_dir), default=0)
        self.checkpoint_seq = 0
        self._pending = _Pending()
        if self.restore():
            log.info("trainer resumed at step %d, version %d, %d examples trained",
                     self.stats.train_steps, self.version, self.stats.examples_trained)
        log.info("trainer ready: LoRA r=%d over %s on %s/%s, %d trainable parameters", t.lora.r,
                 ",".join(t.lora.target_modules), self.device, str(self.dtype).removeprefix("torch."),
                 sum(p.numel() for p in params))

    # --- examples in --------------------------------------------------------------------------------------
    def add(self, examples: list[Example]) -> None:
        """Queue fresh examples for the next steps."""
        self.fresh.extend(examples)

    def _replay_share(self) -> int:
        return min(math.floor(examples_per_step(self.config) * self.config.replay_fraction), len(self.replay))

    def ready(self) -> bool:
        """Whether enough fresh examples wait for a full step."""
        return len(self.fresh) >= examples_per_step(self.config) - self._replay_share()

    def _take_fresh(self, n: int) -> list[Example]:
        taken = []
        while self.fresh and len(taken) < n:
            example = self.fresh.pop(0)
            if example.example_id in self.seen:
                self.stats.duplicates_dropped += 1
            elif is_stale(example.adapter_version, self.version, self.max_staleness):
                self.stats.stale_dropped += 1
                log.debug("dropped stale example %s (attempt v%s, trainer v%d)", example.example_id,
                          example.adapter_version, self.version)
            else:
                taken.append(example)
        return taken

    # --- one optimizer step -------------------------------------------------------------------------------
    def train_step(self) -> float | None:
        """One optimizer step on up to one step's worth of examples; None if no fresh example was usable."""
        n_replay = self._replay_share()
        fresh = self._take_fresh(examples_per_step(self.config) - n_replay)
        if not fresh:
            return None
        replayed = self.replay.sample(n_replay)
        start = time.perf_counter()
        encoded = [encode(e, self.tokenizer, self.prompt_format, self.config.max_seq_len) for e in fresh + replayed]
        targets = sum(e.completion_tokens for e in encoded)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for group in plan_micro_batches(encoded, self.config.max_batch_tokens):
            loss = self.loss_sum(collate(group, self.pad_id, self.device)) / max(targets, 1)
            loss.backward()
            loss_sum += loss.item()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        elapsed = time.perf_counter() - start
        self._account(fresh, replayed, encoded, loss_sum, elapsed)
        return loss_sum

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed next-token cross-entropy over the labelled positions, with logits only at those positions."""
        base = self.model.get_base_model()
        hidden = base.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
        labels = batch["labels"][:, 1:]
        keep = labels != IGNORE
        logits = base.get_output_embeddings()(hidden[:, :-1][keep]).float()
        return F.cross_entropy(logits, labels[keep], reduction="sum")

    def _account(self, fresh: list[Example], replayed: list[Example], encoded: list[Encoded], loss: float,
                 elapsed: float) -> None:
        s = self.stats
        tokens = sum(len(e.input_ids) for e in encoded)
        s.train_steps += 1
        s.examples_trained += len(fresh)
        s.replayed += len(replayed)
        s.truncated += sum(e.truncated for e in encoded)
        s.tokens_trained += tokens
        s.busy_s += elapsed
        s.loss, s.step_s = loss, elapsed
        s.train_tokens_per_s, s.examples_per_s = tokens / elapsed, len(encoded) / elapsed
        for example in fresh:
            self.seen.add(example.example_id)
            self.replay.add(example)
            self._pending.example_ids.append(example.example_id)
            if example.adapter_version is not None:
                self._pending.staleness_max = max(self._pending.staleness_max,
                                                  self.version - example.adapter_version)
        self._pending.losses.append(loss)

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
            version=version, path=str(self.adapters_dir / f"v{version:04d}"), step=self.stats.train_steps,
            examples_seen=self.stats.examples_trained,
            loss=sum(pending.losses) / len(pending.losses) if pending.losses else None,
            example_ids=pending.example_ids)
        meta = record.model_dump() | {"trained_on_version": self.version, "staleness_max": pending.staleness_max,
                                      "max_staleness": self.max_staleness, "created": time.time()}

        def build(staging: Path) -> None:
            self.model.save_pretrained(str(staging))
            (staging / VERSION_FILE).write_text(json.dumps(meta, indent=1))

        atomic.publish_dir(record.path, build, marker=MARKER)
        self.version = version
        self._pending = _Pending()
        log.info("published adapter v%d (step %d, %d examples, loss %s)", version, record.step,
                 record.examples_seen, f"{record.loss:.4f}" if record.loss is not None else "n/a")
        return record

    # --- checkpoints --------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Persist everything a resumed trainer needs; older checkpoints are removed once this one is named."""
        self.checkpoint_seq += 1
        name = f"trainer-{self.checkpoint_seq:05d}"
        state = {
            "version": self.version, "checkpoint_seq": self.checkpoint_seq, "stats": vars(self.stats),
            "seen": sorted(self.seen), "fresh": [e.model_dump() for e in self.fresh],
            "replay": self.replay.state(), "pending": vars(self._pending) | {"since": None},
        }

        def build(staging: Path) -> None:
            self.model.save_pretrained(str(staging / "adapter"))
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "torch_rng": torch.get_rng_state(), "python_rng": self.rng.getstate()},
                       staging / "optim.pt")
            (staging / "state.json").write_text(json.dumps(state))

        target = atomic.publish_dir(self.checkpoints_dir / name, build)
        atomic.write_text(self.checkpoints_dir / POINTER, json.dumps({"latest": name}))
        for old in self.checkpoints_dir.glob("trainer-[0-9]*"):
            if old.name != name and not old.name.startswith("."):
                _remove_tree(old)
        return target

    def restore(self) -> bool:
        """Load the latest checkpoint under `checkpoints/`, if any; True if one was loaded."""
        pointer = self.checkpoints_dir / POINTER
        if not pointer.is_file():
            return False
        directory = self.checkpoints_dir / json.loads(pointer.read_text())["latest"]
        state = json.loads((directory / "state.json").read_text())
        self._load_adapter(directory / "adapter")
        optim = torch.load(directory / "optim.pt", map_location=self.device, weights_only=False)
        self.optimizer.load_state_dict(optim["optimizer"])
        self.scheduler.load_state_dict(optim["scheduler"])
        torch.set_rng_state(optim["torch_rng"])
        self.rng.setstate(optim["python_rng"])
        # Never reuse a version number, also one published after this checkpoint was taken; the steps the
        # checkpoint had not yet published are then in that newer version already: do not publish them again.
        newer_published = self.version > state["version"]
        self.version = max(state["version"], self.version)
        self.checkpoint_seq = state["checkpoint_seq"]
        self.stats = TrainerStats(**state["stats"])
        self.seen = set(state["seen"])
        self.fresh = [Example(**e) for e in state["fresh"]]
        self.replay.load_state(state["replay"])
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
        for version in published_versions(self.adapters_dir):
            if version > checkpointed:
                meta = json.loads((self.adapters_dir / f"v{version:04d}" / VERSION_FILE).read_text())
                trained.update(meta["example_ids"])
        self._load_adapter(self.adapters_dir / f"v{self.version:04d}")
        self.stats.train_steps, self.stats.examples_trained = meta["step"], meta["examples_seen"]
        for example in self.fresh:
            if example.example_id in trained:
                self.replay.add(example)
        self.fresh = [e for e in self.fresh if e.example_id not in trained]
        self.seen |= trained
        log.info("versions v%d..v%d were published after the checkpoint: continuing from v%d", checkpointed + 1,
                 self.version, self.version)

    def _load_adapter(self, directory: Path) -> None:
        """Set the LoRA weights to those saved in `directory` (a version or a checkpoint)."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = load_file(directory / "adapter_model.safetensors", device=str(self.device))
        result = set_peft_model_state_dict(self.model, weights)
        if getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"{directory} does not match this LoRA config: {result.unexpected_keys}")

    def report(self) -> dict[str, Any]:
        """The counters and last-step figures, plus the version and buffer sizes."""
        return vars(self.stats) | {"version": self.version, "replay_size": len(self.replay),
                                   "fresh_pending": len(self.fresh), "ready": self.ready()}


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


class TrainerActor:
    """A `LoraTrainer` in a Ray actor, pulling examples from a Ray queue until stopped.

    `run()` is the long-running loop; `stats()`, `checkpoint()` and `stop()` are answered alongside it
    (threaded actor; one lock serialises every change to the trainer). On `stop()` the trainer takes one
    last step on what it holds, publishes any steps not yet published, and checkpoints.
    """

    def __init__(self, config: Config, model_path: str, root: str, queue: Any) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.trainer = LoraTrainer(config, model_path, root)
        self.queue = queue
        self._lock = threading.RLock()  # re-entered by the last step taken under the stop path
        self._stop = threading.Event()
        self._running = False
        self._done = threading.Event()
        self.queue_wait_s = 0.0

    def run(self) -> dict[str, Any]:
        """Train on the queue until `stop()`; returns the final stats."""
        self._running = True
        try:
            while not self._stop.is_set():
                self._pull()
                while self.trainer.ready() and not self._stop.is_set():
                    self._step()
            self._pull(block=False)
            with self._lock:
                if self.trainer.fresh:
                    self._step()
                if self.trainer.pending_steps():
                    self.trainer.publish()
                self.trainer.save_checkpoint()
        finally:
            self._done.set()
        return self.stats()

    def _pull(self, block: bool = True) -> None:
        from ray.util.queue import Empty

        start = time.monotonic()
        try:
            items = [self.queue.get(block=True, timeout=PULL_TIMEOUT_S)] if block else []
            waiting = self.queue.qsize()
            if waiting:
                items += self.queue.get_nowait_batch(waiting)
        except Empty:
            items = []
        self.queue_wait_s += time.monotonic() - start
        with self._lock:
            self.trainer.add(items)

    def _step(self) -> None:
        with self._lock:
            self.trainer.train_step()
            if self.trainer.publish_due():
                self.trainer.publish()
            if self.trainer.stats.train_steps % self.trainer.config.checkpoint_every_steps == 0:
                self.trainer.save_checkpoint()

    def stats(self) -> dict[str, Any]:
        """Counters and last-step figures (loss, tokens/s, examples/s, step time, queue wait, buffer sizes)."""
        return self.trainer.report() | {"queue_wait_s": self.queue_wait_s}

    def checkpoint(self) -> str:
        """Checkpoint now; returns the checkpoint directory."""
        with self._lock:
            return str(self.trainer.save_checkpoint())

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> dict[str, Any]:
        """End `run()` (last step, last version, checkpoint) and wait for it; returns the final stats."""
        self._stop.set()
        if self._running:
            if not self._done.wait(timeout_s):
                raise TimeoutError(f"the trainer did not stop within {timeout_s:.0f} s")
        return self.stats()


def start_trainer(config: Config, model_path: str | Path, root: str | Path, queue: Any,
                  timeout_s: float = 600.0) -> ray.actor.ActorHandle:
    """A `TrainerActor` with the configured resources and restarts, its model loaded (or TimeoutError)."""
    t = config.trainer
    actor = ray.remote(TrainerActor).options(
        num_cpus=t.num_cpus, num_gpus=t.num_gpus, max_restarts=t.max_restarts, max_task_retries=t.max_restarts,
        max_concurrency=4,
    ).remote(config, str(model_path), str(root), queue)
    try:
        ray.get(actor.stats.remote(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        ray.kill(actor, no_restart=True)
        raise TimeoutError(f"the trainer did not load {model_path} within {timeout_s:.0f} s") from None
    return actor

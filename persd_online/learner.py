"""The learner: the student's base model with a peft LoRA adapter, its optimizer and schedule, and one
optimizer step on a given list of examples.

A step encodes its examples (`batching.encode`: completion-only labels, cut to `max_seq_len`) and splits them
into micro-batches by token budget (`batching.plan_micro_batches`) whose gradients accumulate; the loss is the
mean over the step's completion tokens, and logits are computed only where it is taken (the 49k-token LM head
is a large share of a small model's compute). Which examples a step takes is the example buffer's business
(`example_buffer.py`), when its weights become a version the trainer's (`trainer.py`).

Invariants:
- only the LoRA weights train (peft freezes the base model); one `step` is one optimizer step and one
  scheduler step, however many micro-batches it takes;
- `save_adapter`/`load_adapter` move the LoRA weights in peft's format; `state`/`load_state` carry the rest
  that the next step depends on (optimizer, scheduler, torch and Python RNG), so a learner restored from both
  takes the same next step;
- the learner sets nothing process-wide: threads, core pinning and the global seed (which fixes the LoRA
  initialisation) are set by the process that owns it, before it is built (`trainer.setup_process`);
- no code path assumes CUDA: `device: auto` trains on a GPU in bf16 when there is one, else fp32 on CPU.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from persd_online.batching import IGNORE, collate, encode, plan_micro_batches
from persd_online.config import TrainerConfig
from persd_online.records import Example, PromptFormat

log = logging.getLogger(__name__)

_SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


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


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step did."""

    loss: float  # mean next-token cross-entropy over the step's completion tokens
    examples: int
    tokens: int  # prompt and completion tokens of the step's examples, as encoded
    truncated: int  # examples cut to max_seq_len
    elapsed_s: float


class Learner:
    """A LoRA adapter over the student's base model, with its optimizer and learning-rate schedule."""

    def __init__(self, config: TrainerConfig, model_path: str | Path, prompt_format: PromptFormat) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

        self.config = config
        self.prompt_format = prompt_format
        self.device, self.dtype = resolve_device(config)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=self.dtype).to(self.device)
        lora = LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                          target_modules=list(config.lora.target_modules), task_type="CAUSAL_LM")
        self.model = get_peft_model(base, lora)
        self.model.peft_config["default"].base_model_name_or_path = str(model_path)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = get_scheduler(_SCHEDULES[config.schedule], self.optimizer,
                                       num_warmup_steps=config.warmup_steps, num_training_steps=config.schedule_steps)
        # Nothing draws from it; it is kept because checkpoints hold its state (optim.pt's "python_rng").
        self.rng = random.Random(config.seed)
        log.info("learner ready: LoRA r=%d over %s on %s/%s, %d trainable parameters", config.lora.r,
                 ",".join(config.lora.target_modules), self.device, str(self.dtype).removeprefix("torch."),
                 sum(p.numel() for p in params))

    def step(self, examples: list[Example]) -> StepResult:
        """One optimizer step on `examples` (not empty), in micro-batches within the token budget."""
        start = time.perf_counter()
        encoded = [encode(e, self.tokenizer, self.prompt_format, self.config.max_seq_len) for e in examples]
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
        return StepResult(loss=loss_sum, examples=len(encoded), tokens=sum(len(e.input_ids) for e in encoded),
                          truncated=sum(e.truncated for e in encoded), elapsed_s=time.perf_counter() - start)

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed next-token cross-entropy over the labelled positions, with logits only at those positions."""
        base = self.model.get_base_model()
        hidden = base.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
        labels = batch["labels"][:, 1:]
        keep = labels != IGNORE
        logits = base.get_output_embeddings()(hidden[:, :-1][keep]).float()
        return F.cross_entropy(logits, labels[keep], reduction="sum")

    def release_cache(self) -> None:
        """Hand the GPU memory torch's allocator caches (activations, gradients of past steps) back to the device,
        for a colocated engine to wake into; nothing on CPU."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def save_adapter(self, directory: Path) -> None:
        """Write the LoRA adapter (peft's `save_pretrained`) into `directory`."""
        self.model.save_pretrained(str(directory))

    def load_adapter(self, directory: Path) -> None:
        """Set the LoRA weights to those saved in `directory` (a version or a checkpoint)."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = load_file(directory / "adapter_model.safetensors", device=str(self.device))
        result = set_peft_model_state_dict(self.model, weights)
        if getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"{directory} does not match this LoRA config: {result.unexpected_keys}")

    def state(self) -> dict[str, Any]:
        """Optimizer, scheduler and RNG state (for `torch.save`; the weights are `save_adapter`'s)."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(), "python_rng": self.rng.getstate()}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what `state()` returned."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        self.rng.setstate(state["python_rng"])

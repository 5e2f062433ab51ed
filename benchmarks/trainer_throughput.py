"""Trainer throughput: persd-online's `LoraTrainer` against TRL's `SFTTrainer`, same everything, one run.

Both train the same LoRA (r=16, alpha=32, every attention and MLP projection) on the same base model
(SmolLM2-135M-Instruct, prepared by `persd-online prepare-model`), on the same prompt/completion examples
(`stand` examples of MBPP train tasks in the student's chat format, loss on the completion only), with the
same batch size, learning rate and number of optimizer steps, on the same device and threads. Tokens/s
counts every prompt and completion token of the examples stepped on (the same examples for both), over
the timed steps after one untimed warm-up step; model loading is not timed.

Writes `benchmarks/results/trainer_throughput.json` (`ratio_over_trl` = ours / TRL tokens per second).
Run: `python benchmarks/trainer_throughput.py [--steps 12] [--batch 4]` (a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from persd_online.config import Config
from persd_online.formats import stand_examples
from persd_online.learner import resolve_device
from persd_online.models import prepare_model
from persd_online.records import Example
from persd_online.tasks import load_mbpp
from persd_online.trainer import LoraTrainer, setup_process

RESULT = Path(__file__).parent / "results" / "trainer_throughput.json"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_config(batch: int, threads: int) -> Config:
    return Config.model_validate({"trainer": {
        "batch_examples": batch, "replay_fraction": 0.0, "lr": 2e-4, "warmup_steps": 0, "cpu_cores": None,
        "torch_threads": threads, "max_batch_tokens": 1 << 20, "lora": {"r": 16, "alpha": 32, "dropout": 0.0,
                                                                        "target_modules": TARGETS}}})


def token_count(examples: list[Example], tokenizer) -> int:
    return sum(len(tokenizer(e.prompt + e.completion, add_special_tokens=False).input_ids) + 1 for e in examples)


def run_ours(config: Config, model: Path, examples: list[Example], batch: int, steps: int) -> float:
    """Seconds for `steps` timed steps of `LoraTrainer` (after one warm-up step)."""
    setup_process(config.trainer)
    trainer = LoraTrainer(config, model, tempfile.mkdtemp())
    trainer.add(examples[:batch])
    trainer.train_step()
    trainer.add(examples[batch:batch * (steps + 1)])
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    return time.perf_counter() - start


def run_trl(config: Config, model: Path, examples: list[Example], batch: int, steps: int, threads: int) -> float:
    """Seconds for `steps` timed optimizer steps of TRL's SFTTrainer (after one warm-up step)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    device, dtype = resolve_device(config.trainer)
    t = config.trainer
    data = Dataset.from_list([{"prompt": e.prompt, "completion": e.completion} for e in examples])
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001, D102
            times.append(time.perf_counter())

        def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001, D102
            times.append(time.perf_counter())

    args = SFTConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, max_steps=steps + 1,
        learning_rate=t.lr, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=t.max_grad_norm,
        logging_steps=1000, save_strategy="no", report_to=[], use_cpu=device.type == "cpu",
        bf16=dtype == torch.bfloat16, max_length=t.max_seq_len, packing=False, completion_only_loss=True,
        dataloader_num_workers=0, shuffle_dataset=False, seed=0, disable_tqdm=True)
    torch.set_num_threads(threads)
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model, dtype=dtype), args=args, train_dataset=data,
        processing_class=AutoTokenizer.from_pretrained(model), callbacks=[Clock()],
        peft_config=LoraConfig(r=t.lora.r, lora_alpha=t.lora.alpha, lora_dropout=0.0, target_modules=TARGETS,
                               task_type="CAUSAL_LM"))
    trainer.train()
    return times[-1] - times[1]  # from the start of the second step to the end: `steps` timed steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from transformers import AutoTokenizer

    model = prepare_model()
    tokenizer = AutoTokenizer.from_pretrained(model)
    config = make_config(args.batch, args.threads)
    examples = stand_examples(load_mbpp("train")[: args.batch * (args.steps + 1)], tokenizer, "chat")
    timed = examples[args.batch:]
    tokens = token_count(timed, tokenizer)
    ours_s = run_ours(config, model, examples, args.batch, args.steps)
    trl_s = run_trl(config, model, examples, args.batch, args.steps, args.threads)
    import trl

    device, dtype = resolve_device(config.trainer)
    result = {
        "ratio_over_trl": (tokens / ours_s) / (tokens / trl_s),
        "ours_tokens_per_s": tokens / ours_s, "trl_tokens_per_s": tokens / trl_s,
        "ours_s": ours_s, "trl_s": trl_s, "timed_tokens": tokens, "timed_steps": args.steps,
        "batch_examples": args.batch, "lora": {"r": 16, "alpha": 32, "targets": TARGETS},
        "device": device.type, "dtype": str(dtype).removeprefix("torch."), "threads": args.threads,
        "trl": trl.__version__, "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
        "baseline": "trl.SFTTrainer (prompt/completion dataset, completion_only_loss, no packing) with peft LoRA",
    }
    RESULT.parent.mkdir(exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

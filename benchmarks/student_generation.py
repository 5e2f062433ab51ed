"""Student generation throughput, in one run: the vLLM student serving a trained adapter merged into its
weights (`student.serving: merged`, the default) and through vLLM's LoRA (`lora`), against the same engine
without any adapter (`plain`, the no-LoRA ceiling) and plain transformers `generate`.

The workload is the loop's own: first attempts, `n` samples for each of the first MBPP train tasks, chat
format, the configured sampling (temperature 0.8, top-p 0.95), at most `max_new_tokens`, stopping at eos.
Every side gets the same prompt token ids. The adapter is one the trainer's layout publishes (rank 16, every
projection), with small random weights, so the served texts stay close to the base model's and every side
generates a similar number of tokens. transformers gets its best fair shot: one left-padded batch of every
sequence, the KV cache, all cores; its tokens are counted up to and including each sequence's eos, as vLLM
counts them, so padding after a finished sequence is cost, not output.

Writes `benchmarks/results/student_generation.json` (keys `ratio_merged_over_plain`,
`ratio_lora_over_plain`, `ratio_vllm_over_hf`: the default serving against transformers).
Run: `python benchmarks/student_generation.py` (about 10 minutes on 2 cores).
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

import ray
import torch

from persd_online import adapters
from persd_online.atomic import write_text
from persd_online.config import Resources, StudentConfig
from persd_online.engine import Sampling
from persd_online.models import prepare_model
from persd_online.prompts import attempt_prompt, render
from persd_online.student import start_student, stop_student
from persd_online.tasks import Task, load_mbpp

log = logging.getLogger("benchmarks.student_generation")
RESULT = Path(__file__).parent / "results" / "student_generation.json"


def publish_adapter(model: Path, root: Path, version: int = 1, scale: float = 0.02) -> Path:
    """A rank-16 adapter over every projection, in the trainer's layout, with small random weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32),
                                LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return adapters.publish_version(root, version, peft_model.save_pretrained, {"version": version})


def run_vllm(config: StudentConfig, model: Path, tasks: list[Task], n: int, adapter: Path | None) -> dict:
    """Tokens/s of the student actor's `generate` on `adapter` as version 1, or on version 0 without one
    (engine start, the adapter's load and a warm-up excluded)."""
    with tempfile.TemporaryDirectory(prefix="persd-bench-") as work:
        actor = start_student(config, model, work)
        try:
            if adapter is not None:
                ray.get(actor.load_adapter.remote(1, adapter))
            ray.get(actor.generate_prompts.remote(["Say hi."], Sampling(max_tokens=8)))  # warm-up
            start = time.perf_counter()
            attempts = ray.get(actor.generate.remote(tasks, n))
            seconds = time.perf_counter() - start
        finally:
            stop_student(actor)
    tokens = sum(a.completion_tokens for a in attempts)
    return {"seconds": seconds, "completion_tokens": tokens, "sequences": len(attempts),
            "tokens_per_s": tokens / seconds}


def run_hf(config: StudentConfig, model_path: Path, tasks: list[Task], n: int) -> dict:
    """Tokens/s of one batched, left-padded `generate` over the same prompts and sampling."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    texts = [render(attempt_prompt(t, "chat"), tokenizer) for t in tasks]
    batch = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    settings = {"do_sample": True, "temperature": config.temperature, "top_p": config.top_p,
                "top_k": 0,  # transformers defaults to top-k 50; vLLM applies none
                "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    with torch.inference_mode():
        model.generate(**tokenizer(texts[:2], add_special_tokens=False, padding=True, return_tensors="pt"),
                       max_new_tokens=8, **settings)  # warm-up
        torch.manual_seed(config.seed)
        start = time.perf_counter()
        out = model.generate(**batch, max_new_tokens=config.max_new_tokens, num_return_sequences=n, **settings)
        seconds = time.perf_counter() - start
    generated = out[:, batch.input_ids.shape[1]:]
    finished = (generated == tokenizer.eos_token_id).int()
    # Up to and including the first eos; the whole row if the sequence hit max_new_tokens.
    lengths = torch.where(finished.any(dim=1), finished.argmax(dim=1) + 1, generated.shape[1])
    tokens = int(lengths.sum())
    return {"seconds": seconds, "completion_tokens": tokens, "sequences": int(generated.shape[0]),
            "tokens_per_s": tokens / seconds, "batch_steps": int(generated.shape[1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=24)
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    model = prepare_model()
    tasks = load_mbpp("train")[:args.tasks]
    # Both sides get every core (the loop's default pins vLLM to core 0 to leave core 1 to the trainer).
    cores = os.cpu_count() or 1
    # Every side stops at eos only, as transformers does (no program-end or repetition stops).
    config = StudentConfig(max_new_tokens=args.max_new_tokens, cpu_kvcache_gib=1, max_model_len=1024,
                           cpu_cores=list(range(cores)), resources=Resources(num_cpus=cores),
                           stop_at_program_end=False, stop_repetition=False)
    load_before = os.getloadavg()
    os.environ["RAY_AUTH_MODE"] = "disabled"  # a throwaway local cluster: no token auth
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    runs: dict[str, dict] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="persd-bench-adapter-") as root:
            adapter = publish_adapter(model, Path(root))
            for serving in ("plain", "merged", "lora"):
                served = config.model_copy(update={"serving": serving})
                runs[serving] = run_vllm(served, model, tasks, args.n, None if serving == "plain" else adapter)
                log.info("vLLM %s: %.1f tokens/s", serving, runs[serving]["tokens_per_s"])
    finally:
        ray.shutdown()
    hf = run_hf(config, model, tasks, args.n)
    log.info("transformers: %.1f tokens/s", hf["tokens_per_s"])
    import transformers
    import vllm as vllm_pkg

    rate = {name: r["tokens_per_s"] for name, r in runs.items()}
    result = {
        "ratio_merged_over_plain": rate["merged"] / rate["plain"],
        "ratio_lora_over_plain": rate["lora"] / rate["plain"],
        "ratio_merged_over_lora": rate["merged"] / rate["lora"],
        "ratio_vllm_over_hf": rate["merged"] / hf["tokens_per_s"],
        "ratio_lora_over_hf": rate["lora"] / hf["tokens_per_s"],
        "goals": {"merged_over_plain": ">= 0.9", "vllm_over_hf": ">= 3"},
        "vllm": runs,
        "hf": hf,
        "workload": {"model": model.name, "tasks": f"mbpp:train[:{args.tasks}]", "n": args.n,
                     "prompt_format": "chat", "max_new_tokens": args.max_new_tokens,
                     "temperature": config.temperature, "top_p": config.top_p, "stop": "eos"},
        "vllm_settings": {"dtype": config.dtype, "enforce_eager": config.enforce_eager, "in_process": True,
                          "VLLM_CPU_NUM_OF_RESERVED_CPU": 0,
                          "adapter": "version 1: rank 16, alpha 32, all projections, weights N(0, 0.02^2)",
                          "plain": "no adapter (version 0)", "merged": "version 1 merged, reloaded in place",
                          "lora": "version 1 through vLLM LoRA"},
        "machine": {"device": "cpu", "gpu": None, "note": "no GPU in this session", "cpus": os.cpu_count(),
                    "processor": platform.processor() or platform.machine(),
                    "load_average_before": load_before, "load_average_after": os.getloadavg(),
                    "shared": "the cores were shared with other jobs; compare ratios, not absolute numbers"},
        "versions": {"vllm": vllm_pkg.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
    }
    write_text(args.out, json.dumps(result, indent=2) + "\n")
    log.info("merged/plain %.2f, lora/plain %.2f, merged/HF %.2f -> %s", result["ratio_merged_over_plain"],
             result["ratio_lora_over_plain"], result["ratio_vllm_over_hf"], args.out)


if __name__ == "__main__":  # the engine starts worker processes that re-import this module
    main()

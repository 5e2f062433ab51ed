"""A published LoRA adapter merged into its base model's weights, as a checkpoint a plain engine serves.

Offline scoring (`heldout.score_adapter`) serves a trained adapter this way: on the CPU engine, serving
through LoRA cost ~3x the tokens/s of the same model without it. The merged weights are W + (alpha / r) B A
(peft's `merge_and_unload`), written in the base model's dtype with its tokenizer and chat template.

Invariants: the merged checkpoint is published atomically (`atomic.publish_dir`: a crash leaves nothing
half-written) and reused when already there; it never replaces the adapter it came from.
"""

from __future__ import annotations

from pathlib import Path

from persd_online.atomic import publish_dir

MARKER = "MERGED"


def merge_adapter(model_path: str | Path, adapter_dir: str | Path, target: str | Path) -> Path:
    """Write base model + adapter, merged, to `target` (reused if complete); returns `target`."""
    target = Path(target)
    if (target / MARKER).is_file():
        return target

    def build(staging: Path) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        base = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto")
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
        merged.save_pretrained(staging)
        AutoTokenizer.from_pretrained(model_path).save_pretrained(staging)

    return publish_dir(target, build, marker=MARKER)

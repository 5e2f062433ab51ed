"""A stand-in for the trainer's adapter publishing: peft adapters with chosen weights, in its layout.

`<adapters_dir>/v0003/` holds peft's adapter files, `adapter_version.json` and an empty `COMPLETE`
marker written last (`persd_online.adapters.publish`). Weights are drawn from a seed, so the same
(seed, scale) publishes identical weights under a new version, and scale 0 gives a zero-effect adapter.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from persd_online import adapters

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class AdapterFactory:
    """Publishes adapter versions of one base model (the base weights are loaded once)."""

    def __init__(self, model_path: Path, adapters_dir: Path, r: int = 8) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        self.model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS))
        self.adapters_dir = Path(adapters_dir)

    def path(self, version: int) -> Path:
        return adapters.version_dir(self.adapters_dir, version)

    def set_weights(self, seed: int, scale: float) -> None:
        """LoRA A and B drawn from `seed`, B scaled by `scale` (0: zero effect, as peft initialises it)."""
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if "lora_A" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) / param.shape[1] ** 0.5)
                elif "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * scale)

    def publish(self, version: int, seed: int, scale: float, marker: bool = True) -> Path:
        """Publish `version` with weights from (seed, scale); without `marker`, leave it unfinished."""
        self.set_weights(seed, scale)
        return self.save(version, marker)

    def save(self, version: int, marker: bool = True) -> Path:
        """Write the current weights as `version`, atomically with its marker last (or without a marker)."""

        def build(staging: Path) -> None:
            self.model.save_pretrained(staging)
            (staging / adapters.VERSION_FILE).write_text(json.dumps({"version": version}))

        if marker:
            return adapters.publish(self.path(version), build)
        target = self.path(version)
        target.mkdir(parents=True)
        build(target)
        return target

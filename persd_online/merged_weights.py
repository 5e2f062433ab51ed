"""A peft LoRA adapter's effect as plain weights: W' = W + s · B A for each module it adapts, in the base
checkpoint's own names, for an engine that reloads them in place (`student.serving: merged`).

s is peft's scaling: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA. The result is what peft's
`merge_and_unload` computes, without building a model: a few matrix products per adapted module.

Invariants: the merged weights of an adapter depend only on the base weights and the adapter (never on a
previously merged version), so serving version 0 again restores the checkpoint's weights exactly; adapters
this module cannot express as a weight update (modules_to_save, fan_in_fan_out, DoRA, biases) are refused with
a `MergeError`, never merged partially.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

PREFIX = "base_model.model."
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class MergeError(ValueError):
    """The adapter cannot be served as merged weights."""


def base_weights(model_path: Path, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The named weights of the checkpoint in `model_path` (every *.safetensors shard), as float32 copies."""
    from safetensors import safe_open

    wanted, found = set(names), {}
    for shard in sorted(Path(model_path).glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for key in wanted.intersection(f.keys()):
                found[key] = f.get_tensor(key).float()
    if missing := wanted - set(found):
        raise MergeError(f"the checkpoint in {model_path} has no weights named {sorted(missing)[:3]}: "
                         "was the adapter trained on another model?")
    return found


@dataclass(frozen=True)
class LoraFactors:
    """One adapter's LoRA factors, checked mergeable: `factors[name] = (B, A)` per adapted checkpoint weight."""

    scale: float
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def names(self) -> list[str]:
        return sorted(self.factors)


def read_adapter(adapter_dir: Path) -> LoraFactors:
    """The factors of the peft adapter in `adapter_dir`; `MergeError` if it is more than LoRA factors."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    scale = _scale(json.loads((adapter_dir / "adapter_config.json").read_text()), adapter_dir)
    tensors = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    if odd := [k for k in tensors if ".lora_A." not in k and ".lora_B." not in k]:
        raise MergeError(f"adapter {adapter_dir} holds more than LoRA factors ({odd[:3]}); serve it with "
                         "student.serving: lora")
    return LoraFactors(scale, {_weight_name(k): (tensors[k.replace(".lora_A.", ".lora_B.")].float(), a.float())
                               for k, a in tensors.items() if ".lora_A." in k})


def merged_weights(base: dict[str, torch.Tensor], adapter: LoraFactors) -> dict[str, torch.Tensor]:
    """W + s · B A (float32) for every weight the adapter changes (`base` holds at least those); the engine
    casts them to its own dtype as it loads them."""
    return {name: base[name] + adapter.scale * (b @ a) for name, (b, a) in adapter.factors.items()}


def _weight_name(adapter_key: str) -> str:
    """`base_model.model.X.lora_A.weight` -> `X.weight` (the checkpoint's name of the adapted weight)."""
    return adapter_key.removeprefix(PREFIX).replace(".lora_A.weight", ".weight").replace(".lora_B.weight", ".weight")


def _scale(config: dict, adapter_dir: Path) -> float:
    for flag in ("fan_in_fan_out", "use_dora"):
        if config.get(flag):
            raise MergeError(f"adapter {adapter_dir} uses {flag}; serve it with student.serving: lora")
    if config.get("modules_to_save") or config.get("bias", "none") != "none":
        raise MergeError(f"adapter {adapter_dir} trains more than LoRA factors (modules_to_save or biases); "
                         "serve it with student.serving: lora")
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r

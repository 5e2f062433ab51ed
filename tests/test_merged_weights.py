"""Merged weights against peft's own `merge_and_unload`, on the student checkpoint and adapters in the
trainer's layout; adapters that are not pure LoRA factors are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from persd_online.merged_weights import MergeError, base_weights, merged_weights, read_adapter
from tests.lora_fixtures import AdapterFactory


@pytest.fixture(scope="module")
def factory(student_model: Path, tmp_path_factory: pytest.TempPathFactory) -> AdapterFactory:
    return AdapterFactory(student_model, tmp_path_factory.mktemp("adapters"))


def test_merged_weights_are_what_peft_merges(student_model: Path, factory: AdapterFactory) -> None:
    path = factory.publish(1, seed=1, scale=0.05)
    adapter = read_adapter(path)
    names = adapter.names
    assert len(names) == 7 * 30 and "model.layers.0.self_attn.q_proj.weight" in names
    merged = merged_weights(base_weights(student_model, names), adapter)
    peft_merged = _peft_merged(factory)
    for name in names:
        torch.testing.assert_close(merged[name], peft_merged[name], rtol=1e-5, atol=1e-6)
    assert not torch.equal(merged[names[0]], base_weights(student_model, names[:1])[names[0]])


def _peft_merged(factory: AdapterFactory) -> dict[str, torch.Tensor]:
    """peft's merge of the factory's current weights, by name, leaving the factory's model unmerged."""
    model = factory.model
    model.merge_adapter()
    try:
        return {k.replace("base_model.model.", "").replace(".base_layer", ""): v.clone()
                for k, v in model.state_dict().items() if "lora_" not in k}
    finally:
        model.unmerge_adapter()


def test_a_zero_adapter_leaves_the_weights_unchanged(student_model: Path, factory: AdapterFactory) -> None:
    path = factory.publish(2, seed=2, scale=0.0)
    adapter = read_adapter(path)
    names = adapter.names
    base = base_weights(student_model, names)
    merged = merged_weights(base, adapter)
    assert all(torch.equal(merged[n], base[n]) for n in names)


def test_adapters_that_are_not_pure_lora_factors_are_refused(factory: AdapterFactory) -> None:
    path = factory.publish(3, seed=3, scale=0.1)
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps(config | {"modules_to_save": ["lm_head"]}))
    with pytest.raises(MergeError, match="student.serving: lora"):
        read_adapter(path)


def test_an_adapter_of_another_model_is_named_as_such(tmp_path: Path, factory: AdapterFactory) -> None:
    path = factory.publish(4, seed=4, scale=0.1)
    with pytest.raises(MergeError, match="another model"):
        base_weights(tmp_path, read_adapter(path).names)  # no checkpoint there

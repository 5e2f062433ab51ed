"""The streaming LoRA trainer on the real SmolLM2-135M checkpoint, on CPU (fp32)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from persd_online.batching import IGNORE, collate, encode, plan_micro_batches
from persd_online.config import Config
from persd_online.formats import stand_examples
from persd_online.records import Example
from persd_online.replay import ReplayBuffer
from persd_online.student import AdapterNotReadyError, check_published
from persd_online.tasks import load_mbpp
from persd_online.trainer import LoraTrainer, fresh_per_version, published_versions

TASKS = load_mbpp("train")[:4]


def make_config(**trainer: object) -> Config:
    settings = {"batch_examples": 4, "replay_fraction": 0.0, "lr": 1e-3, "warmup_steps": 0,
                "publish_every_steps": 2, "torch_threads": 2, "cpu_cores": None,
                "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}
    return Config.model_validate({"student": {"prompt_format": "completion"}, "trainer": settings | trainer})


def examples(tokenizer, fmt: str = "completion", version: int | None = None) -> list[Example]:
    made = stand_examples(TASKS, tokenizer, fmt)
    return [e.model_copy(update={"adapter_version": version}) for e in made]


@pytest.fixture(scope="module")
def tokenizer(student_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(student_model)


def test_labels_cover_the_completion_only(tokenizer) -> None:
    example = Example(example_id="x", method="stand", task_id="t", prompt="def add(a, b):\n",
                      completion="    return a + b\n")
    enc = encode(example, tokenizer, "chat", max_seq_len=512)
    prompt_ids = tokenizer(example.prompt, add_special_tokens=False).input_ids
    completion_ids = tokenizer(example.completion, add_special_tokens=False).input_ids
    assert enc.input_ids == prompt_ids + completion_ids + [tokenizer.eos_token_id]
    assert enc.labels[:len(prompt_ids)] == [IGNORE] * len(prompt_ids)
    assert enc.labels[len(prompt_ids):] == completion_ids + [tokenizer.eos_token_id]
    assert tokenizer.decode([t for t in enc.labels if t != IGNORE]) == "    return a + b\n" + tokenizer.eos_token
    cut = encode(example, tokenizer, "completion", max_seq_len=4)
    assert cut.truncated and len(cut.input_ids) == 4 and cut.labels == cut.input_ids  # the prompt goes first


def test_micro_batches_stay_within_the_token_budget(tokenizer) -> None:
    encoded = [encode(e, tokenizer, "completion", 1024) for e in examples(tokenizer)]
    longest = max(len(e.input_ids) for e in encoded)
    groups = plan_micro_batches(encoded, 2 * longest)
    assert sorted(e.example.example_id for g in groups for e in g) == sorted(e.example.example_id for e in encoded)
    assert all(len(g) * max(len(e.input_ids) for e in g) <= 2 * longest for g in groups)
    batch = collate(groups[0], pad_id=0, device=torch.device("cpu"))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()


def test_replay_buffer_caps_reuse_size_and_duplicates() -> None:
    made = [Example(example_id=f"e{i}", method="stand", task_id="t", prompt="p", completion="c") for i in range(5)]
    buffer = ReplayBuffer(capacity=3, max_reuse=3, seed=1)
    for example in made + made[-1:]:  # the last one twice: held once, its use count unchanged
        buffer.add(example)
    assert len(buffer) == 3 and "e0" not in buffer and "e1" not in buffer  # the oldest are evicted
    state = json.loads(json.dumps(buffer.state()))
    draws = [e.example_id for _ in range(10) for e in buffer.sample(3)]
    assert sorted(set(draws)) == ["e2", "e3", "e4"]
    assert all(draws.count(i) == 2 for i in set(draws))  # first training + 2 replays = max_reuse
    assert len(buffer) == 0
    restored = ReplayBuffer(capacity=3, max_reuse=3)
    restored.load_state(state)
    assert [e.example_id for _ in range(10) for e in restored.sample(3)] == draws  # same items, same generator


def test_completion_only_loss_matches_transformers(student_model, tmp_path, tokenizer) -> None:
    trainer = LoraTrainer(make_config(), student_model, tmp_path)
    encoded = [encode(e, tokenizer, "completion", 1024) for e in examples(tokenizer)[:2]]
    batch = collate(encoded, trainer.pad_id, trainer.device)
    with torch.no_grad():
        ours = trainer.loss_sum(batch) / (batch["labels"][:, 1:] != IGNORE).sum()
        reference = trainer.model(**batch).loss
    assert torch.allclose(ours, reference, rtol=1e-4), (ours, reference)


@pytest.mark.slow
def test_loss_falls_and_versions_publish_atomically(student_model, tmp_path, tokenizer, monkeypatch) -> None:
    trainer = LoraTrainer(make_config(), student_model, tmp_path)
    fixed = examples(tokenizer)
    losses = []
    for _ in range(12):
        trainer.add(fixed)  # the same four examples again: ids are new for the trainer's de-duplication
        trainer.seen.clear()
        losses.append(trainer.train_step())
        if trainer.publish_due():
            trainer.publish()
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses  # it learns
    assert published_versions(tmp_path / "adapters") == list(range(1, 7))
    meta = json.loads((tmp_path / "adapters" / "v0006" / "adapter_version.json").read_text())
    assert meta["version"] == 6 and meta["step"] == 12 and len(meta["example_ids"]) == 8

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(student_model),
                                       tmp_path / "adapters" / "v0006")
    batch = collate([encode(fixed[0], tokenizer, "completion", 1024)], 0, torch.device("cpu"))
    trainer.model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, trainer.model(**batch).logits, atol=1e-4)

    # A crash while writing a version leaves nothing a reader would pick up, and the number stays free.
    def crash(*args, **kwargs):
        Path(args[0], "adapter_model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer.model, "save_pretrained", crash)
    trainer.add(fixed)
    trainer.seen.clear()
    trainer.train_step()
    with pytest.raises(KeyboardInterrupt):
        trainer.publish()
    assert published_versions(tmp_path / "adapters") == list(range(1, 7))
    assert not (tmp_path / "adapters" / "v0007").exists()
    assert not [p for p in (tmp_path / "adapters").iterdir() if p.name.startswith(".")]
    with pytest.raises(AdapterNotReadyError):
        check_published(7, tmp_path / "adapters" / "v0007")


@pytest.mark.slow
def test_resume_continues_versions_optimizer_and_curve(student_model, tmp_path, tokenizer) -> None:
    config = make_config(replay_fraction=0.5, batch_examples=2)
    first = LoraTrainer(config, student_model, tmp_path)
    fixed = examples(tokenizer)
    first.add(fixed)
    while first.train_step() is not None:  # 2 fresh, then 1 fresh + 1 replayed per step
        pass
    steps = first.stats.train_steps
    first.publish()
    first.add([fixed[0].model_copy(update={"example_id": "pending"})])
    replay_held = len(first.replay)
    first.save_checkpoint()
    next_loss = first.train_step()  # what the uninterrupted trainer does next

    resumed = LoraTrainer(config, student_model, tmp_path)  # killed here: resumed from the checkpoint
    assert resumed.version == 1 and resumed.stats.train_steps == steps == 3
    assert [e.example_id for e in resumed.fresh] == ["pending"] and len(resumed.replay) == replay_held > 0
    state_a = first.optimizer.state_dict()["state"]
    state_b = resumed.optimizer.state_dict()["state"]
    assert state_b and all(state_b[k]["step"] == steps for k in state_b) and len(state_a) == len(state_b)
    assert resumed.train_step() == pytest.approx(next_loss, rel=1e-4)  # the same curve, step for step
    assert resumed.publish().version == 2


def test_a_version_published_after_the_checkpoint_is_continued_not_trained_again(student_model, tmp_path,
                                                                                 tokenizer) -> None:
    config = make_config(replay_fraction=0.5, batch_examples=2)
    first = LoraTrainer(config, student_model, tmp_path)
    fixed = examples(tokenizer)
    first.add(fixed)
    while first.train_step() is not None:
        pass
    first.publish()
    first.add([fixed[0].model_copy(update={"example_id": "pending"})])
    first.save_checkpoint()
    first.train_step()
    second = first.publish()  # after the checkpoint: its step must not be taken, nor published, again

    resumed = LoraTrainer(config, student_model, tmp_path)
    assert resumed.version == 2 and resumed.stats.train_steps == second.step
    assert resumed.fresh == [] and "pending" in resumed.seen
    saved = {k: v for k, v in first.model.state_dict().items() if "lora_" in k}
    assert all(torch.equal(resumed.model.state_dict()[k], v) for k, v in saved.items())  # v2's weights
    resumed.add([fixed[1].model_copy(update={"example_id": "new"})])
    assert resumed.train_step() is not None and resumed.publish().version == 3
    after = resumed.model.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in saved.items())  # v3 differs from v2
    assert fresh_per_version(config.trainer) == 1 * config.trainer.publish_every_steps


@pytest.mark.slow
def test_stale_and_duplicate_examples_are_dropped(student_model, tmp_path, tokenizer) -> None:
    config = make_config(publish_every_steps=1)
    config.max_staleness = 1
    trainer = LoraTrainer(config, student_model, tmp_path)
    trainer.version = 3
    old = examples(tokenizer, version=1)  # 3 - 1 > 1: stale
    recent = examples(tokenizer, version=2)
    trainer.add(old + recent + recent[:1])
    assert trainer.train_step() is not None
    assert trainer.stats.stale_dropped == 4 and trainer.stats.examples_trained == 4
    trainer.train_step()
    assert trainer.stats.duplicates_dropped == 1
    published = trainer.publish()
    assert published.version == 4 and published.example_ids == [e.example_id for e in recent]
    assert json.loads(Path(published.path, "adapter_version.json").read_text())["staleness_max"] == 1


@pytest.mark.slow
def test_trainer_actor_streams_from_a_ray_queue(student_model, tmp_path, tokenizer) -> None:
    import ray
    from ray.util.queue import Queue

    from persd_online.trainer import start_trainer

    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        queue = Queue(maxsize=16)
        actor = start_trainer(make_config(batch_examples=2), student_model, tmp_path, queue)
        running = actor.run.remote()
        for example in examples(tokenizer, version=0):
            queue.put(example)
        deadline = time.monotonic() + 300
        while ray.get(actor.stats.remote())["train_steps"] < 2 and time.monotonic() < deadline:
            time.sleep(1)
        stats = ray.get(actor.stop.remote())
        ray.get(running)
        assert stats["train_steps"] == 2 and stats["examples_trained"] == 4 and stats["version"] == 1
        assert stats["loss"] > 0 and stats["train_tokens_per_s"] > 0
        assert published_versions(tmp_path / "adapters") == [1]
        # A second actor over the same directory resumes; stopping with one example pending trains it in a
        # last step and publishes it, so nothing handed to the trainer is lost.
        ray.kill(actor)
        actor = start_trainer(make_config(batch_examples=2), student_model, tmp_path, queue)
        assert ray.get(actor.stats.remote())["train_steps"] == 2
        running = actor.run.remote()
        queue.put(examples(tokenizer, version=1)[0].model_copy(update={"example_id": "new"}))
        while queue.qsize():
            time.sleep(0.5)
        stats = ray.get(actor.stop.remote(), timeout=300)
        ray.get(running, timeout=60)
        assert stats["train_steps"] == 3 and stats["version"] == 2
        assert published_versions(tmp_path / "adapters") == [1, 2]
        assert json.loads((tmp_path / "checkpoints" / "trainer.json").read_text())["latest"]
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_resume_does_not_republish_steps_a_newer_version_holds(student_model, tmp_path, tokenizer) -> None:
    first = LoraTrainer(make_config(), student_model, tmp_path)
    first.add(examples(tokenizer))
    first.train_step()
    first.save_checkpoint()  # one step not yet published ...
    first.publish()  # ... then published as v1 before the crash
    resumed = LoraTrainer(make_config(), student_model, tmp_path)
    assert resumed.version == 1 and resumed.pending_steps() == 0 and not resumed.publish_due()

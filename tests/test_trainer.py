"""The streaming LoRA trainer on the real SmolLM2-135M checkpoint, on CPU (fp32)."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest
import torch

from persd_online import adapters
from persd_online.adapters import AdapterNotReadyError, check_published, published_versions
from persd_online.batching import IGNORE, collate, encode, plan_micro_batches
from persd_online.config import Config
from persd_online.formats import stand_examples
from persd_online.records import Example
from persd_online.tasks import load_mbpp
from persd_online.trainer import LoraTrainer, fresh_per_version, setup_process

TASKS = load_mbpp("train")[:4]


def make_config(**trainer: object) -> Config:
    settings = {"batch_examples": 4, "replay_fraction": 0.0, "lr": 1e-3, "warmup_steps": 0,
                "publish_every_steps": 2, "torch_threads": 2, "cpu_cores": None,
                "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}
    return Config.model_validate({"student": {"prompt_format": "completion"}, "trainer": settings | trainer})


def make_trainer(config: Config, model: Path, root: Path) -> LoraTrainer:
    """A trainer as a training process starts one: process-wide settings first (the seed fixes the LoRA init)."""
    setup_process(config.trainer)
    return LoraTrainer(config, model, root)


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


def test_completion_only_loss_matches_transformers(student_model, tmp_path, tokenizer) -> None:
    learner = make_trainer(make_config(), student_model, tmp_path).learner
    encoded = [encode(e, tokenizer, "completion", 1024) for e in examples(tokenizer)[:2]]
    batch = collate(encoded, learner.pad_id, learner.device)
    with torch.no_grad():
        ours = learner.loss_sum(batch) / (batch["labels"][:, 1:] != IGNORE).sum()
        reference = learner.model(**batch).loss
    assert torch.allclose(ours, reference, rtol=1e-4), (ours, reference)


@pytest.mark.slow
def test_loss_falls_and_versions_publish_atomically(student_model, tmp_path, tokenizer, monkeypatch) -> None:
    trainer = make_trainer(make_config(), student_model, tmp_path)
    fixed = examples(tokenizer)
    losses = []
    for _ in range(12):
        trainer.add(fixed)  # the same four examples again: ids are new for the trainer's de-duplication
        trainer.examples.seen.clear()
        losses.append(trainer.train_step())
        if trainer.publish_due():
            trainer.publish()
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses  # it learns
    assert published_versions(tmp_path / "adapters") == list(range(1, 7))
    meta = adapters.read_metadata(adapters.version_dir(tmp_path / "adapters", 6))
    assert meta["version"] == 6 and meta["step"] == 12 and len(meta["example_ids"]) == 8
    steps = trainer.report()["recent_steps"]  # the stage timeline's trainer row: one interval per step, in order
    assert len(steps) == 12 and all(a < b <= c < d for (a, b), (c, d) in itertools.pairwise(steps))

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(student_model),
                                       adapters.version_dir(tmp_path / "adapters", 6))
    batch = collate([encode(fixed[0], tokenizer, "completion", 1024)], 0, torch.device("cpu"))
    trainer.learner.model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, trainer.learner.model(**batch).logits, atol=1e-4)

    # A crash while writing a version leaves nothing a reader would pick up, and the number stays free.
    def crash(*args, **kwargs):
        Path(args[0], "adapter_model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer.learner.model, "save_pretrained", crash)
    trainer.add(fixed)
    trainer.examples.seen.clear()
    trainer.train_step()
    with pytest.raises(KeyboardInterrupt):
        trainer.publish()
    assert published_versions(tmp_path / "adapters") == list(range(1, 7))
    assert not adapters.version_dir(tmp_path / "adapters", 7).exists()
    assert not [p for p in (tmp_path / "adapters").iterdir() if p.name.startswith(".")]
    with pytest.raises(AdapterNotReadyError):
        check_published(7, adapters.version_dir(tmp_path / "adapters", 7))


@pytest.mark.slow
def test_resume_continues_versions_optimizer_and_curve(student_model, tmp_path, tokenizer) -> None:
    config = make_config(replay_fraction=0.5, batch_examples=2)
    first = make_trainer(config, student_model, tmp_path)
    fixed = examples(tokenizer)
    first.add(fixed)
    while first.train_step() is not None:  # 2 fresh, then 1 fresh + 1 replayed per step
        pass
    steps = first.stats.train_steps
    first.publish()
    first.add([fixed[0].model_copy(update={"example_id": "pending"})])
    replay_held = len(first.examples.replay)
    first.save_checkpoint()
    next_loss = first.train_step()  # what the uninterrupted trainer does next

    resumed = make_trainer(config, student_model, tmp_path)  # killed here: resumed from the checkpoint
    assert resumed.version == 1 and resumed.stats.train_steps == steps == 3
    assert [e.example_id for e in resumed.examples.fresh] == ["pending"]
    assert len(resumed.examples.replay) == replay_held > 0
    state_a = first.learner.optimizer.state_dict()["state"]
    state_b = resumed.learner.optimizer.state_dict()["state"]
    assert state_b and all(state_b[k]["step"] == steps for k in state_b) and len(state_a) == len(state_b)
    assert resumed.train_step() == pytest.approx(next_loss, rel=1e-4)  # the same curve, step for step
    assert resumed.publish().version == 2


def test_a_version_published_after_the_checkpoint_is_continued_not_trained_again(student_model, tmp_path,
                                                                                 tokenizer) -> None:
    config = make_config(replay_fraction=0.5, batch_examples=2)
    first = make_trainer(config, student_model, tmp_path)
    fixed = examples(tokenizer)
    first.add(fixed)
    while first.train_step() is not None:
        pass
    first.publish()
    first.add([fixed[0].model_copy(update={"example_id": "pending"})])
    first.save_checkpoint()
    first.train_step()
    second = first.publish()  # after the checkpoint: its step must not be taken, nor published, again

    resumed = make_trainer(config, student_model, tmp_path)
    assert resumed.version == 2 and resumed.stats.train_steps == second.step
    assert resumed.examples.fresh == [] and "pending" in resumed.examples.seen
    saved = {k: v for k, v in first.learner.model.state_dict().items() if "lora_" in k}
    assert all(torch.equal(resumed.learner.model.state_dict()[k], v) for k, v in saved.items())  # v2's weights
    resumed.add([fixed[1].model_copy(update={"example_id": "new"})])
    assert resumed.train_step() is not None and resumed.publish().version == 3
    after = resumed.learner.model.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in saved.items())  # v3 differs from v2
    assert fresh_per_version(config.trainer) == 1 * config.trainer.publish_every_steps


@pytest.mark.slow
def test_stale_and_duplicate_examples_are_dropped(student_model, tmp_path, tokenizer) -> None:
    config = make_config(publish_every_steps=1, stale_labels="drop")
    config.max_staleness = 1
    trainer = make_trainer(config, student_model, tmp_path)
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
    assert adapters.read_metadata(published.path)["staleness_max"] == 1


@pytest.mark.slow
def test_stale_verified_labels_go_to_replay_by_default(student_model, tmp_path, tokenizer) -> None:
    config = make_config(publish_every_steps=1, replay_fraction=0.5)
    trainer = make_trainer(config, student_model, tmp_path)
    trainer.version = 3
    old = [e.model_copy(update={"example_id": f"old-{e.example_id}"})  # 3 - 1 > max_staleness: kept for replay
           for e in examples(tokenizer, version=1)]
    trainer.add(old + examples(tokenizer, version=3))
    assert trainer.train_step() is not None
    assert (trainer.stats.stale_dropped, trainer.stats.stale_replayed) == (0, len(old))
    assert all(e.example_id in trainer.examples.replay for e in old)


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
        made = examples(tokenizer, version=0)
        for example in [*made, *(e.model_copy(update={"example_id": f"more-{e.example_id}"}) for e in made[:2])]:
            queue.put(example)
        # a colocated training phase: it ends with the step that publishes (2 steps of 2), though a third is ready
        stats = ray.get(actor.train.remote(wait_s=5.0, until_publish=True), timeout=300)
        assert stats["train_steps"] == 2 and stats["examples_trained"] == 4 and stats["version"] == 1
        assert stats["loss"] > 0 and stats["train_tokens_per_s"] > 0 and stats["ready"]
        # a disaggregated turn: every ready step; the third is not due to publish
        stats = ray.get(actor.train.remote(wait_s=0.0), timeout=300)
        assert (stats["train_steps"], stats["version"], stats["ready"]) == (3, 1, False)
        assert published_versions(tmp_path / "adapters") == [1]
        stats = ray.get(actor.finish.remote(), timeout=300)  # the unpublished step becomes a version
        assert (stats["train_steps"], stats["version"]) == (3, 2)
        # A second actor over the same directory resumes; finishing with one example pending trains it in a
        # last step and publishes it, so nothing handed to the trainer is lost.
        ray.kill(actor)
        actor = start_trainer(make_config(batch_examples=2), student_model, tmp_path, queue)
        assert ray.get(actor.stats.remote())["train_steps"] == 3
        queue.put(examples(tokenizer, version=1)[0].model_copy(update={"example_id": "new"}))
        stats = ray.get(actor.finish.remote(), timeout=300)
        assert stats["train_steps"] == 4 and stats["version"] == 3
        assert published_versions(tmp_path / "adapters") == [1, 2, 3]
        assert json.loads((tmp_path / "checkpoints" / "trainer.json").read_text())["latest"]
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_resume_does_not_republish_steps_a_newer_version_holds(student_model, tmp_path, tokenizer) -> None:
    first = make_trainer(make_config(), student_model, tmp_path)
    first.add(examples(tokenizer))
    first.train_step()
    first.save_checkpoint()  # one step not yet published ...
    first.publish()  # ... then published as v1 before the crash
    resumed = make_trainer(make_config(), student_model, tmp_path)
    assert resumed.version == 1 and resumed.pending_steps() == 0 and not resumed.publish_due()

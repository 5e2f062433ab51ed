"""The student's bookkeeping over a scripted engine: attempts, markers, the delivery rule, eviction, env."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from persd_online import adapters
from persd_online.adapters import AdapterNotReadyError
from persd_online.config import StudentConfig
from persd_online.engine import Generation, Sampling, engine_env
from persd_online.prompts import CHAT_STOP, COMPLETION_STOP, extract_program
from persd_online.records import Example
from persd_online.student import (
    DELIVERY_ATOL,
    AdapterDeliveryError,
    Student,
    VersionNotLoadedError,
    logprob_delta,
    write_zero_adapter,
)
from persd_online.tasks import Task

TASKS = [
    Task(task_id="t/add", prompt="Return the sum of a and b.", entry_point="add",
         tests=["assert add(1, 2) == 3"], header="def add(a, b):"),
    Task(task_id="t/neg", prompt="Return -x.", entry_point="neg", tests=["assert neg(1) == -1"],
         header="def neg(x):"),
]
CHAT_ANSWER = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."


class ScriptedEngine:
    """A `GenerationEngine` whose probe log-probs follow each adapter's `effect` (zero adapter: 0)."""

    def __init__(self, text: str = CHAT_ANSWER, lists_new_adapters: bool = True) -> None:
        self.text = text
        self.lists_new_adapters = lists_new_adapters
        self.effects: dict[int, float] = {}
        self.calls: list[Any] = []
        self.loses_adapters_at_wake = False

    def metrics(self) -> dict[str, float]:
        return {}

    def generate(self, prompts: Sequence[Sequence[int]], versions: Sequence[int], n: int,
                 sampling: Sampling) -> list[list[Generation]]:
        self.calls.append(([list(p) for p in prompts], list(versions), n, sampling))
        return [[Generation(self.text, v, len(p), 7, "stop") for _ in range(n)]
                for p, v in zip(prompts, versions, strict=True)]

    def add_adapter(self, version: int, path: Path) -> None:
        meta = adapters.read_metadata(path)
        self.effects[version] = meta["effect"] if meta is not None else 0.0

    def remove_adapter(self, version: int) -> None:
        del self.effects[version]

    def adapters(self) -> set[int]:
        return set(self.effects) if self.lists_new_adapters else {0}

    def prompt_logprobs(self, prompts: Sequence[Sequence[int]], version: int | None) -> list[list[float]]:
        return [[-1.0 - self.effects[version or 0]] * (len(ids) - 1) for ids in prompts]

    def sleep(self) -> None:
        self.calls.append("sleep")

    def wake_up(self) -> None:
        self.calls.append("wake")
        if self.loses_adapters_at_wake:  # vLLM #53888: a wake-up that silently dropped the LoRA state
            self.effects = dict.fromkeys(self.effects, 0.0)

    def shutdown(self) -> None:
        self.effects.clear()


def publish(root: Path, version: int, effect: float, marker: bool = True) -> Path:
    path = adapters.version_dir(root, version)
    path.mkdir(parents=True)
    (path / adapters.VERSION_FILE).write_text(json.dumps({"version": version, "effect": effect}))
    if marker:
        (path / adapters.MARKER).write_text("")
    return path


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory) -> Path:
    """Shared by the module's students, so the zero adapter is built once."""
    return tmp_path_factory.mktemp("student")


def make_student(student_model, work_dir, engine=None, **overrides) -> Student:
    return Student(StudentConfig(**overrides), student_model, work_dir, engine or ScriptedEngine())


def test_delivery_rule_is_the_largest_logprob_change_against_a_tolerance():
    assert logprob_delta([-1.0, -2.0], [-1.0, -2.5]) == 0.5
    assert logprob_delta([-1.0, -2.0], [-1.0, -2.0]) == 0.0 <= DELIVERY_ATOL
    assert logprob_delta([-1.0], [-1.0 - 2 * DELIVERY_ATOL]) > DELIVERY_ATOL
    with pytest.raises(ValueError, match="different or zero length"):
        logprob_delta([-1.0], [-1.0, -2.0])


def test_zero_adapter_has_zero_weights_on_every_projection_and_is_reused(student_model, work_dir):
    path = write_zero_adapter(student_model, work_dir / "zero")
    weights = load_file(path / "adapter_model.safetensors")
    config = json.loads((path / "adapter_config.json").read_text())
    assert adapters.is_published(path) and weights and all(not t.any() for t in weights.values())
    assert set(config["target_modules"]) >= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"}
    stamp = (path / "adapter_model.safetensors").stat().st_mtime_ns
    assert write_zero_adapter(student_model, work_dir / "zero") == path
    assert (path / "adapter_model.safetensors").stat().st_mtime_ns == stamp


def test_chat_attempts_carry_version_program_and_token_counts(student_model, work_dir):
    engine = ScriptedEngine()
    student = make_student(student_model, work_dir, engine)
    attempts = student.generate(TASKS, n=2)
    assert [(a.task_id, a.sample_index) for a in attempts] == [("t/add", 0), ("t/add", 1), ("t/neg", 0),
                                                                ("t/neg", 1)]
    assert len({a.attempt_id for a in attempts}) == 4
    assert all(a.attempt_id.startswith(f"{a.task_id}#v0#") and a.attempt_id.endswith(f"#{a.sample_index}")
               for a in attempts)
    assert all(a.adapter_version == 0 and a.prompt_format == "chat" and a.completion_tokens == 7
               for a in attempts)
    assert attempts[0].program == "def add(a, b):\n    return a + b\n"
    prompts, versions, n, sampling = engine.calls[-1]
    assert versions == [0, 0] and n == 2 and sampling.stop == CHAT_STOP and sampling.max_tokens == 256
    rendered = student.tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    assert student.tokenizer.decode(prompts[0]).startswith(rendered.split("x")[0])  # the chat template, once
    assert attempts[0].prompt_tokens == len(prompts[0])


def test_completion_format_stops_at_the_function_end_and_cuts_the_body(student_model, work_dir):
    body = "    return a + b\nprint(add(1, 2))\n"
    engine = ScriptedEngine(text=body)
    student = make_student(student_model, work_dir, engine, prompt_format="completion")
    [attempt] = student.generate(TASKS[:1], n=1)
    assert engine.calls[-1][3].stop == COMPLETION_STOP
    assert attempt.program == extract_program(TASKS[0], body, "completion")
    assert attempt.program.endswith('"""\n    return a + b\n') and "print" not in attempt.program


def test_a_version_without_its_marker_is_refused(student_model, work_dir, tmp_path):
    engine = ScriptedEngine()
    student = make_student(student_model, work_dir, engine)
    with pytest.raises(AdapterNotReadyError, match="no COMPLETE marker"):
        student.load_adapter(1, publish(tmp_path, 1, effect=0.5, marker=False))
    assert student.loaded_versions() == [0] and set(engine.effects) == {0}


def test_an_adapter_without_effect_or_not_listed_is_not_delivered(student_model, work_dir, tmp_path):
    engine = ScriptedEngine()
    student = make_student(student_model, work_dir, engine)
    report = student.load_adapter(1, publish(tmp_path, 1, effect=0.5))
    assert report.logprob_delta == pytest.approx(0.5) and report.loaded_versions == (0, 1)
    with pytest.raises(AdapterDeliveryError, match="changed no probe log-prob"):
        student.load_adapter(2, publish(tmp_path, 2, effect=0.5))  # the same weights as version 1
    assert student.latest_version() == 1 and set(engine.effects) == {0, 1}

    deaf = ScriptedEngine(lists_new_adapters=False)
    student = make_student(student_model, work_dir, deaf)
    with pytest.raises(AdapterDeliveryError, match="does not list it"):
        student.load_adapter(3, publish(tmp_path, 3, effect=0.9))
    assert student.loaded_versions() == [0] and set(deaf.effects) == {0}


def test_a_wake_up_rechecks_delivery_and_refuses_an_engine_that_lost_its_adapter(student_model, work_dir, tmp_path):
    engine = ScriptedEngine()
    student = make_student(student_model, work_dir, engine)
    student.sleep()
    assert student.wake_up() == 0.0  # version 0 only: nothing to lose
    student.load_adapter(1, publish(tmp_path, 1, effect=0.5))
    student.sleep()
    assert student.wake_up() == pytest.approx(0.5)
    engine.loses_adapters_at_wake = True
    student.sleep()
    with pytest.raises(AdapterDeliveryError, match="after waking up, adapter version 1 no longer changes the probe"):
        student.wake_up()
    assert [c for c in engine.calls if isinstance(c, str)] == ["sleep", "wake"] * 3


def test_the_last_max_loras_versions_and_version_0_are_held(student_model, work_dir, tmp_path):
    engine = ScriptedEngine()
    student = make_student(student_model, work_dir, engine, max_loras=2)
    for version in (1, 2, 3):
        student.load_adapter(version, publish(tmp_path, version, effect=version / 10))
    assert student.loaded_versions() == [0, 2, 3] and set(engine.effects) == {0, 2, 3}
    student.generate_prompts(["a", "b", "c"], Sampling(), version=[0, 2, 3])
    assert engine.calls[-1][1] == [0, 2, 3]
    with pytest.raises(VersionNotLoadedError, match=r"versions \[1\] are not loaded"):
        student.generate(TASKS, version=1)


def test_versions_only_go_forward_and_must_match_their_directory(student_model, work_dir, tmp_path):
    student = make_student(student_model, work_dir)
    with pytest.raises(ValueError, match="not newer"):
        student.load_adapter(0, publish(tmp_path, 0, effect=0.5))
    with pytest.raises(ValueError, match="says version 5"):
        student.load_adapter(6, publish(tmp_path, 5, effect=0.5))


def test_engine_env_sets_the_cpu_settings_only_for_an_in_process_cpu_engine(monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    cpu = engine_env(StudentConfig(cpu_kvcache_gib=1.5))
    assert cpu == {"RAY_AUTH_MODE": "disabled", "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "0",
                   "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    unbound = engine_env(StudentConfig(cpu_cores=None))
    assert "VLLM_CPU_OMP_THREADS_BIND" not in unbound
    assert engine_env(StudentConfig(cpu_cores=[6, 0, 1, 2, 3]))["VLLM_CPU_OMP_THREADS_BIND"] == "0-3,6"
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert engine_env(StudentConfig.model_validate({"resources": {"num_gpus": 1}, "serving": "lora"})) == {
        "RAY_AUTH_MODE": "token"}
    # merged on a GPU: vLLM's engine core runs in its own process and gets the reload function pickled
    assert engine_env(StudentConfig.model_validate({"resources": {"num_gpus": 1}})) == {
        "RAY_AUTH_MODE": "token", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}


class PositionEngine(ScriptedEngine):
    """Log-prob of each position: -(its index), so a mean over the last k positions is known."""

    def prompt_logprobs(self, prompts: Sequence[Sequence[int]], version: int | None) -> list[list[float]]:
        self.calls.append(("prompt_logprobs", len(prompts)))
        return [[-float(i) for i in range(1, len(ids))] for ids in prompts]


def test_completion_logprobs_average_the_completion_tokens_only(student_model, work_dir):
    student = make_student(student_model, work_dir, PositionEngine())
    example = Example(example_id="e", method="persd", task_id="t", prompt="Write add.", completion="def add(a, b):")
    prompt = len(student.tokenizer(example.prompt).input_ids)
    completion = len(student.tokenizer(example.completion, add_special_tokens=False).input_ids)
    longer = example.model_copy(update={"completion": "def add(a, b):\n    return a + b"})
    mean, _ = student.completion_logprobs([example, longer], 0)
    positions = range(prompt, prompt + completion)  # the completion's tokens: positions prompt .. end - 1
    assert mean == pytest.approx(-sum(positions) / completion)
    assert student.engine.calls[-1] == ("prompt_logprobs", 2)  # both in one engine call


def test_the_engine_progress_bar_takes_what_vllm_gives_a_tqdm_bar():
    # vLLM's LLM.generate(use_tqdm=factory) calls factory(total=, desc=, dynamic_ncols=, postfix=), then reads
    # format_dict["elapsed"], sets postfix, updates and closes it
    from persd_online.engine import EngineProgress

    bar = functools.partial(EngineProgress, title="evaluating v0 on mbpp:test")(
        total=3, desc="Processed prompts", dynamic_ncols=True, postfix="est. speed input: 0.00 toks/s")
    for _ in range(3):
        assert bar.format_dict["elapsed"] > 0
        bar.postfix = "est. speed output: 1.00 toks/s"
        bar.update(1)
    bar.refresh()
    bar.close()
    state = bar._get_state()
    assert (state["desc"], state["x"], state["total"], state["closed"]) == ("evaluating v0 on mbpp:test", 3, 3, True)

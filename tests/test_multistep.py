"""Multi-step (PERsD two-step) evaluation: seen tests only reach the student, hidden tests score every step,
and the equal-budget resampling baseline. Fast tests use a scripted student and a recording executor; the slow
one runs the real student, sandbox and CLI on two MBPP tasks."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from persd_online.engine import Generation, Sampling
from persd_online.multistep import evaluate, table
from persd_online.records import Attempt, Verdict
from persd_online.tasks import Task

SEEN = ["assert f(1) == 1"]
HIDDEN = ["assert f(1) == 1", "assert f(2) == 4", "assert f(3) == 9"]
TASKS = [
    Task(task_id="a", prompt="Square x.", entry_point="f", tests=HIDDEN, seen_tests=SEEN),
    Task(task_id="b", prompt="Square x (no seen tests).", entry_point="f", tests=HIDDEN),
]


class RecordingExecutor:
    """Passes a program on a test list if the program says it passes them; records every call's tests."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str], str]] = []

    async def run(self, task: Task, program: str, subject_id: str) -> Verdict:
        self.calls.append((subject_id, list(task.tests), program))
        hidden = task.tests == HIDDEN
        passed = "GOOD" in program or ("SEEN_ONLY" in program and not hidden)
        return Verdict(subject_id=subject_id, status="passed" if passed else "failed", passed=passed,
                       feedback="" if passed else f"Input: f(1) Output: 0 Expected: 1 [{len(task.tests)} tests]",
                       duration_s=0.0)


class ScriptedStudent:
    """First attempts from a script per (task, sample); every refinement answers GOOD."""

    def __init__(self, script: dict[str, list[str]]) -> None:
        self.script = script
        self.refine_prompts: list[str] = []

    def generate(self, tasks, n=None, sampling=None, version=None):
        return [Attempt(attempt_id=f"{t.task_id}#{i}", task_id=t.task_id, sample_index=i, adapter_version=0,
                        prompt_format="chat", completion="", program=self.script[t.task_id][i],
                        prompt_tokens=1, completion_tokens=1)
                for t in tasks for i in range(n)]

    def generate_prompts(self, prompts, sampling, n=1, version=None):
        self.refine_prompts += [p[0]["content"] for p in prompts]
        return [[Generation(text="```python\ndef f(x):\n    return x * x  # GOOD\n```", version=0,
                            prompt_tokens=1, completion_tokens=1, finish_reason="stop")] for _ in prompts]


def run(student, executor, n=2, k=1):
    return asyncio.run(evaluate(student, executor, TASKS, n=n, sampling=Sampling(temperature=0.8), refine_steps=k,
                                fmt="chat"))


def test_refinement_sees_only_seen_tests_and_every_step_is_scored_on_hidden_tests():
    # task a: sample 0 fails everything, sample 1 passes the seen test only; samples 2, 3 are the
    # baseline's extra draws (fail, pass). Task b has no seen tests: never refined.
    student = ScriptedStudent({"a": ["BAD", "SEEN_ONLY", "BAD", "GOOD"], "b": ["BAD", "BAD", "BAD", "BAD"]})
    executor = RecordingExecutor()
    result = run(student, executor)

    # only the sample of a that failed its seen test was refined (b has none, a#1 passed its seen test)
    assert result.refined_by_step == [1]
    assert len(student.refine_prompts) == 1
    prompt = student.refine_prompts[0]
    assert "BAD" in prompt and "[1 tests]" in prompt  # its own code and the seen-test feedback
    assert "[3 tests]" not in prompt  # never the hidden tests' feedback
    # seen-test runs used the seen tests only, and only for task a
    seen_calls = [c for c in executor.calls if c[1] == SEEN]
    assert seen_calls and all(c[0].startswith("a#") for c in seen_calls)
    # a: step 0 = 0/2 pass hidden; step 1 = a#0 refined to GOOD -> 1/2; b: 0/2 throughout
    assert result.pass1_by_step == [0.0, 0.25]
    assert result.pass_at_k == {1: 0.0, 2: 0.0}
    assert result.per_task["a"]["steps"] == [[False, False], [True, False]]
    # baseline: 4 samples per task; a has 1 hidden pass -> pass@2 = 1 - C(3,2)/C(4,2) = 0.5; b 0
    assert result.baseline_samples_per_task == 4
    assert result.baseline_pass_at_k == pytest.approx(0.25)
    # seen-selection baseline: a: chunk [BAD, SEEN_ONLY] -> SEEN_ONLY (fails hidden); [BAD, GOOD] -> GOOD
    assert result.baseline_seen_select_pass1 == pytest.approx(0.25)
    data = json.loads(json.dumps(result.to_json()))
    assert data["pass1_by_step"] == [0.0, 0.25] and data["kind"] == "eval"
    table(result)  # renders


def test_no_refine_steps_is_plain_one_step_pass_at_k():
    student = ScriptedStudent({"a": ["GOOD", "BAD"], "b": ["BAD", "BAD"]})
    result = run(student, RecordingExecutor(), n=2, k=0)
    assert result.pass1_by_step == [0.25]
    assert result.pass_at_k[2] == pytest.approx(0.5)
    assert result.baseline_pass_at_k is None and student.refine_prompts == []


@pytest.mark.slow
def test_eval_cli_two_step_on_the_real_student(student_model, tmp_path):
    out = tmp_path / "eval.json"
    cmd = [sys.executable, "-m", "persd_online", "eval", "--tasks", "mbpp:test", "--limit", "2", "--n", "1",
           "--temperature", "0", "--refine-steps", "1", "--max-tokens", "48", "--out", str(out),
           "--set", "student.max_model_len=1024", "--set", "student.cpu_kvcache_gib=1",
           "--set", f"runs_dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["n_tasks"] == 2 and result["refine_steps"] == 1 and len(result["pass1_by_step"]) == 2
    assert result["baseline_samples_per_task"] == 2 and result["baseline_pass_at_k"] is not None
    assert result["tasks_with_seen_tests"] == 2
    assert "pass@1 after refine step 1" in proc.stdout


def test_greedy_samples_are_generated_once_and_repeated():
    student = ScriptedStudent({"a": ["SEEN_ONLY"], "b": ["BAD"]})
    result = asyncio.run(evaluate(student, RecordingExecutor(), TASKS, n=1, sampling=Sampling(temperature=0),
                                  refine_steps=2, fmt="chat"))
    assert result.baseline_samples_per_task == 3
    assert result.baseline_pass_at_k == 0.0 and result.pass1_by_step == [0.0, 0.0, 0.0]

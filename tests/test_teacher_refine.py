"""Verified refinement: rounds, the offline reference oracle, and the teacher as a real Ray actor.

`SubprocessExecutor` is a test helper standing in for the sandbox (persd_online.verify.Executor): it runs
a program and a task's assert lines in a fresh interpreter with a timeout. It isolates nothing and must
never run untrusted code outside tests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time

import pytest
import ray
from openai_stub_server import Reply, StubOpenAIServer

from persd_online.cascade import build_tier, start_teacher_actor
from persd_online.config import OpenAITier, OracleTier, TeacherConfig
from persd_online.records import Attempt, Verdict
from persd_online.tasks import Task
from persd_online.teacher import (
    ReferenceOracle,
    TeacherConfigError,
    refine_and_verify,
)

TASK = Task(task_id="t/add", prompt="Return the sum of a and b.", entry_point="add",
            tests=["assert add(1, 2) == 3", "assert add(-1, 1) == 0"],
            reference="def add(a, b):\n    return a + b\n")
WRONG = "def add(a, b):\n    return a - b\n"
STILL_WRONG = "def add(a, b):\n    return abs(a) + b\n"

_RUNNER = r"""
import ast, json, sys
job = json.loads(sys.stdin.read())
scope = {}

def verdict(status, feedback=""):
    print(json.dumps({"status": status, "feedback": feedback}))
    sys.exit(0)

try:
    exec(job["setup"] + "\n" + job["program"], scope)
except Exception as exc:
    verdict("error", f"{type(exc).__name__}: {exc}")
for test in job["tests"]:
    node = ast.parse(test).body[0]
    try:
        if isinstance(node, ast.Assert) and isinstance(node.test, ast.Compare) and len(node.test.ops) == 1:
            call, expected = ast.unparse(node.test.left), ast.unparse(node.test.comparators[0])
            got, want = eval(call, scope), eval(expected, scope)
            if got != want:
                verdict("failed", f"Input: {call}\nOutput: {got!r}\nExpected: {want!r}")
        else:
            exec(test, scope)
    except AssertionError:
        verdict("failed", f"Failed: {test}")
    except Exception as exc:
        verdict("error", f"{type(exc).__name__}: {exc}")
verdict("passed")
"""


class SubprocessExecutor:
    """Test helper: runs `program` and the task's assert lines in a fresh interpreter (no isolation)."""

    def __init__(self, timeout_s: float = 20.0) -> None:
        self.timeout_s = timeout_s

    async def run(self, task: Task, program: str, subject_id: str) -> Verdict:
        assert isinstance(task.tests, list), "the helper runs assert-line tests only"
        start = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _RUNNER, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        job = json.dumps({"program": program, "setup": task.setup, "tests": task.tests}).encode()
        try:
            out, _ = await asyncio.wait_for(proc.communicate(job), self.timeout_s)
            result = json.loads(out)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            result = {"status": "timeout", "feedback": f"Timeout: no result within {self.timeout_s} s"}
        return Verdict(subject_id=subject_id, status=result["status"], passed=result["status"] == "passed",
                       feedback=result["feedback"], duration_s=time.monotonic() - start)


def fenced(code: str) -> str:
    return f"```python\n{code}```"


def attempt_and_verdict(program: str = WRONG) -> tuple[Attempt, Verdict]:
    attempt = Attempt(attempt_id="a-1", task_id=TASK.task_id, sample_index=0, adapter_version=3,
                      prompt_format="chat", completion=fenced(program), program=program,
                      prompt_tokens=30, completion_tokens=20)
    return attempt, asyncio.run(SubprocessExecutor().run(TASK, program, attempt.attempt_id))


def openai_config(server: StubOpenAIServer, **overrides) -> OpenAITier:
    fields = dict(base_url=server.base_url, model=server.model, api_key_env="PERSD_TEST_UNSET",
                  backoff_initial_s=0.01, max_retries=1)
    return OpenAITier(**(fields | overrides))


def test_executor_helper_reports_persd_feedback():
    attempt, verdict = attempt_and_verdict()
    assert (verdict.status, verdict.passed) == ("failed", False)
    assert verdict.feedback == "Input: add(1, 2)\nOutput: -1\nExpected: 3"
    crash = asyncio.run(SubprocessExecutor().run(TASK, "def add(a, b):\n    return a / 0\n", "x"))
    assert (crash.status, crash.feedback) == ("error", "ZeroDivisionError: division by zero")


def test_failing_refinement_gets_another_round_with_its_new_feedback(tmp_path):
    attempt, verdict = attempt_and_verdict()
    with StubOpenAIServer() as server:
        server.script(Reply(content=fenced(STILL_WRONG)))  # round 1 fails, round 2 (default reply) passes
        teacher = build_tier(openai_config(server, refine_rounds=1), tmp_path)
        outcome = asyncio.run(refine_and_verify(teacher, SubprocessExecutor(), TASK, attempt, verdict, 1))
    first, second = outcome.rounds
    assert (first.refinement.round, first.verdict.passed) == (1, False)
    assert first.verdict.feedback == "Input: add(-1, 1)\nOutput: 2\nExpected: 0"
    assert (second.refinement.round, second.verdict.passed) == (2, True)
    assert outcome.verified == second.refinement
    assert first.refinement.refinement_id != second.refinement.refinement_id
    round_two_prompt = server.requests[1]["messages"][-1]["content"]
    assert STILL_WRONG.strip() in round_two_prompt and first.verdict.feedback in round_two_prompt


def test_no_label_when_every_round_fails(tmp_path):
    attempt, verdict = attempt_and_verdict()
    with StubOpenAIServer(default=Reply(content=fenced(STILL_WRONG))) as server:
        teacher = build_tier(openai_config(server), tmp_path)
        outcome = asyncio.run(refine_and_verify(teacher, SubprocessExecutor(), TASK, attempt, verdict, 0))
    assert len(outcome.rounds) == 1 and outcome.verified is None
    assert len(server.requests) == 1


def test_only_failing_attempts_are_refined():
    attempt, _ = attempt_and_verdict()
    passed = Verdict(subject_id=attempt.attempt_id, status="passed", passed=True, feedback="", duration_s=0.1)
    oracle = ReferenceOracle(OracleTier())
    with pytest.raises(ValueError, match="failing verdict"):
        asyncio.run(refine_and_verify(oracle, SubprocessExecutor(), TASK, attempt, passed, 1))


def test_reference_oracle_is_loud_and_returns_the_reference(caplog):
    caplog.set_level(logging.WARNING, logger="persd_online.teacher")
    attempt, verdict = attempt_and_verdict()
    oracle = build_tier(OracleTier())
    assert "ORACLE baseline, NOT PERsD" in caplog.text
    outcome = asyncio.run(refine_and_verify(oracle, SubprocessExecutor(), TASK, attempt, verdict, 2))
    assert len(outcome.rounds) == 1 and outcome.verified.program == TASK.reference
    assert outcome.verified.teacher_kind == "reference_oracle"
    broken = TASK.model_copy(update={"tests": ["assert add(1, 2) == 4"]})  # the reference fails its own data
    hopeless = asyncio.run(refine_and_verify(oracle, SubprocessExecutor(), broken, attempt, verdict, 2))
    assert len(hopeless.rounds) == 1 and hopeless.verified is None  # one answer: no repeated rounds
    no_reference = TASK.model_copy(update={"reference": None})
    unfixable = asyncio.run(
        refine_and_verify(oracle, SubprocessExecutor(), no_reference, attempt, verdict, 2))
    assert unfixable.rounds == [] and unfixable.verified is None
    summary = oracle.describe()
    assert summary["kind"] == "reference_oracle" and "oracle, not PERsD" in summary["model"]
    assert (summary["calls"], summary["prompt_tokens"], summary["cost_usd"]) == (2, 0, 0.0)


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    # Workers cannot import this test module: ship the executor helper by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()


def test_teacher_runs_as_a_ray_actor(ray_cluster, tmp_path):
    attempt, verdict = attempt_and_verdict()
    with StubOpenAIServer() as server:
        cfg = TeacherConfig(tiers=[openai_config(server, price_per_completion_token=0.5)])
        actor = start_teacher_actor(cfg, tmp_path, SubprocessExecutor())
        outcome = ray.get(actor.refine.remote(TASK, attempt, verdict), timeout=60)
        again = ray.get(actor.refine.remote(TASK, attempt, verdict), timeout=60)
        summary = ray.get(actor.describe.remote(), timeout=30)
        state = ray.get(actor.state.remote(), timeout=30)
        ray.kill(actor)
        assert len(server.requests) == 1
    label = f"openai:{server.model}"
    assert state[label]["teacher"]["cost_usd"] == summary["cost_usd"] == 2.5
    assert outcome.verified.program == TASK.reference and again.verified.cached
    paid = summary["tiers"][label]["teacher"]
    assert (paid["calls"], paid["cache_hits"]) == (1, 1) and summary["calls"] == 2  # two refinements, one paid


def test_config_error_crosses_the_actor_boundary(ray_cluster, tmp_path):
    attempt, verdict = attempt_and_verdict()
    with StubOpenAIServer() as server:
        cfg = TeacherConfig(tiers=[openai_config(server, model="missing")])
        actor = start_teacher_actor(cfg, tmp_path, SubprocessExecutor())
        with pytest.raises(TeacherConfigError, match="HTTP 404"):
            ray.get(actor.refine.remote(TASK, attempt, verdict), timeout=60)
        ray.kill(actor)
    assert len(server.requests) == 1

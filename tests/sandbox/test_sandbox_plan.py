"""Calls answered ahead (``sandbox.plan``): which calls are planned, and that a plan never changes a verdict."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from sandbox import Job, SandboxPool, Status, TestSuite
from sandbox import judge as judge_module
from sandbox.checks import compile_suite
from sandbox.isolation import IsolationConfig
from sandbox.job import Limits
from sandbox.judge import Judge
from sandbox.zygote_handle import ZygoteHandle

# A program with state: each call's answer depends on the calls before it, so a call run out of turn shows.
COUNTER = "calls = []\ndef f(x):\n    calls.append(x)\n    return x + len(calls)\n"
IN_TURN = TestSuite("f", ("assert f(5) == 6", "assert f(6) == 8"))


def planned_args(suite: TestSuite) -> list[tuple]:
    return [pickle.loads(request)[2:] for request in compile_suite(suite).planned]


def test_literal_calls_are_planned_up_to_the_first_step_that_is_not_one() -> None:
    check = ("def check(candidate):\n"
             "    assert candidate([1, 2], k=3) == 3\n"
             "    import math\n"  # mentions no program name: makes no request, planning goes on
             "    assert abs(candidate(-1.5) - 2) < 1e-6\n"
             "    for x in range(3):\n"  # a loop: the plan ends here
             "        assert candidate(x) == x\n"
             "    assert candidate(9) == 9\n")
    assert planned_args(TestSuite("g", check)) == [(([1, 2],), {"k": 3}), ((-1.5,), {})]


@pytest.mark.parametrize("test", [
    "assert f(x) == 1",  # not a literal argument
    "assert f(1) == f(2)",  # two calls in one step
    "assert f(1).real == 1",  # an attribute of the answer: one more request on a stand-in
    "assert True or f(1)",  # may not run at all
    "assert [f(i) for i in (1, 2)] == [1, 2]",  # runs more than once
    "y = f(1)",  # not an assert
])
def test_calls_the_tests_might_not_make_exactly_so_are_not_planned(test: str) -> None:
    assert planned_args(TestSuite("f", (test, "assert f(7) == 7"), setup="x = 1")) == []


def test_nothing_is_planned_when_setup_code_talks_to_the_program() -> None:
    assert planned_args(TestSuite("f", ("assert f(1) == 1",), setup="f(0)")) == []


def test_planned_calls_answer_in_turn(pool: SandboxPool) -> None:
    assert planned_args(IN_TURN) == [((5,), {}), ((6,), {})]
    assert pool.run(COUNTER, IN_TURN).status is Status.PASSED
    assert pool.run(COUNTER.replace("len(calls)", "len(calls) + 1"), IN_TURN).feedback == \
        "Input: 5 Output: 7 Expected: 6"


def test_a_request_off_the_plan_runs_the_job_again_unplanned(monkeypatch: pytest.MonkeyPatch) -> None:
    # A plan the tests do not follow: the job answers f(99) ahead; taken for f(5)'s answer, it would be 100.
    wrong = dataclasses.replace(compile_suite(IN_TURN), planned=(
        pickle.dumps(("call", 0, (99,), {}), protocol=pickle.HIGHEST_PROTOCOL),))
    monkeypatch.setattr(judge_module, "compile_suite", lambda suite: wrong)
    zygote = ZygoteHandle(Limits(timeout=5.0), IsolationConfig(), "plan-test")
    zygote.start()
    judge = Judge(Limits(timeout=5.0), zygote)
    try:
        result = judge.execute(Job(COUNTER, IN_TURN), attempts=2)
    finally:
        judge.stop()
    assert result.status is Status.PASSED, result.feedback
    assert result.attempts == 1  # not a harness failure

"""The batching executors: same-tick calls become one batch, failures become `sandbox_error` verdicts.

Fast: a scripted pool and scripted actors stand in for `sandbox.SandboxPool` and the sandbox Ray actors.
"""

from __future__ import annotations

import asyncio
import pickle
import threading

import pytest

from persd_online.executor import PoolExecutor, SandboxExecutor
from persd_online.offline import PoolExecutor as OfflinePoolExecutor
from persd_online.tasks import Task
from sandbox.job import Job
from sandbox.result import Result, Status

TASK = Task(task_id="add", prompt="Add two numbers.", entry_point="add", tests=("assert add(1, 2) == 3",),
            seen_tests=("assert add(0, 0) == 0",))


def scripted(job: Job) -> Result:
    """Passes a program that says PASS; fails the rest, naming the suite's first test."""
    if "PASS" in job.program:
        return Result(status=Status.PASSED, feedback="", tests=(), duration_s=0.01)
    return Result(status=Status.FAILED, feedback=f"failed: {job.suite.tests[0]}", tests=(), duration_s=0.01)


class ScriptedPool:
    """`SandboxPool.run_batch` stand-in; records each batch and the thread it ran in."""

    def __init__(self, error: Exception | None = None, drop_one: bool = False) -> None:
        self.batches: list[list[Job]] = []
        self.threads: list[int] = []
        self.error = error
        self.drop_one = drop_one

    def run_batch(self, jobs: list[Job]) -> list[Result]:
        self.batches.append(list(jobs))
        self.threads.append(threading.get_ident())
        if self.error is not None:
            raise self.error
        results = [scripted(job) for job in jobs]
        return results[1:] if self.drop_one else results


class _Remote:
    def __init__(self, actor: ScriptedActor) -> None:
        self.actor = actor

    def remote(self, jobs: list[Job]):
        return self.actor.call(jobs)


class ScriptedActor:
    """A sandbox actor handle stand-in: `actor.run_batch.remote(jobs)` is awaitable; picklable."""

    def __init__(self, name: str, fail: bool = False) -> None:
        self.name = name
        self.fail = fail
        self.batches: list[int] = []

    @property
    def run_batch(self) -> _Remote:
        return _Remote(self)

    async def call(self, jobs: list[Job]) -> list[Result]:
        self.batches.append(len(jobs))
        if self.fail:
            raise ConnectionError(f"actor {self.name} died")
        return [scripted(job) for job in jobs]


async def score(executor, programs: list[str]):
    return await asyncio.gather(*(executor.run(TASK, program, f"s{i}") for i, program in enumerate(programs)))


def test_offline_path_uses_the_one_pool_executor():
    assert OfflinePoolExecutor is PoolExecutor


def test_same_tick_calls_become_one_batch_in_a_thread():
    pool = ScriptedPool()
    verdicts = asyncio.run(score(PoolExecutor(pool), ["PASS", "fail", "PASS"]))
    assert [len(batch) for batch in pool.batches] == [3]
    assert pool.threads[0] != threading.get_ident()
    assert [(v.subject_id, v.passed, v.status) for v in verdicts] == [
        ("s0", True, "passed"), ("s1", False, "failed"), ("s2", True, "passed")]
    # Scored on the hidden tests, never the seen ones.
    assert verdicts[1].feedback == "failed: assert add(1, 2) == 3"
    assert all(list(job.suite.tests) == TASK.tests and job.suite.entry_point == "add" for job in pool.batches[0])


def test_calls_in_later_ticks_form_later_batches():
    pool = ScriptedPool()
    executor = PoolExecutor(pool)

    async def staggered():
        first = asyncio.ensure_future(score(executor, ["PASS", "PASS"]))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        second = await score(executor, ["fail"])
        return await first, second

    first, second = asyncio.run(staggered())
    assert [len(batch) for batch in pool.batches] == [2, 1]
    assert [v.passed for v in first] == [True, True] and not second[0].passed


@pytest.mark.parametrize(("pool", "reason"), [
    (ScriptedPool(error=RuntimeError("the sandbox pool is closed")), "the sandbox pool is closed"),
    (ScriptedPool(drop_one=True), "2 results for 3 jobs"),
])
def test_a_failed_batch_is_sandbox_error_verdicts_not_an_exception(pool, reason):
    verdicts = asyncio.run(score(PoolExecutor(pool), ["PASS", "PASS", "fail"]))
    assert all(v.status == "sandbox_error" and not v.passed for v in verdicts)
    assert verdicts[0].feedback == f"sandbox error: {reason}"


def test_sandbox_executor_spreads_a_batch_over_the_actors_round_robin():
    actors = [ScriptedActor("a"), ScriptedActor("b"), ScriptedActor("c")]
    executor = SandboxExecutor(actors, timeout_s=1.0)
    verdicts = asyncio.run(score(executor, ["PASS"] * 7))
    assert [a.batches for a in actors] == [[3], [3], [1]]
    assert [v.subject_id for v in verdicts] == [f"s{i}" for i in range(7)] and all(v.passed for v in verdicts)
    asyncio.run(score(executor, ["PASS"]))  # the next batch goes to the next actor
    assert [a.batches for a in actors] == [[3, 1], [3], [1]]


def test_a_lost_actor_fails_only_its_part():
    actors = [ScriptedActor("a"), ScriptedActor("b", fail=True)]
    verdicts = asyncio.run(score(SandboxExecutor(actors, timeout_s=1.0), ["PASS"] * 4))
    assert [v.status for v in verdicts] == ["passed", "passed", "sandbox_error", "sandbox_error"]
    assert verdicts[2].feedback == "sandbox unavailable: actor b died"


def test_sandbox_executor_pickles_without_its_batching_state():
    executor = SandboxExecutor([ScriptedActor("a")], timeout_s=2.5)
    asyncio.run(score(executor, ["PASS"]))
    copy = pickle.loads(pickle.dumps(executor))
    assert copy.timeout_s == 2.5 and copy._pending == [] and copy._next_actor == 0
    assert asyncio.run(score(copy, ["fail"]))[0].status == "failed"


def test_sandbox_executor_needs_an_actor():
    with pytest.raises(ValueError, match="at least one sandbox actor"):
        SandboxExecutor([], timeout_s=1.0)

"""The loop's roles on small fakes of the actors (no Ray, no engine): what happens to work under way when the
run stops, and which version a generation asks for after the student restarted. Both rules were found by
end-to-end runs (a label the teacher verified but the loop never counted; attempts of version 0 after a
restart); these tests find them in a second. The real stack (Ray actors, vLLM, sandbox, HTTP teacher, peft
trainer) runs the same roles in tests/test_loop_e2e.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import ray

from persd_online.config import load_config
from persd_online.loop import Actors, OnlineLoop
from persd_online.records import Attempt, Refinement, Verdict
from persd_online.run_dir import RunDir, read_jsonl
from persd_online.tasks import Task
from persd_online.verify import RefinementOutcome, VerifiedRound

TASK = Task(task_id="t0", prompt="def f():\n    \"\"\"One.\"\"\"\n", entry_point="f", tests=["assert f() == 1"],
            reference="def f():\n    return 1\n")


class Method:
    """`handle.method.remote(...)` of a Ray actor handle, over a coroutine function."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def remote(self, *args: Any) -> Any:
        return self.fn(*args)


class Queue:
    def __init__(self) -> None:
        self.items: list[Any] = []

    async def put_async(self, item: Any, timeout: float | None = None) -> None:
        self.items.append(item)

    def qsize(self) -> int:
        return len(self.items)


def _attempt(version: int = 0) -> Attempt:
    return Attempt(attempt_id="t0/0/0", task_id="t0", sample_index=0, adapter_version=version,
                   prompt_format="completion", completion="    return 2\n", program="def f():\n    return 2\n",
                   prompt_tokens=1, completion_tokens=1)


def _verdict(subject: str, passed: bool) -> Verdict:
    return Verdict(subject_id=subject, status="passed" if passed else "failed", passed=passed, feedback="",
                   duration_s=0.0)


def _outcome(attempt: Attempt) -> RefinementOutcome:
    ref = Refinement(refinement_id="r0", attempt_id=attempt.attempt_id, task_id="t0", round=1, teacher_kind="stub",
                     teacher_call_id="c0", program="def f():\n    return 1\n", prompt_tokens=3, completion_tokens=2)
    return RefinementOutcome(attempt_id=attempt.attempt_id, task_id="t0",
                             rounds=[VerifiedRound(refinement=ref, verdict=_verdict("r0", True))])


def _loop(tmp_path: Path, teacher: Any = None, student: Any = None) -> tuple[OnlineLoop, Queue]:
    config = load_config(None, [f"runs_dir={tmp_path}", "name=roles", "student.prompt_format=completion",
                                "method=persd"])
    examples = Queue()
    actors = Actors(student=student, teacher=teacher, trainer=None, evaluator=None, executor=None,
                    examples=examples, tokenizer=None)
    return OnlineLoop(config, RunDir.create(config), [TASK], actors), examples


def test_a_refinement_under_way_when_the_run_stops_is_finished_and_counted(tmp_path: Path) -> None:
    async def refine(task: Task, attempt: Attempt, verdict: Verdict) -> RefinementOutcome:
        await asyncio.sleep(0.3)  # the run stops meanwhile
        return _outcome(attempt)

    async def logprobs(pair: list, version: int) -> tuple[float, float]:
        return -1.0, -2.0

    teacher = type("Teacher", (), {"refine": Method(refine)})()
    student = type("Student", (), {"completion_logprobs": Method(logprobs)})()
    loop, examples = _loop(tmp_path, teacher, student)

    async def scenario() -> None:
        [pick] = loop.ledger.admit()  # two samples of t0, both failed
        attempts = [_attempt().model_copy(update={"attempt_id": f"t0/{i}/{i}", "sample_index": i}) for i in (0, 1)]
        for failure in loop.ledger.scored(attempts, [_verdict(a.attempt_id, False) for a in attempts]):
            loop.refine_queue.put_nowait(failure)
        refiner = asyncio.create_task(loop._refine())
        await asyncio.sleep(0.1)
        loop._finish("test")
        await asyncio.wait_for(refiner, 5.0)  # it returns by itself once its call is done

    asyncio.run(scenario())
    assert loop.ledger.counts["refinements_verified"] == 1  # the call under way, not the one still queued
    assert len(examples.items) == 1
    assert loop.refine_queue.qsize() == 1
    events = [e["kind"] for e in read_jsonl(loop.run_dir.root / "events.jsonl")]
    assert events.count("refinement") == 1 and events.count("example") == 1


def test_an_idle_refiner_returns_when_the_run_stops(tmp_path: Path) -> None:
    loop, _ = _loop(tmp_path)

    async def scenario() -> None:
        refiner = asyncio.create_task(loop._refine())
        await asyncio.sleep(0.05)
        loop._finish("test")
        await asyncio.wait_for(refiner, 1.0)

    asyncio.run(scenario())


def test_a_generation_retried_after_a_restart_asks_for_the_version_given_back(tmp_path: Path) -> None:
    asked: list[int] = []
    loaded: list[int] = []

    async def generate(tasks: list[Task], n: int, sampling: Any, version: int) -> list[Attempt]:
        asked.append(version)
        if len(asked) == 1:
            loop.ledger.served(3)  # a swap lands while the first call is under way, then the student dies
            raise ray.exceptions.RayActorError()
        loop._finish("test")
        return [_attempt(version).model_copy(update={"attempt_id": f"{t.task_id}/0/9"}) for t in tasks]

    async def latest_version() -> int:
        return 0  # restarted: it serves version 0 only

    async def load_adapter(version: int, path: str) -> None:
        loaded.append(version)

    class Executor:
        async def run(self, task: Task, program: str, subject_id: str) -> Verdict:
            return _verdict(subject_id, True)

    student = type("Student", (), {"generate": Method(generate), "latest_version": Method(latest_version),
                                   "load_adapter": Method(load_adapter)})()
    loop, _ = _loop(tmp_path, student=student)
    loop.actors.executor = Executor()
    asyncio.run(asyncio.wait_for(loop._generate(), 5.0))
    assert asked == [0, 3] and loaded == [3]
    attempts = [e for e in read_jsonl(loop.run_dir.root / "events.jsonl") if e["kind"] == "attempt"]
    assert attempts and {e["version"] for e in attempts} == {3}


@pytest.fixture(autouse=True)
def _no_ray_init(monkeypatch: pytest.MonkeyPatch) -> None:
    """These fakes need no cluster; fail loudly if the loop tried to start one."""
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("the loop started Ray"))

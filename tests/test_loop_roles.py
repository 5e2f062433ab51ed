"""The loop's roles on small fakes of the actors (no Ray, no engine): what happens to work under way when the
run stops, and which version a generation asks for after the student restarted. Both rules were found by
end-to-end runs (a label the teacher verified but the loop never counted; attempts of version 0 after a
restart); these tests find them in a second. Under the colocated scheduler: a teacher outage during a training
phase, and a student restart during a generation phase. The real stack (Ray actors, vLLM, sandbox, HTTP
teacher, peft trainer) runs the same roles in tests/test_loop_e2e.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import ray

from persd_online import loop as loop_module
from persd_online.config import load_config
from persd_online.loop import Actors, OnlineLoop
from persd_online.records import Attempt, Refinement, Verdict
from persd_online.run_dir import RunDir, read_jsonl
from persd_online.scheduler import ColocatedScheduler, ConcurrentScheduler
from persd_online.tasks import Task
from persd_online.teacher import TeacherUnavailable
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


def _loop(tmp_path: Path, teacher: Any = None, student: Any = None, trainer: Any = None,
          scheduler: Any = ConcurrentScheduler) -> tuple[OnlineLoop, Queue]:
    config = load_config(None, [f"runs_dir={tmp_path}", "name=roles", "student.prompt_format=completion",
                                "method=persd"])
    examples = Queue()
    actors = Actors(student=student, teacher=teacher, trainer=trainer, evaluator=None, executor=None,
                    examples=examples, tokenizer=None)
    return OnlineLoop(config, RunDir.create(config), [TASK], actors, scheduler=scheduler), examples


def _trainer_stats(version: int = 0) -> dict[str, Any]:
    """`TrainerActor.train`'s report after a turn that left nothing to train."""
    return {"examples_trained": 8, "train_steps": 2, "stale_dropped": 0, "stale_replayed": 0,
            "duplicates_dropped": 0, "fresh_pending": 0, "ready": False, "busy_s": 1.0, "recent_steps": [],
            "version": version, "loss": 1.0, "train_tokens_per_s": 10.0}


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


def test_colocated_a_teacher_outage_during_a_training_phase_pauses_refinement_not_training(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loop_module, "OUTAGE_BACKOFF_S", (0.1, 0.1))
    phases_at_teacher_calls: list[str] = []
    trained: list[tuple[float, float]] = []

    async def refine(task: Task, attempt: Attempt, verdict: Verdict) -> RefinementOutcome:
        phases_at_teacher_calls.append(loop.scheduler.phase)
        if len(phases_at_teacher_calls) == 1:
            raise TeacherUnavailable("HTTP 503")
        return _outcome(attempt)

    async def logprobs(pair: list, version: int) -> tuple[float, float]:
        return -1.0, -2.0

    async def train(wait_s: float, until_publish: bool) -> dict[str, Any]:
        start = asyncio.get_running_loop().time()
        await asyncio.sleep(0.6)  # the outage and the retry happen meanwhile
        trained.append((start, asyncio.get_running_loop().time()))
        loop._finish("test")
        return _trainer_stats()

    teacher = type("Teacher", (), {"refine": Method(refine)})()
    student = type("Student", (), {"completion_logprobs": Method(logprobs)})()
    trainer = type("Trainer", (), {"train": Method(train)})()
    loop, examples = _loop(tmp_path, teacher, student, trainer, ColocatedScheduler)

    async def scenario() -> None:
        loop.ledger.backlog = loop.ledger.settings.examples_per_version  # a version's worth waits: train
        [pick] = loop.ledger.admit()
        attempts = [_attempt().model_copy(update={"attempt_id": "t0/0/0"})]
        for failure in loop.ledger.scored(attempts, [_verdict("t0/0/0", False)]):
            loop.refine_queue.put_nowait(failure)
        training = asyncio.create_task(loop._train())
        await asyncio.sleep(0.05)  # the training phase has begun
        assert loop.scheduler.phase == "train"
        await asyncio.wait_for(asyncio.gather(training, loop._refine()), 5.0)

    asyncio.run(scenario())
    assert phases_at_teacher_calls == ["train", "train"]  # the outage and the retry, both inside the phase
    assert len(trained) == 1 and loop.ledger.counts["refinements_verified"] == 1 and len(examples.items) == 1
    events = [e["kind"] for e in read_jsonl(loop.run_dir.root / "events.jsonl")]
    assert "teacher_outage" in events


def test_colocated_a_student_restart_during_a_generation_phase_finishes_before_training(tmp_path: Path) -> None:
    spans: dict[str, list[float]] = {"generation": [], "training": []}
    asked: list[int] = []
    loaded: list[int] = []

    async def generate(tasks: list[Task], n: int, sampling: Any, version: int) -> list[Attempt]:
        now = asyncio.get_running_loop().time
        spans["generation"].append(now())
        asked.append(version)
        await asyncio.sleep(0.2)  # meanwhile a training turn becomes due and asks for the cores
        if len(asked) == 1:
            raise ray.exceptions.RayActorError()
        spans["generation"].append(now())
        loop._finish("test")
        return [_attempt(version).model_copy(update={"attempt_id": f"{t.task_id}/0/9"}) for t in tasks]

    async def latest_version() -> int:
        return 0  # restarted: it serves version 0 only

    async def load_adapter(version: int, path: str) -> None:
        await asyncio.sleep(0.1)
        loaded.append(version)

    async def train(wait_s: float, until_publish: bool) -> dict[str, Any]:
        spans["training"].append(asyncio.get_running_loop().time())
        await asyncio.sleep(0.01)
        return _trainer_stats()

    class Executor:
        async def run(self, task: Task, program: str, subject_id: str) -> Verdict:
            return _verdict(subject_id, True)

    student = type("Student", (), {"generate": Method(generate), "latest_version": Method(latest_version),
                                   "load_adapter": Method(load_adapter)})()
    trainer = type("Trainer", (), {"train": Method(train)})()
    loop, _ = _loop(tmp_path, student=student, trainer=trainer, scheduler=ColocatedScheduler)
    loop.actors.executor = Executor()
    loop.ledger.served(2)  # the student served version 2 before it died

    async def scenario() -> None:
        generating = asyncio.create_task(loop._generate())
        await asyncio.sleep(0.05)
        loop.ledger.backlog = loop.ledger.settings.examples_per_version  # training becomes due mid-generation
        await asyncio.wait_for(asyncio.gather(generating, loop._train()), 5.0)

    asyncio.run(scenario())
    assert asked == [2, 2] and loaded == [2]  # the restart was handled inside the generation phase
    assert len(spans["training"]) == 1 and spans["training"][0] >= spans["generation"][-1]  # no overlap


@pytest.fixture(autouse=True)
def _no_ray_init(monkeypatch: pytest.MonkeyPatch) -> None:
    """These fakes need no cluster; fail loudly if the loop tried to start one."""
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("the loop started Ray"))

"""The placements' schedulers without Ray: the colocated phase policy, phase switching, that generation and
training compute never overlap, and the GPU engine's sleep/wake sequencing (against a fake engine: CI has no
GPU). The loop's roles under the colocated scheduler are in tests/test_loop_roles.py; the real stack in the
colocated placement in tests/test_loop_e2e.py."""

from __future__ import annotations

import asyncio
import random

import pytest

from persd_online.metrics import LoopMetrics
from persd_online.phase_gate import PhaseGate, passing
from persd_online.scheduler import ColocatedScheduler, ConcurrentScheduler, colocated_training_due
from persd_online.timeline import PHASE_STAGE
from tests.test_ledger import _attempts, _cycle, _ledger, _stats


def _metrics() -> LoopMetrics:
    return LoopMetrics(export_to_ray=False)


class Clock:
    """Records each turn's (stage, start, end) on the event loop's clock."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, float, float]] = []

    async def work(self, scheduler, stage: str, seconds: float) -> None:
        async with scheduler.turn(stage):
            start = asyncio.get_running_loop().time()
            await asyncio.sleep(seconds)
            self.spans.append((stage, start, asyncio.get_running_loop().time()))


def _overlap(a: tuple[str, float, float], b: tuple[str, float, float]) -> bool:
    return a[1] < b[2] and b[1] < a[2]


# --- the phase policy -----------------------------------------------------------------------------------------
def test_training_is_due_at_a_version_worth_of_examples() -> None:
    ledger = _ledger(n_tasks=20, samples=2, per_batch=1, staleness=1, per_version=4)  # gate: (1 + 1) * 4 = 8
    assert not colocated_training_due(ledger)  # nothing waits
    _cycle(ledger)  # one task: 2 attempts failed, refined, 2 examples handed over
    assert ledger.backlog == 2 and ledger.can_admit()
    assert not colocated_training_due(ledger)  # under a version's worth, and the student may generate
    _cycle(ledger)
    assert ledger.backlog == 4 and ledger.can_admit() and colocated_training_due(ledger)


def test_training_is_due_under_a_version_worth_when_the_student_cannot_generate() -> None:
    ledger = _ledger(n_tasks=20, samples=2, per_batch=1, staleness=0, per_version=4)  # gate: 4 attempts
    _cycle(ledger)  # 2 examples wait
    attempts, verdicts = _attempts(ledger, ledger.admit())  # 2 more attempts in flight (not refined yet)
    ledger.scored(attempts, verdicts)
    assert ledger.backlog == 2 and not ledger.can_admit()  # the gate is full
    assert colocated_training_due(ledger)
    # the trainer took what it could and cannot fill a step: no second, empty training phase
    ledger.trainer_reported(_stats(trained=0, steps=0, fresh_pending=2, ready=False), queued=0)
    assert ledger.starved and not colocated_training_due(ledger)


def test_no_training_phase_when_nothing_waits_even_if_generation_is_blocked() -> None:
    ledger = _ledger(n_tasks=1, samples=2, per_batch=1)
    attempts, verdicts = _attempts(ledger, ledger.admit())  # the only task is in flight
    ledger.scored(attempts, verdicts)
    assert not ledger.can_admit() and ledger.backlog == 0 and not colocated_training_due(ledger)


def test_the_disaggregated_trainer_is_always_due() -> None:
    assert ConcurrentScheduler(_metrics()).training_due(_ledger())


# --- turns and phases ---------------------------------------------------------------------------------------
def test_generation_and_training_turns_never_overlap_and_the_teacher_works_through_both() -> None:
    rng = random.Random(0)
    clock = Clock()
    scheduler = ColocatedScheduler(_metrics())

    async def scenario() -> None:
        jobs = []
        for _ in range(60):
            stage = rng.choice(["student", "student", "evaluator", "trainer", "teacher", "sandbox"])
            jobs.append(asyncio.create_task(clock.work(scheduler, stage, rng.uniform(0.001, 0.02))))
            await asyncio.sleep(rng.uniform(0, 0.005))
        await asyncio.gather(*jobs)

    asyncio.run(scenario())
    generation = [s for s in clock.spans if s[0] in ("student", "evaluator")]
    training = [s for s in clock.spans if s[0] == "trainer"]
    other = [s for s in clock.spans if s[0] in ("teacher", "sandbox")]
    assert len(generation) > 10 and len(training) >= 3
    assert not any(_overlap(g, t) for g in generation for t in training)
    assert not any(_overlap(a, b) for a in training for b in training if a is not b)  # one trainer turn at a time
    assert any(_overlap(g, h) for g in generation for h in generation if g is not h)  # generation turns share
    assert any(_overlap(o, t) for o in other for t in training)  # the teacher and sandbox work through training
    phases = [i for i in scheduler.metrics.take_intervals() if i["stage"] == PHASE_STAGE]
    assert phases  # the training phases are on the timeline


def test_a_trainer_turn_closes_the_generation_phase_to_new_turns() -> None:
    order: list[str] = []
    scheduler = ColocatedScheduler(_metrics())

    async def turn(stage: str, name: str, seconds: float) -> None:
        async with scheduler.turn(stage):
            order.append(f"{name} start")
            await asyncio.sleep(seconds)
            order.append(f"{name} end")

    async def scenario() -> None:
        first = asyncio.create_task(turn("student", "gen1", 0.05))
        await asyncio.sleep(0.01)
        train = asyncio.create_task(turn("trainer", "train", 0.05))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(turn("student", "gen2", 0.01))  # asks after the trainer: waits for it
        await asyncio.gather(first, train, second)

    asyncio.run(scenario())
    assert order == ["gen1 start", "gen1 end", "train start", "train end", "gen2 start", "gen2 end"]
    assert scheduler.phase == "generate"


class FakeEngine:
    """The student on a GPU: records the hand-overs; generation while asleep is a test failure."""

    def __init__(self, lose_weights_at_wake: int | None = None) -> None:
        self.calls: list[str] = []
        self.asleep = False
        self.lose_weights_at_wake = lose_weights_at_wake

    async def sleep(self) -> None:
        assert not self.asleep, "slept twice"
        self.calls.append("sleep")
        self.asleep = True

    async def wake_up(self) -> float:
        assert self.asleep, "woken while awake"
        self.calls.append("wake")
        self.asleep = False
        if self.calls.count("wake") == self.lose_weights_at_wake:
            raise RuntimeError("after waking up, adapter version 3 no longer changes the probe")  # the re-check
        return 0.5

    async def generate(self) -> None:
        assert not self.asleep, "generation on a sleeping engine"
        self.calls.append("generate")


def test_the_gpu_engine_sleeps_through_training_phases_and_wakes_checked_for_generation() -> None:
    engine = FakeEngine()
    scheduler = ColocatedScheduler(_metrics(), engine)

    async def generate() -> None:
        async with scheduler.turn("student"):
            await engine.generate()

    async def train() -> None:
        async with scheduler.turn("trainer"):
            assert engine.asleep
            engine.calls.append("train")

    async def scenario() -> None:
        await generate()
        await train()
        await train()  # a second training turn in a row: the engine stays asleep
        await asyncio.gather(generate(), generate())  # two generation turns, one wake-up
        await train()
        async with scheduler.turn("teacher"):  # the teacher does not wake the engine
            assert engine.asleep
        async with scheduler.turn("evaluator"):
            await engine.generate()

    asyncio.run(scenario())
    assert engine.calls == ["generate", "sleep", "train", "train", "wake", "generate", "generate", "sleep",
                            "train", "wake", "generate"]


def test_a_failed_wake_up_check_fails_the_turn_and_nothing_generates() -> None:
    engine = FakeEngine(lose_weights_at_wake=1)
    scheduler = ColocatedScheduler(_metrics(), engine)

    async def scenario() -> None:
        async with scheduler.turn("trainer"):
            pass
        with pytest.raises(RuntimeError, match="no longer changes the probe"):
            async with scheduler.turn("student"):
                await engine.generate()

    asyncio.run(scenario())
    assert "generate" not in engine.calls


# --- the phase gate (self-repairs, which the teacher asks of the student outside the loop's turns) ---------
def test_the_phase_gate_closes_after_the_repairs_under_way_and_holds_new_ones_until_it_opens() -> None:
    gate = PhaseGate()
    order: list[str] = []

    async def repair(name: str, seconds: float) -> None:
        async with passing(gate):
            order.append(f"{name} start")
            await asyncio.sleep(seconds)
            order.append(f"{name} end")

    async def scenario() -> None:
        under_way = asyncio.create_task(repair("r1", 0.05))
        await asyncio.sleep(0.01)
        await gate.close()  # a training phase starts: returns only once r1 is done
        order.append("closed")
        held = asyncio.create_task(repair("r2", 0.01))
        await asyncio.sleep(0.05)
        order.append("open")
        await gate.open()
        await asyncio.gather(under_way, held)
        with pytest.raises(ValueError, match="without a matching enter"):
            await gate.leave()

    asyncio.run(scenario())
    assert order == ["r1 start", "r1 end", "closed", "open", "r2 start", "r2 end"]

"""Placement of the loop's stages: when a stage may run its work on its resources.

The async shell (`loop.py`) wraps each unit of a stage's work in `async with scheduler.turn(stage)`; the
scheduler decides when that turn starts, and credits the time to the stage's busy clock (the dashboard's
`busy_fraction`). The trainer's role asks `training_due(ledger)` before each turn and runs it as `training`
says. A placement (`placement.py`) is a scheduler and nothing else: the loop does not change with it.

- `ConcurrentScheduler` (disaggregated placement): every actor has its own share of the machine
  (`*.resources.num_cpus`, `student.cpu_cores`, `trainer.cpu_cores`, or a GPU each), so every turn starts at
  once and the stages overlap; the trainer's turns follow one another, each waiting for examples.
- `ColocatedScheduler` (colocated placement): the student and the trainer share the same cores or GPU and take
  turns, in phases. A generation phase runs the student's and the evaluator's turns (they use the engine); a
  training phase runs one trainer turn. The teacher and the sandbox keep working through both phases.

Invariants: `turn` never raises for scheduling reasons; the busy time it credits is the time spent inside the
turn, so a stage's busy fraction never exceeds 1 for one turn at a time (the trainer's busy time is the
trainer's own report: its steps, not a turn's waits).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import AbstractAsyncContextManager, AbstractContextManager, asynccontextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from persd_online.ledger import Ledger
from persd_online.metrics import LoopMetrics
from persd_online.timeline import PHASE_STAGE

Stage = Literal["student", "sandbox", "teacher", "evaluator", "trainer"]
Phase = Literal["generate", "train"]
PHASE_OF: dict[str, Phase] = {"student": "generate", "evaluator": "generate", "trainer": "train"}


@dataclass(frozen=True)
class TrainingTurn:
    """How the trainer's role runs one turn (`TrainerActor.train`'s arguments)."""

    wait_s: float  # how long a turn waits for examples when no step is ready
    until_publish: bool  # end the turn with the step that publishes a version


class Scheduler(Protocol):
    """When a stage's unit of work may run."""

    training: TrainingTurn
    placement: str

    def turn(self, stage: Stage) -> AbstractAsyncContextManager[None]: ...

    def training_due(self, ledger: Ledger) -> bool: ...


class Engine(Protocol):
    """The student's side of the colocated hand-over (the driver's `Handover`): `sleep` when a training phase
    starts (no student work from outside the loop's turns, e.g. self-repairs, and on a GPU the engine asleep),
    `wake_up` when a generation phase starts (the engine awake, its delivery re-checked)."""

    def sleep(self) -> Awaitable[None]: ...

    def wake_up(self) -> Awaitable[Any]: ...


def _clock(metrics: LoopMetrics, stage: Stage) -> AbstractContextManager[None]:
    """A turn's busy clock: the stage's, except the trainer's, which the trainer reports itself (its steps)."""
    return metrics.busy(stage) if stage != "trainer" else nullcontext()


class ConcurrentScheduler:
    """Every stage on its own resources: turns start at once (see the module docstring)."""

    training = TrainingTurn(wait_s=0.5, until_publish=False)
    placement = "disaggregated"

    def __init__(self, metrics: LoopMetrics) -> None:
        self.metrics = metrics

    @asynccontextmanager
    async def turn(self, stage: Stage) -> AsyncIterator[None]:
        with _clock(self.metrics, stage):
            yield

    def training_due(self, ledger: Ledger) -> bool:
        """Always: the trainer has devices of its own, and a turn waits for examples itself."""
        return True


def colocated_training_due(ledger: Ledger) -> bool:
    """The colocated placement's phase policy, pure: train when a version's worth of examples waits at the
    trainer (its backlog reaches the fresh examples one version consumes), or when examples wait and the student
    has nothing it may generate (`Ledger.can_admit` is false: the staleness gate is full or no task is free);
    generate otherwise. Never when the trainer reported that it cannot fill a step with what it holds (it is
    starved until new examples arrive), so an empty training phase is never run twice in a row."""
    if ledger.backlog <= 0 or ledger.starved:
        return False
    return ledger.backlog >= ledger.settings.examples_per_version or not ledger.can_admit()


class ColocatedScheduler:
    """The student and the trainer take turns on the same cores or GPU (see the module docstring).

    Phases: a generation phase admits any number of student and evaluator turns at once; a training phase one
    trainer turn. A trainer turn that asks to start closes the generation phase to new turns, waits for the
    turns under way to end, then runs; generation resumes when it ends. The policy of when to train is
    `colocated_training_due`; a trainer turn publishes at most one version (`training.until_publish`), so a
    phase never holds the student back for more than one version's steps. The `engine` is told when a training
    phase starts (`sleep`) and when the next generation phase starts (`wake_up`).

    Invariant: a generation-phase turn and a training-phase turn never run at once.
    """

    training = TrainingTurn(wait_s=0.0, until_publish=True)
    placement = "colocated"

    def __init__(self, metrics: LoopMetrics, engine: Engine | None = None) -> None:
        self.metrics = metrics
        self.engine = engine
        self.phase: Phase = "generate"
        self._active = 0  # turns of the current phase under way
        self._train_waiting = 0  # trainer turns asking to start (new generation turns wait for them)
        self._changed = asyncio.Condition()
        self._phase_start = time.time()

    def training_due(self, ledger: Ledger) -> bool:
        return colocated_training_due(ledger)

    @asynccontextmanager
    async def turn(self, stage: Stage) -> AsyncIterator[None]:
        phase = PHASE_OF.get(stage)
        if phase is None:  # the teacher and the sandbox work through both phases
            with _clock(self.metrics, stage):
                yield
            return
        async with self._changed:
            self._train_waiting += phase == "train"
            try:
                await self._changed.wait_for(lambda: self._may_start(phase))
            finally:
                self._train_waiting -= phase == "train"
            if phase != self.phase:
                await self._switch(phase)
            self._active += 1
        try:
            with _clock(self.metrics, stage):
                yield
        finally:
            async with self._changed:
                self._active -= 1
                self._changed.notify_all()

    def _may_start(self, phase: Phase) -> bool:
        if phase == "train":
            return self._active == 0
        return self._train_waiting == 0 and (self.phase == "generate" or self._active == 0)

    async def _switch(self, phase: Phase) -> None:
        """Hand the device over (called with no turn under way)."""
        now = time.time()
        if self.phase == "train":
            self.metrics.interval(PHASE_STAGE, self._phase_start, now)
        if self.engine is not None:
            await (self.engine.sleep() if phase == "train" else self.engine.wake_up())
        self.phase, self._phase_start = phase, now

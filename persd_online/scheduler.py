"""Placement of the loop's stages: when a stage may run its work on its resources.

The async shell (`loop.py`) wraps each unit of a stage's work in `async with scheduler.turn(stage)`; the
scheduler decides when that turn starts, and credits the time to the stage's busy clock (the dashboard's
`busy_fraction`). A placement is a scheduler and nothing else: the loop does not change with it.

- `ConcurrentScheduler` (disaggregated placement, the default): every actor has its own share of the machine
  (`*.resources.num_cpus`, `student.cpu_cores`, `trainer.cpu_cores`), so every turn starts at once and the stages
  overlap.
- A colocated placement (student and trainer on the same cores, taking turns, the engine asleep while the
  trainer steps) is a second scheduler whose `turn` waits for the other stage to yield the cores.

Invariants: `turn` never raises for scheduling reasons; the busy time it credits is the time spent inside the
turn, so a stage's busy fraction never exceeds 1 for one turn at a time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Literal, Protocol

from persd_online.metrics import LoopMetrics

Stage = Literal["student", "sandbox", "teacher", "evaluator"]


class Scheduler(Protocol):
    """When a stage's unit of work may run."""

    def turn(self, stage: Stage) -> AbstractAsyncContextManager[None]: ...


class ConcurrentScheduler:
    """Every stage on its own resources: turns start at once (see the module docstring)."""

    def __init__(self, metrics: LoopMetrics) -> None:
        self.metrics = metrics

    @asynccontextmanager
    async def turn(self, stage: Stage) -> AsyncIterator[None]:
        with self.metrics.busy(stage):
            yield

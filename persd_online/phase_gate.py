"""The colocated placement's gate for student work that does not run in a loop turn: the `self` teacher tier's
repairs, which the teacher actor asks of the student while the loop's teacher turns run through both phases.

The colocated scheduler closes the gate when a training phase starts and opens it when the next generation
phase starts; a self-repair enters the gate before its student call and leaves it after. `close()` returns once
no entered call is under way, so the trainer never computes beside a repair; `enter()` waits while the gate is
closed. One `PhaseGate` runs as a small async Ray actor (`start_phase_gate`) shared by the driver's scheduler
and the teacher actor; tests use it in-process.

Invariants: an entered call and a closed gate never coexist (close waits for `inside == 0`, enter waits for
open); `leave` without `enter` raises.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import ray


class PhaseGate:
    """Open during generation phases, closed during training phases (see the module docstring)."""

    def __init__(self) -> None:
        self.inside = 0
        self._open = True
        self._changed = asyncio.Condition()

    async def enter(self) -> None:
        """Wait until the gate is open, then count one call under way."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._open)
            self.inside += 1

    async def leave(self) -> None:
        """A call that entered is done."""
        async with self._changed:
            if self.inside <= 0:
                raise ValueError("PhaseGate.leave without a matching enter")
            self.inside -= 1
            self._changed.notify_all()

    async def close(self) -> None:
        """Stop new calls; return once the calls under way are done."""
        async with self._changed:
            self._open = False
            await self._changed.wait_for(lambda: self.inside == 0)

    async def open(self) -> None:
        async with self._changed:
            self._open = True
            self._changed.notify_all()


@asynccontextmanager
async def passing(gate: Any | None) -> AsyncIterator[None]:
    """Hold `gate` (a `PhaseGate` or its actor handle; None: no gate) around one call."""
    if gate is None:
        yield
        return
    remote = hasattr(gate.enter, "remote")
    await (gate.enter.remote() if remote else gate.enter())
    try:
        yield
    finally:
        await (gate.leave.remote() if remote else gate.leave())


def start_phase_gate() -> ray.actor.ActorHandle:
    """A `PhaseGate` in a small async Ray actor (no CPU reserved)."""
    return ray.remote(PhaseGate).options(num_cpus=0).remote()

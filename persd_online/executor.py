"""The verification seam over the sandbox: `SandboxExecutor` turns `Executor.run` calls into sandbox batches.

Callers score one program at a time (`await executor.run(task, program, subject_id)`), often many at once
(a generation batch, concurrent refinements). The sandbox is fastest on batches, so calls made in the same
event-loop tick are gathered into one `run_batch` per sandbox actor, spread over the actors by load.

Invariants: a program is scored on `task.tests` (never `seen_tests`), with the task's setup and prompt;
the verdict names `subject_id`; sandbox trouble is a `sandbox_error` verdict, never an exception and never
a pass. The executor holds only actor handles and plain settings, so it pickles into other actors (the
teacher verifies its refinements through it); its batching state is rebuilt lazily in each process.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray

from persd_online.records import Verdict
from persd_online.tasks import Task
from sandbox.job import Job, TestSuite
from sandbox.result import Result, Status

log = logging.getLogger(__name__)


def suite_of(task: Task) -> TestSuite:
    """The sandbox's test suite for a task's scoring tests."""
    return TestSuite(entry_point=task.entry_point, tests=task.tests, setup=task.setup, prompt=task.prompt)


def verdict_of(result: Result, subject_id: str) -> Verdict:
    """A sandbox result as the loop's `Verdict` record."""
    return Verdict(subject_id=subject_id, status=result.status.value, passed=result.status == Status.PASSED,
                   feedback=result.feedback, duration_s=result.duration_s)


class SandboxExecutor:
    """`Executor` over sandbox Ray actors (`sandbox.ray_pool.SandboxActor`), batching concurrent calls."""

    def __init__(self, actors: list[ray.actor.ActorHandle], timeout_s: float) -> None:
        if not actors:
            raise ValueError("SandboxExecutor needs at least one sandbox actor")
        self.actors = actors
        self.timeout_s = timeout_s
        self._pending: list[tuple[Job, asyncio.Future[Result]]] = []
        self._flush_scheduled = False
        self._next_actor = 0

    def __getstate__(self) -> dict[str, Any]:
        return {"actors": self.actors, "timeout_s": self.timeout_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["actors"], state["timeout_s"])  # type: ignore[misc]

    async def run(self, task: Task, program: str, subject_id: str) -> Verdict:
        """The verdict on `program` against `task.tests`."""
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._pending.append((Job(program=program, suite=suite_of(task)), future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return verdict_of(await future, subject_id)

    def _flush(self) -> None:
        batch, self._pending, self._flush_scheduled = self._pending, [], False
        share = -(-len(batch) // len(self.actors))  # ceil: spread one batch over every actor
        for start in range(0, len(batch), share):
            actor = self.actors[self._next_actor % len(self.actors)]
            self._next_actor += 1
            asyncio.ensure_future(self._send(actor, batch[start:start + share]))

    async def _send(self, actor: ray.actor.ActorHandle, part: list[tuple[Job, asyncio.Future[Result]]]) -> None:
        # Every job of a chunk may time out; allow for that plus start-up before calling the actor lost.
        deadline = len(part) * (self.timeout_s + 5.0) + 120.0
        try:
            results = await asyncio.wait_for(actor.run_batch.remote([job for job, _ in part]), deadline)
        except (ray.exceptions.RayError, asyncio.TimeoutError) as exc:
            log.error("sandbox actor failed on a batch of %d: %s", len(part), exc)
            results = [Result(status=Status.SANDBOX_ERROR, feedback=f"sandbox unavailable: {exc}"[:300], tests=(),
                              duration_s=0.0) for _ in part]
        for (_, future), result in zip(part, results, strict=True):
            if not future.done():
                future.set_result(result)

"""The verification seam over the sandbox: executors that turn `Executor.run` calls into sandbox batches.

Callers score one program at a time (`await executor.run(task, program, subject_id)`), often many at once
(a generation batch, concurrent refinements). The sandbox is fastest on batches, so `BatchingExecutor` gathers
the calls made in the same event-loop tick into one batch. Where a batch runs is all that differs:
- `SandboxExecutor` (the online loop): sandbox Ray actors (`sandbox.ray_pool.SandboxActor`), each tick's batch
  spread over the actors;
- `PoolExecutor` (the offline commands): an in-process `sandbox.SandboxPool`, the batch run in a thread so the
  event loop stays free.

Invariants: a program is scored on `task.tests` (never `seen_tests`), with the task's setup and prompt;
the verdict names `subject_id`; sandbox trouble (a lost actor, a closed pool, a batch past its deadline) is a
`sandbox_error` verdict for every job of the batch, never an exception and never a pass. `SandboxExecutor`
holds only actor handles and plain settings, so it pickles into other actors (the teacher verifies its
refinements through it); its batching state is rebuilt lazily in each process.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

from persd_online.records import Verdict
from persd_online.tasks import Task
from sandbox.job import Job, TestSuite
from sandbox.result import Result, Status

if TYPE_CHECKING:
    from ray.actor import ActorHandle

    from sandbox.pool import SandboxPool

log = logging.getLogger(__name__)

Pending = list[tuple[Job, asyncio.Future[Result]]]


def suite_of(task: Task) -> TestSuite:
    """The sandbox's test suite for a task's scoring tests."""
    return TestSuite(entry_point=task.entry_point, tests=task.tests, setup=task.setup, prompt=task.prompt)


def verdict_of(result: Result, subject_id: str) -> Verdict:
    """A sandbox result as the loop's `Verdict` record."""
    return Verdict(subject_id=subject_id, status=result.status.value, passed=result.status == Status.PASSED,
                   feedback=result.feedback, duration_s=result.duration_s)


class BatchingExecutor(ABC):
    """`Executor` that gathers the calls made in one event-loop tick into one batch; subclasses run batches."""

    failure = "sandbox error"  # how a failed batch's feedback begins

    def __init__(self) -> None:
        self._pending: Pending = []
        self._flush_scheduled = False
        self._sending: set[asyncio.Future[None]] = set()  # the event loop keeps only weak references to tasks

    async def run(self, task: Task, program: str, subject_id: str) -> Verdict:
        """The verdict on `program` against `task.tests`; sandbox trouble is a `sandbox_error` verdict."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        self._pending.append((Job(program=program, suite=suite_of(task)), future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return verdict_of(await future, subject_id)

    def _flush(self) -> None:
        batch, self._pending, self._flush_scheduled = self._pending, [], False
        for part, target in self._split(batch):
            sending = asyncio.ensure_future(self._settle(part, target))
            self._sending.add(sending)
            sending.add_done_callback(self._sending.discard)

    def _split(self, batch: Pending) -> list[tuple[Pending, Any]]:
        """The parts one tick's batch is sent as, each with the target `_run_batch` gets (here: one part)."""
        return [(batch, None)]

    @abstractmethod
    async def _run_batch(self, jobs: list[Job], target: Any) -> list[Result]:
        """The results of `jobs`, in order; raising gives every job a `sandbox_error` result."""

    async def _settle(self, part: Pending, target: Any) -> None:
        jobs = [job for job, _ in part]
        try:
            results = await self._run_batch(jobs, target)
            if len(results) != len(jobs):
                raise RuntimeError(f"{len(results)} results for {len(jobs)} jobs")
        except Exception as exc:
            log.error("sandbox batch of %d failed: %s", len(jobs), exc)
            results = [Result(status=Status.SANDBOX_ERROR, feedback=f"{self.failure}: {exc}"[:300], tests=(),
                              duration_s=0.0) for _ in jobs]
        for (_, future), result in zip(part, results, strict=True):
            if not future.done():  # the caller may have been cancelled
                future.set_result(result)


class SandboxExecutor(BatchingExecutor):
    """`Executor` over sandbox Ray actors (`sandbox.ray_pool.SandboxActor`): each tick's batch is spread over
    every actor, the parts handed out round-robin."""

    failure = "sandbox unavailable"

    def __init__(self, actors: list[ActorHandle], timeout_s: float) -> None:
        if not actors:
            raise ValueError("SandboxExecutor needs at least one sandbox actor")
        super().__init__()
        self.actors = actors
        self.timeout_s = timeout_s
        self._next_actor = 0

    def __getstate__(self) -> dict[str, Any]:
        return {"actors": self.actors, "timeout_s": self.timeout_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["actors"], state["timeout_s"])  # type: ignore[misc]

    def _split(self, batch: Pending) -> list[tuple[Pending, Any]]:
        share = -(-len(batch) // len(self.actors))  # ceil: spread one batch over every actor
        parts = []
        for start in range(0, len(batch), share):
            parts.append((batch[start:start + share], self.actors[self._next_actor % len(self.actors)]))
            self._next_actor += 1
        return parts

    async def _run_batch(self, jobs: list[Job], target: Any) -> list[Result]:
        # Every job of a part may time out; allow for that plus start-up before calling the actor lost.
        deadline = len(jobs) * (self.timeout_s + 5.0) + 120.0
        return await asyncio.wait_for(target.run_batch.remote(jobs), deadline)


class PoolExecutor(BatchingExecutor):
    """`Executor` over an in-process `sandbox.SandboxPool` (the offline commands): each tick's batch runs in a
    thread, so the event loop stays free."""

    def __init__(self, pool: SandboxPool) -> None:
        super().__init__()
        self.pool = pool

    async def _run_batch(self, jobs: list[Job], target: Any) -> list[Result]:
        return await asyncio.to_thread(self.pool.run_batch, jobs)

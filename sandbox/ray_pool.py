"""A pool of Ray actors, each owning a local :class:`~sandbox.pool.SandboxPool`, for the distillation loop.

Jobs are cut into chunks and sent to the actor with the fewest chunks outstanding. At most ``max_in_flight``
chunks are outstanding at once: :meth:`RaySandboxPool.submit` blocks until one finishes rather than piling
work onto the actors (backpressure). Ray is imported only here, and only when a pool is built.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from sandbox.job import Job
from sandbox.pool import SandboxPool
from sandbox.result import Result


class SandboxActor:
    """Ray actor body: a local sandbox pool (wrap with `ray.remote(SandboxActor)`)."""

    def __init__(self, workers: int, timeout: float, memory_mb: int, pin_cpus: bool | None = None) -> None:
        self._pool = SandboxPool(workers, timeout=timeout, memory_mb=memory_mb, pin_cpus=pin_cpus)

    def isolation(self) -> dict[str, str]:
        return self._pool.isolation.layers

    def run_batch(self, jobs: list[Job]) -> list[Result]:
        return self._pool.run_batch(jobs)

    def close(self) -> None:
        self._pool.close()


class PendingResults:
    """Results of one :meth:`RaySandboxPool.submit` call, in job order."""

    def __init__(self, ray: Any, refs: list[Any], timeout: float) -> None:
        self._ray, self._refs, self._timeout = ray, refs, timeout

    def result(self, timeout: float | None = None) -> list[Result]:
        """Wait for every chunk (``timeout`` seconds, by default a bound derived from the job limits)."""
        chunks = self._ray.get(self._refs, timeout=self._timeout if timeout is None else timeout)
        return [result for chunk in chunks for result in chunk]


class RaySandboxPool:
    """Sandbox actors with bounded concurrency.

    ``num_actors`` actors each run ``workers_per_actor`` sandbox workers (and reserve that many CPUs from
    Ray); ``max_in_flight`` bounds the chunks of ``chunk_size`` jobs submitted but not finished (default:
    two per actor, one running and one queued).
    """

    def __init__(self, num_actors: int = 1, workers_per_actor: int = 2, timeout: float = 3.0,
                 memory_mb: int = 1024, max_in_flight: int | None = None, chunk_size: int = 64,
                 actor_options: dict[str, Any] | None = None) -> None:
        import ray  # optional dependency, imported only when a Ray pool is built

        if num_actors < 1 or workers_per_actor < 1 or chunk_size < 1:
            raise ValueError("num_actors, workers_per_actor and chunk_size must be positive")
        self._ray = ray
        self._chunk_size = chunk_size
        self._max_in_flight = max_in_flight or 2 * num_actors
        # A chunk runs at least one job per worker at a time; allow for every job timing out, plus start-up.
        self._chunk_timeout = math.ceil(chunk_size / workers_per_actor) * (timeout + 15.0) + 120.0
        options = {"num_cpus": workers_per_actor, **(actor_options or {})}
        actor_class = ray.remote(SandboxActor).options(**options)
        self._actors = [actor_class.remote(workers_per_actor, timeout, memory_mb) for _ in range(num_actors)]
        self._outstanding: dict[Any, int] = {}  # chunk ref -> actor index

    def isolation(self) -> dict[str, str]:
        """The isolation layers of the first actor's workers."""
        return self._ray.get(self._actors[0].isolation.remote(), timeout=self._chunk_timeout)

    def submit(self, jobs: Sequence[Job]) -> PendingResults:
        """Queue ``jobs``, blocking while ``max_in_flight`` chunks are outstanding."""
        refs = []
        for start in range(0, len(jobs), self._chunk_size):
            self._wait_below(self._max_in_flight)
            load = [0] * len(self._actors)
            for actor in self._outstanding.values():
                load[actor] += 1
            actor = load.index(min(load))
            ref = self._actors[actor].run_batch.remote(list(jobs[start:start + self._chunk_size]))
            self._outstanding[ref] = actor
            refs.append(ref)
        return PendingResults(self._ray, refs, self._chunk_timeout * max(1, len(refs)))

    def run(self, jobs: Sequence[Job]) -> list[Result]:
        """Run ``jobs`` and return their results in order."""
        return self.submit(jobs).result()

    def shutdown(self) -> None:
        """Stop the actors' sandbox workers and the actors."""
        self._ray.get([actor.close.remote() for actor in self._actors], timeout=60)
        for actor in self._actors:
            self._ray.kill(actor)
        self._actors.clear()

    def _wait_below(self, limit: int) -> None:
        while len(self._outstanding) >= limit:
            done, _ = self._ray.wait(list(self._outstanding), num_returns=1, timeout=self._chunk_timeout)
            if not done:
                raise TimeoutError(f"no sandbox chunk finished within {self._chunk_timeout:.0f} s")
            for ref in done:
                del self._outstanding[ref]

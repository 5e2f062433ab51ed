"""Held-out evaluation of an adapter version: pass@k from n samples per task, one-step.

The evaluator samples the student on held-out tasks with a given adapter version, scores every sample in
the sandbox on the tasks' scoring tests (`task.tests`, never `seen_tests`), and reports pass@1 (and pass@k
for every k <= n) with the unbiased estimator. The same code serves the online loop (an `EvaluatorActor`
scoring each K-th version) and the `eval` command.

Invariant: held-out tasks are never training tasks: `check_disjoint` refuses a pool that shares a task
with a held-out set, so no held-out task reaches the teacher or the trainer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import ray

from persd_online.config import EvalConfig
from persd_online.engine import Sampling
from persd_online.passk import mean_pass_at_k
from persd_online.records import Attempt, Verdict
from persd_online.tasks import Task
from persd_online.verify import Executor


@dataclass(frozen=True)
class EvalResult:
    """One evaluation of one adapter version on one task set."""

    task_set: str
    adapter_version: int
    n_samples: int
    pass1: float
    pass_at_k: dict[int, float]
    wall_s: float
    passed: dict[str, list[bool]] = field(repr=False)

    def to_event(self) -> dict[str, Any]:
        """The fields an `eval` event records (per-task outcomes summarised as counts)."""
        return {"task_set": self.task_set, "adapter_version": self.adapter_version, "n_samples": self.n_samples,
                "n_tasks": len(self.passed), "pass1": self.pass1,
                "pass_at_k": {str(k): v for k, v in self.pass_at_k.items()}, "eval_wall_s": round(self.wall_s, 2)}


def check_disjoint(pool: Sequence[Task], heldout: dict[str, Sequence[Task]]) -> None:
    """Refuse a training pool that contains a held-out task (same source and id)."""
    train = {(t.source.split(":")[0], t.task_id) for t in pool}
    for name, tasks in heldout.items():
        shared = sorted(t.task_id for t in tasks if (t.source.split(":")[0], t.task_id) in train)
        if shared:
            raise ValueError(f"held-out set {name!r} shares {len(shared)} task(s) with the training pool "
                             f"(e.g. {shared[:3]}); choose disjoint sets (e.g. tasks.pool=mbpp:train)")


async def score(executor: Executor, tasks: Sequence[Task], attempts: Sequence[Attempt]) -> list[Verdict]:
    """The sandbox's verdict on every attempt, concurrently, in order."""
    by_id = {t.task_id: t for t in tasks}
    return list(await asyncio.gather(*(executor.run(by_id[a.task_id], a.program, a.attempt_id)
                                       for a in attempts)))


def summarise(task_set: str, version: int, n: int, attempts: Sequence[Attempt], verdicts: Sequence[Verdict],
              wall_s: float) -> EvalResult:
    """Per-task outcomes and pass@k from scored samples."""
    passed: dict[str, list[bool]] = {}
    for attempt, verdict in zip(attempts, verdicts, strict=True):
        passed.setdefault(attempt.task_id, []).append(verdict.passed)
    counts = [(len(v), sum(v)) for v in passed.values()]
    pass_at = {k: mean_pass_at_k(counts, k) for k in range(1, n + 1)}
    return EvalResult(task_set, version, n, pass_at[1], pass_at, wall_s, passed)


class Evaluator:
    """Scores adapter versions of a student on held-out sets (runs as `EvaluatorActor` in the loop)."""

    def __init__(self, student: ray.actor.ActorHandle, executor: Executor, heldout: dict[str, list[Task]],
                 config: EvalConfig) -> None:
        self.student = student
        self.executor = executor
        self.heldout = heldout
        self.config = config

    async def evaluate(self, version: int) -> list[EvalResult]:
        """pass@k of `version` on every held-out set."""
        base = await self.student.default_sampling.remote()
        sampling = dataclasses.replace(base, temperature=self.config.temperature,
                                       max_tokens=self.config.max_new_tokens)
        sampling = self._with_seed(sampling)
        results = []
        for name, tasks in self.heldout.items():
            start = time.monotonic()
            attempts = await self.student.generate.remote(tasks, self.config.n_samples, sampling, version)
            verdicts = await score(self.executor, tasks, attempts)
            results.append(summarise(name, version, self.config.n_samples, attempts, verdicts,
                                     time.monotonic() - start))
        return results

    @staticmethod
    def _with_seed(sampling: Sampling) -> Sampling:
        # A fixed seed makes sampled evaluations of different versions comparable draw for draw.
        return sampling if sampling.temperature == 0 else dataclasses.replace(sampling, seed=0)


EvaluatorActor = ray.remote(Evaluator)

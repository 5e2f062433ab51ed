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
from persd_online.stats import paired_difference, pass1_interval
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

    def outcomes(self) -> dict[str, float]:
        """Each task's pass rate (its passing share of the samples), by task id."""
        return {task: sum(p) / len(p) for task, p in self.passed.items()}

    def to_event(self, full: bool = True) -> dict[str, Any]:
        """The fields an `eval` event records: pass@k, its 95% interval over tasks, and per-task outcomes.

        `full`: the whole held-out set (the base and final evaluations); False: a progress evaluation on its
        first `eval.progress_limit` tasks, which only draws the curve.
        """
        interval = pass1_interval(list(self.outcomes().values()))
        return {"task_set": self.task_set, "adapter_version": self.adapter_version, "n_samples": self.n_samples,
                "n_tasks": len(self.passed), "full": full, "pass1": self.pass1, "ci_low": interval.low,
                "ci_high": interval.high, "pass_at_k": {str(k): v for k, v in self.pass_at_k.items()},
                "eval_wall_s": round(self.wall_s, 2), "outcomes": self.outcomes()}


def heldout_change(evals: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per held-out set, its first full evaluation (the base student on a fresh run) against its last, paired
    task by task: both pass@1 with intervals, the difference with its 95% interval, McNemar's p and the verdict
    in words. Sets with fewer than two full evaluations are left out."""
    full: dict[str, list[dict[str, Any]]] = {}
    for e in evals:
        if e.get("full", True) and "outcomes" in e:
            full.setdefault(e["task_set"], []).append(e)
    change = {}
    for name, events in full.items():
        first, last = events[0], events[-1]
        if len(events) < 2 or set(first["outcomes"]) != set(last["outcomes"]):
            continue
        order = list(first["outcomes"])
        diff = paired_difference([first["outcomes"][t] for t in order], [last["outcomes"][t] for t in order])
        d = diff.difference
        change[name] = {
            "n_tasks": len(order),
            "before": {"version": first["adapter_version"], "pass1": first["pass1"], "ci": [first["ci_low"],
                                                                                               first["ci_high"]]},
            "after": {"version": last["adapter_version"], "pass1": last["pass1"], "ci": [last["ci_low"],
                                                                                            last["ci_high"]]},
            "difference": d.value, "difference_ci": [d.low, d.high], "improved": diff.improved,
            "worsened": diff.worsened, "mcnemar_p": diff.p_value, "verdict": diff.verdict,
        }
    return change


def describe_change(name: str, c: dict[str, Any]) -> str:
    """One line, in words, of a `heldout_change` entry."""
    b, a = c["before"], c["after"]
    words = ("within noise: the 95% interval of the difference contains zero" if c["verdict"] == "within noise"
             else f"{c['verdict']}: the 95% interval of the difference excludes zero")
    return (f"{name} ({c['n_tasks']} tasks): v{b['version']} {b['pass1']:.3f} [{b['ci'][0]:.3f}, {b['ci'][1]:.3f}]"
            f" -> v{a['version']} {a['pass1']:.3f} [{a['ci'][0]:.3f}, {a['ci'][1]:.3f}]; difference "
            f"{c['difference']:+.3f} [{c['difference_ci'][0]:+.3f}, {c['difference_ci'][1]:+.3f}], McNemar p="
            f"{c['mcnemar_p']:.2g}; {words}")


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
        self._caps: dict[str, tuple[int, ...]] = {}  # per held-out set: each task's token cap (token_caps)

    async def evaluate(self, version: int, limit: int | None = None, progress: bool = False) -> list[EvalResult]:
        """pass@k of `version` on every held-out set (`limit`: its first tasks only); `progress`: a progress bar
        per set on the driver (for the long evaluations, before and after the live display)."""
        base = await self.student.default_sampling.remote()
        sampling = dataclasses.replace(base, temperature=self.config.temperature,
                                       max_tokens=self.config.max_new_tokens)
        sampling = self._with_seed(sampling)
        results = []
        for name, every in self.heldout.items():
            start = time.monotonic()
            if name not in self._caps:
                c = self.config
                self._caps[name] = tuple(await self.student.token_caps.remote(every, c.cap_factor, c.cap_margin,
                                                                              c.max_new_tokens))
            tasks = every[:limit]
            capped = dataclasses.replace(sampling, max_tokens_each=self._caps[name][:len(tasks)],
                                         progress=f"evaluating v{version} on {name}" if progress else None)
            attempts = await self.student.generate.remote(tasks, self.config.n_samples, capped, version)
            verdicts = await score(self.executor, tasks, attempts)
            results.append(summarise(name, version, self.config.n_samples, attempts, verdicts,
                                     time.monotonic() - start))
        return results

    @staticmethod
    def _with_seed(sampling: Sampling) -> Sampling:
        # A fixed seed makes sampled evaluations of different versions comparable draw for draw.
        return sampling if sampling.temperature == 0 else dataclasses.replace(sampling, seed=0)


EvaluatorActor = ray.remote(Evaluator)

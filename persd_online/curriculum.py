"""Active-learning curriculum: which task the student should attempt next.

Each task has statistics (attempts, passes, the adapter version of its last attempt, teacher verdicts)
and a state:
- `active`: attempted when its learning value is among the highest;
- `retired`: solved `retire_after_passes` times in a row; re-checked with probability `recheck_prob` per
  pick (to catch forgetting), and back to `active` on a failure;
- `parked`: the teacher failed to fix it `park_after_teacher_failures` times and never succeeded, so it no
  longer burns teacher budget.

The `learning_value` policy ranks active tasks by the expected number of new verified labels one more
attempt yields: the chance the student fails, times the chance the teacher can fix the failure, times the
chance the fix is a label the trainer has not had yet. All three are posterior means whose prior is the
whole pool's observed rate (empirical Bayes, prior strength 2), so a never-attempted task scores the pool's
average, a task the student keeps failing and the teacher has fixed scores above it, and one the teacher
could not fix scores below it. The first fix of a task is new by definition; for a re-fix, the prior is the
pool's rate of new labels among re-fixes. A teacher that refines the student's own attempt gives a new
label almost every time (rate ~1: the term does not matter), while the reference oracle gives the same
label every time (rate ~0: the curriculum moves on to tasks it has no label for, instead of re-picking a few
tasks whose label it already trains on). Tasks attempted by an older adapter than the current one get a
small bonus, since a re-attempt measures what training changed. The value is per teacher dollar: it is
scaled by `free_label_usd / (free_label_usd + c)`, where `c` is the task's expected teacher cost per fix (what
its refinements cost over its fixes, the pool's average as the prior), so with free tiers only the ranking
is as above, and a task only a paid tier fixes ranks below one a free tier (self-repair, reference repair)
fixes. The `uniform` policy picks active tasks at random, for comparison. Every pick carries its reason,
which the loop writes to the events log.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from persd_online.config import CurriculumConfig

TaskState = Literal["active", "retired", "parked"]
PRIOR_STRENGTH = 2.0


@dataclass
class TaskStats:
    """What the curriculum knows about one task."""

    attempts: int = 0
    passes: int = 0
    consecutive_passes: int = 0
    last_version: int | None = None
    teacher_fixes: int = 0
    teacher_repeats: int = 0  # fixes whose label the trainer already had
    teacher_failures: int = 0
    teacher_cost_usd: float = 0.0  # what all its refinements cost
    state: TaskState = "active"

    @property
    def refixes(self) -> int:
        """Fixes after the first (the first is always a new label)."""
        return max(self.teacher_fixes - 1, 0)

    def cost_per_fix(self, pool: PoolRates) -> float:
        """Expected teacher dollars per fix: its refinements' cost over its fixes, the pool's as the prior."""
        return (self.teacher_cost_usd + PRIOR_STRENGTH * pool.cost) / (self.teacher_fixes + PRIOR_STRENGTH)

    def value(self, pool: PoolRates) -> tuple[float, float, float]:
        """Posterior means (p_fail, p_fix, p_new) with the pool's rates as the prior."""
        p_fail = (self.attempts - self.passes + PRIOR_STRENGTH * pool.fail) / (self.attempts + PRIOR_STRENGTH)
        refined = self.teacher_fixes + self.teacher_failures
        p_fix = (self.teacher_fixes + PRIOR_STRENGTH * pool.fix) / (refined + PRIOR_STRENGTH)
        p_new = 1.0 if not self.teacher_fixes else (
            (self.refixes - self.teacher_repeats + PRIOR_STRENGTH * pool.new) / (self.refixes + PRIOR_STRENGTH))
        return p_fail, p_fix, p_new


@dataclass(frozen=True)
class PoolRates:
    """The pool's observed rates: failed attempts and fixed refinements (each with a uniform prior), and new
    labels among re-fixes (optimistic: 1 until a re-fix is seen, so a fresh run ranks as if every fix were
    new)."""

    fail: float
    fix: float
    new: float
    cost: float = 0.0  # teacher dollars per fix


@dataclass(frozen=True)
class Pick:
    """A chosen task and why."""

    task_id: str
    reason: str
    value: float


@dataclass
class Curriculum:
    """Task statistics plus a selection policy; `state()`/`from_state()` checkpoint it."""

    config: CurriculumConfig
    stats: dict[str, TaskStats]
    rng: random.Random = field(default_factory=random.Random)
    in_flight: set[str] = field(default_factory=set)

    @classmethod
    def new(cls, task_ids: list[str], config: CurriculumConfig) -> Curriculum:
        return cls(config, {t: TaskStats() for t in task_ids}, random.Random(config.seed))

    def _pool_rates(self) -> PoolRates:
        s = self.stats.values()
        attempts = sum(t.attempts for t in s)
        fails = attempts - sum(t.passes for t in s)
        fixes = sum(t.teacher_fixes for t in s)
        refined = fixes + sum(t.teacher_failures for t in s)
        refixes = sum(t.refixes for t in s)
        repeats = sum(t.teacher_repeats for t in s)
        return PoolRates((fails + 1) / (attempts + 2), (fixes + 1) / (refined + 2),
                         (refixes - repeats + 1) / (refixes + 1), sum(t.teacher_cost_usd for t in s) / max(fixes, 1))

    def _value(self, stats: TaskStats, version: int, pool: PoolRates) -> tuple[float, str]:
        p_fail, p_fix, p_new = stats.value(pool)
        free = self.config.free_label_usd
        value = p_fail * p_fix * p_new * free / (free + stats.cost_per_fix(pool))
        if stats.attempts == 0:
            return value, "unseen"
        reason = f"learning value: student fails {p_fail:.2f}, teacher fixes {p_fix:.2f}, new label {p_new:.2f}"
        if stats.last_version is not None and stats.last_version < version:
            value *= 1.25
            reason += f", last tried on v{stats.last_version}"
        return value, reason

    def next(self, k: int, version: int) -> list[Pick]:
        """Up to `k` tasks to attempt now (not already in flight), each marked in flight."""
        free = {t: s for t, s in self.stats.items() if t not in self.in_flight}
        picks: list[Pick] = []
        retired = [t for t, s in free.items() if s.state == "retired"]
        active = [t for t, s in free.items() if s.state == "active"]
        pool = self._pool_rates()
        while len(picks) < k and active:
            if retired and self.rng.random() < self.config.recheck_prob:
                task = retired.pop(self.rng.randrange(len(retired)))
                picks.append(Pick(task, "re-check retired task for forgetting", 0.0))
                continue
            if self.config.policy == "uniform":
                task = active.pop(self.rng.randrange(len(active)))
                picks.append(Pick(task, "uniform", 1.0))
                continue
            scored = [(*self._value(free[t], version, pool), self.rng.random(), t) for t in active]
            value, reason, _, task = max(scored)
            active.remove(task)
            picks.append(Pick(task, reason, round(value, 4)))
        self.in_flight.update(p.task_id for p in picks)
        return picks

    def has_free(self) -> bool:
        """Whether `next` would pick a task now (an active task not in flight)."""
        return any(s.state == "active" and t not in self.in_flight for t, s in self.stats.items())

    def record_attempt(self, task_id: str, version: int, passed: bool) -> None:
        """One scored attempt of a task by adapter `version`."""
        stats = self.stats[task_id]
        stats.attempts += 1
        stats.last_version = version
        if passed:
            stats.passes += 1
            stats.consecutive_passes += 1
            if stats.consecutive_passes >= self.config.retire_after_passes:
                stats.state = "retired"
        else:
            stats.consecutive_passes = 0
            if stats.state == "retired":
                stats.state = "active"

    def record_teacher(self, task_id: str, verified: bool, new_label: bool = True, cost_usd: float = 0.0) -> None:
        """The outcome of refining a failed attempt (after all its rounds and tiers); `new_label`: a verified
        fix gave a label the trainer had not had yet; `cost_usd`: what its teacher calls cost."""
        stats = self.stats[task_id]
        stats.teacher_cost_usd += cost_usd
        if verified:
            stats.teacher_fixes += 1
            stats.teacher_repeats += stats.teacher_fixes > 1 and not new_label
        else:
            stats.teacher_failures += 1
            if not stats.teacher_fixes and stats.teacher_failures >= self.config.park_after_teacher_failures:
                stats.state = "parked"

    def release(self, task_id: str) -> None:
        """A picked task's work is done (its attempts scored and refined)."""
        self.in_flight.discard(task_id)

    def counts(self) -> dict[str, int]:
        states = [s.state for s in self.stats.values()]
        return {state: states.count(state) for state in ("active", "retired", "parked")}

    def exhausted(self) -> bool:
        """True when nothing is left to learn from: no active task remains."""
        return not any(s.state == "active" for s in self.stats.values())

    def state(self) -> dict[str, Any]:
        return {"stats": {t: asdict(s) for t, s in self.stats.items()}, "rng": self.rng.getstate()}

    @classmethod
    def from_state(cls, state: dict[str, Any], config: CurriculumConfig) -> Curriculum:
        rng = random.Random()
        version, internal, gauss = state["rng"]
        rng.setstate((version, tuple(internal), gauss))
        return cls(config, {t: TaskStats(**s) for t, s in state["stats"].items()}, rng)

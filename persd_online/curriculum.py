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
small bonus, since a re-attempt measures what training changed.

The chance of a fix is per teacher tier. A failure goes down the cascade's tiers in order until one fixes it;
for each tier `t` (in the order the tiers were first seen, which is the cascade's) the task has a posterior
chance `p_t` that `t` fixes it (its fixes over its tries there, the pool's rate for `t` as the prior) and an
expected cost per try `c_t` (likewise). Then

    p_fix = 1 - prod_t (1 - p_t)        expected cost per failure = sum_t c_t * prod_{s before t} (1 - p_s)

and the cost per fix is the expected cost per failure over `p_fix`. The value is per teacher dollar: it is
scaled by `free_label_usd / (free_label_usd + cost per fix)`, so with free tiers only the ranking is as above,
and a task only a paid tier fixes (it reaches the paid tier, and pays, every time) ranks below one a free tier
(self-repair, reference repair) fixes. Outcomes recorded without tiers count in the task's overall fix rate,
which stands in for `p_fix` (at no cost) until some tier has reported.

The `uniform` policy picks active tasks at random, for comparison. Every pick carries its reason, which the
loop writes to the events log.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
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
    tiers: dict[str, list[float]] = field(default_factory=dict)  # tier -> [tries, fixes, cost_usd]
    state: TaskState = "active"

    @property
    def refixes(self) -> int:
        """Fixes after the first (the first is always a new label)."""
        return max(self.teacher_fixes - 1, 0)

    def fix_and_cost(self, pool: PoolRates) -> tuple[float, float]:
        """(p_fix, expected teacher dollars per fix) down the tiers in order (see the module docstring)."""
        if not pool.tiers:  # no tier has reported (outcomes recorded without tiers): the task's overall rate
            refined = self.teacher_fixes + self.teacher_failures
            return (self.teacher_fixes + PRIOR_STRENGTH * pool.fix) / (refined + PRIOR_STRENGTH), 0.0
        unfixed, cost = 1.0, 0.0
        for tier, (pool_fix, pool_cost) in pool.tiers.items():
            tries, fixes, spent = self.tiers.get(tier, (0.0, 0.0, 0.0))
            cost += unfixed * (spent + PRIOR_STRENGTH * pool_cost) / (tries + PRIOR_STRENGTH)
            unfixed *= 1 - (fixes + PRIOR_STRENGTH * pool_fix) / (tries + PRIOR_STRENGTH)
        p_fix = 1 - unfixed
        return p_fix, cost / p_fix if p_fix > 0 else math.inf

    def value(self, pool: PoolRates) -> tuple[float, float, float]:
        """Posterior means (p_fail, p_fix, p_new) with the pool's rates as the prior."""
        p_fail = (self.attempts - self.passes + PRIOR_STRENGTH * pool.fail) / (self.attempts + PRIOR_STRENGTH)
        p_fix = self.fix_and_cost(pool)[0]
        p_new = 1.0 if not self.teacher_fixes else (
            (self.refixes - self.teacher_repeats + PRIOR_STRENGTH * pool.new) / (self.refixes + PRIOR_STRENGTH))
        return p_fail, p_fix, p_new


@dataclass(frozen=True)
class TierOutcome:
    """What one tier did with one failed attempt: fixed it or not, at what cost."""

    tier: str
    fixed: bool
    cost_usd: float = 0.0


@dataclass(frozen=True)
class PoolRates:
    """The pool's observed rates: failed attempts and fixed refinements (each with a uniform prior), and new
    labels among re-fixes (optimistic: 1 until a re-fix is seen, so a fresh run ranks as if every fix were
    new)."""

    fail: float
    fix: float
    new: float
    tiers: dict[str, tuple[float, float]] = field(default_factory=dict)  # tier -> (fix rate, dollars per try)


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
    tier_order: list[str] = field(default_factory=list)  # the tiers in the order first seen (the cascade's)

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
        tiers = {}
        for tier in self.tier_order:
            tries, tier_fixes, cost = (sum(t.tiers.get(tier, (0.0, 0.0, 0.0))[i] for t in s) for i in range(3))
            tiers[tier] = ((tier_fixes + 1) / (tries + 2), cost / max(tries, 1))
        return PoolRates((fails + 1) / (attempts + 2), (fixes + 1) / (refined + 2),
                         (refixes - repeats + 1) / (refixes + 1), tiers)

    def _value(self, stats: TaskStats, version: int, pool: PoolRates) -> tuple[float, str]:
        p_fail, p_fix, p_new = stats.value(pool)
        free = self.config.free_label_usd
        value = p_fail * p_fix * p_new * free / (free + stats.fix_and_cost(pool)[1])
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

    def record_teacher(self, task_id: str, verified: bool, new_label: bool = True,
                       tiers: Sequence[TierOutcome] = ()) -> None:
        """The outcome of refining a failed attempt (after all its rounds and tiers); `new_label`: a verified
        fix gave a label the trainer had not had yet; `tiers`: what each tier it reached did, in order."""
        stats = self.stats[task_id]
        for outcome in tiers:
            if outcome.tier not in self.tier_order:
                self.tier_order.append(outcome.tier)
            counts = stats.tiers.setdefault(outcome.tier, [0.0, 0.0, 0.0])
            counts[0] += 1
            counts[1] += outcome.fixed
            counts[2] += outcome.cost_usd
            stats.teacher_cost_usd += outcome.cost_usd
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
        return {"stats": {t: asdict(s) for t, s in self.stats.items()}, "rng": self.rng.getstate(),
                "tier_order": list(self.tier_order)}

    @classmethod
    def from_state(cls, state: dict[str, Any], config: CurriculumConfig) -> Curriculum:
        rng = random.Random()
        version, internal, gauss = state["rng"]
        rng.setstate((version, tuple(internal), gauss))
        return cls(config, {t: TaskStats(**s) for t, s in state["stats"].items()}, rng,
                   tier_order=list(state.get("tier_order", [])))

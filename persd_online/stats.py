"""Statistics that tell two evaluations of the same tasks apart: intervals, paired differences, verdicts.

Held-out outcomes are per task: `rates[i]` is task i's pass rate (its passing share of n samples; 0 or 1 for
greedy decoding), and pass@1 is their mean. Every interval resamples *tasks* (the unit drawn from the task
distribution), never samples within a task.

- `pass1_interval(rates)`: pass@1 with a percentile-bootstrap 95% interval over tasks.
- `paired_difference(a, b)`: pass@1(b) - pass@1(a) on the same tasks, with a paired bootstrap 95% interval
  (tasks resampled together, so a task's difficulty cancels out), McNemar's exact test on the discordant
  tasks, and a verdict in words.

McNemar's exact test: with binary outcomes, only discordant tasks carry information. Of the `d` tasks that
changed, `w` went from fail to pass; under the null hypothesis of no difference w ~ Binomial(d, 1/2), and the
two-sided p-value is `scipy.stats.binomtest(w, d, 0.5).pvalue` (1.0 when d = 0). With non-binary rates the
same test is the exact sign test on the per-task differences (ties dropped), which reduces to McNemar's
when the rates are binary.

Invariants: the verdict is "within noise" exactly when the interval contains zero; intervals are seeded, so
the same outcomes always give the same numbers; both inputs must cover the same tasks in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

CONFIDENCE = 0.95
RESAMPLES = 10_000
SEED = 0


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap interval."""

    value: float
    low: float
    high: float

    def contains_zero(self) -> bool:
        return self.low <= 0.0 <= self.high

    def text(self, digits: int = 3) -> str:
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


@dataclass(frozen=True)
class PairedDifference:
    """pass@1 of `b` minus pass@1 of `a` on the same tasks."""

    difference: Interval
    improved: int  # tasks whose rate rose from a to b
    worsened: int  # tasks whose rate fell
    p_value: float  # McNemar's exact test (the exact sign test for non-binary rates)
    n_tasks: int

    @property
    def verdict(self) -> str:
        """In words: "within noise" when the 95% interval contains zero, else which side is better."""
        if self.difference.contains_zero():
            return "within noise"
        return "better" if self.difference.value > 0 else "worse"


def _rates(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name}: need a non-empty list of per-task pass rates, got shape {array.shape}")
    if np.any((array < 0) | (array > 1)):
        raise ValueError(f"{name}: per-task pass rates must lie in [0, 1]")
    return array


def _bootstrap_mean(values: np.ndarray, seed: int) -> Interval:
    mean = float(values.mean())
    if np.all(values == values[0]):  # every resample has the same mean: the interval is the point
        return Interval(mean, mean, mean)
    result = scipy_stats.bootstrap((values,), np.mean, n_resamples=RESAMPLES, confidence_level=CONFIDENCE,
                                   method="percentile", vectorized=True, rng=np.random.default_rng(seed))
    low, high = result.confidence_interval
    return Interval(mean, float(low), float(high))


def pass1_interval(rates: Sequence[float], seed: int = SEED) -> Interval:
    """pass@1 (the mean per-task rate) with a percentile-bootstrap 95% interval over tasks."""
    return _bootstrap_mean(_rates(rates, "rates"), seed)


def sign_test(improved: int, worsened: int) -> float:
    """Two-sided exact p-value that improvements and worsenings are equally likely (McNemar's exact test)."""
    if improved < 0 or worsened < 0:
        raise ValueError("counts must be non-negative")
    changed = improved + worsened
    return 1.0 if changed == 0 else float(scipy_stats.binomtest(improved, changed, 0.5).pvalue)


def paired_difference(a: Sequence[float], b: Sequence[float], seed: int = SEED) -> PairedDifference:
    """pass@1(b) - pass@1(a) over the same tasks (same order): paired bootstrap interval and McNemar's test."""
    ra, rb = _rates(a, "a"), _rates(b, "b")
    if ra.shape != rb.shape:
        raise ValueError(f"paired outcomes need the same tasks: {ra.size} against {rb.size}")
    diff = rb - ra
    improved, worsened = int(np.sum(diff > 0)), int(np.sum(diff < 0))
    return PairedDifference(_bootstrap_mean(diff, seed), improved, worsened, sign_test(improved, worsened),
                            int(ra.size))

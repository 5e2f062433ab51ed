"""Observability of a run: Ray dashboard metrics, stage busy fractions, and the terminal progress display.

One `LoopMetrics` object in the driver owns every figure. Each update goes to `ray.util.metrics`
(Prometheus, scraped by the Ray dashboard) and to an in-process copy that feeds `metrics.jsonl`, the
terminal display and `summary.json`, so all of them report the same numbers.

Busy fraction: each stage (student, sandbox, teacher, trainer, evaluator) reports the seconds it spent
working; busy fraction = busy seconds / wall seconds since the stage started, which may exceed 1 for a stage
with concurrent workers (e.g. a teacher with several requests in flight counts each).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

COUNTERS: dict[str, str] = {
    "attempts": "Student attempts scored",
    "attempts_passed": "Student attempts that passed their tests",
    "teacher_calls": "Teacher refinement calls (cache hits included)",
    "teacher_cache_hits": "Teacher calls answered from the cache",
    "teacher_tokens": "Teacher prompt + completion tokens",
    "teacher_cost_usd": "Teacher cost in USD",
    "refinements_verified": "Refinements that passed the tests",
    "examples_trained": "Examples consumed by optimizer steps",
    "examples_distinct": "Distinct labels (task, program) sent to the trainer",
    "stale_dropped": "Examples dropped for exceeding max_staleness (trainer.stale_labels: drop)",
    "stale_replayed": "Verified labels past max_staleness sent to the replay buffer instead",
    "duplicates_dropped": "Examples the trainer had trained already, dropped on arrival",
    "train_steps": "Optimizer steps",
    "adapters_published": "Adapter versions published by the trainer",
    "adapters_loaded": "Adapter versions loaded by the student",
}
GAUGES: dict[str, str] = {
    "adapter_version": "Adapter version the student serves",
    "loss": "Last training loss",
    "train_tokens_per_s": "Trainer tokens per second",
    "queue_depth": "Items waiting in a queue (tag: queue)",
    "staleness": "Versions between the newest trained example's attempt and the trainer",
    "busy_fraction": "Busy seconds over wall seconds of a stage (tag: stage)",
    "heldout_pass1": "Held-out pass@1 of the current adapter (tag: task_set)",
}
_TAG_KEYS = {"queue_depth": ("queue",), "busy_fraction": ("stage",), "heldout_pass1": ("task_set",)}


def _ray_metrics() -> dict[str, Any]:
    from ray.util import metrics as ray_metrics

    made: dict[str, Any] = {}
    for name, doc in COUNTERS.items():
        made[name] = ray_metrics.Counter(f"persd_{name}", description=doc)
    for name, doc in GAUGES.items():
        made[name] = ray_metrics.Gauge(f"persd_{name}", description=doc, tag_keys=_TAG_KEYS.get(name, ()))
    return made


class LoopMetrics:
    """Counters, gauges and stage clocks of one run (see the module docstring)."""

    def __init__(self, export_to_ray: bool = True, counters: dict[str, float] | None = None) -> None:
        self._ray = _ray_metrics() if export_to_ray else {}
        self.counters: dict[str, float] = dict.fromkeys(COUNTERS, 0.0) | (counters or {})
        self.gauges: dict[str, float] = {}
        self._busy: dict[str, float] = defaultdict(float)
        self._stage_start: dict[str, float] = {}
        self._intervals: list[dict[str, Any]] = []  # busy intervals not yet written (`take_intervals`)
        self.started = time.monotonic()

    def inc(self, name: str, value: float = 1.0) -> None:
        if name not in COUNTERS:
            raise KeyError(f"unknown counter {name!r}")
        self.counters[name] += value
        if self._ray and value:
            self._ray[name].inc(value)

    def sync(self, totals: dict[str, float]) -> None:
        """Take the run's totals (the loop's ledger counts them); the Ray counters get the increments."""
        for name, value in totals.items():
            if value > self.counters[name]:
                self.inc(name, value - self.counters[name])

    def set(self, name: str, value: float, **tags: str) -> None:
        if name not in GAUGES:
            raise KeyError(f"unknown gauge {name!r}")
        key = name + "".join(f"/{v}" for v in tags.values())
        self.gauges[key] = value
        if self._ray:
            self._ray[name].set(value, tags=tags or None)

    def add_busy(self, stage: str, seconds: float) -> None:
        """Credit `seconds` of work to `stage` (for work measured elsewhere, e.g. inside an actor)."""
        self._stage_start.setdefault(stage, time.monotonic() - seconds)
        self._busy[stage] += seconds
        self.set("busy_fraction", self.busy_fraction(stage), stage=stage)

    @contextmanager
    def busy(self, stage: str) -> Iterator[None]:
        """Time a block of work of `stage`, and record it as a busy interval."""
        start, wall = time.monotonic(), time.time()
        try:
            yield
        finally:
            self.add_busy(stage, time.monotonic() - start)
            self.interval(stage, wall, time.time())

    def interval(self, stage: str, start: float, end: float) -> None:
        """Record that `stage` was busy from `start` to `end` (epoch seconds) for the stage timeline."""
        self._intervals.append({"stage": stage, "start": round(start, 3), "end": round(end, 3)})

    def take_intervals(self) -> list[dict[str, Any]]:
        """The busy intervals recorded since the last call (the loop appends them to `timeline.jsonl`)."""
        taken, self._intervals = self._intervals, []
        return taken

    def busy_fraction(self, stage: str) -> float:
        wall = time.monotonic() - self._stage_start.get(stage, self.started)
        return self._busy[stage] / wall if wall > 0 else 0.0

    def busy_fractions(self) -> dict[str, float]:
        return {stage: round(self.busy_fraction(stage), 3) for stage in self._busy}

    def snapshot(self) -> dict[str, Any]:
        """Every figure now, flat (what `metrics.jsonl` records)."""
        return {"wall_s": round(time.monotonic() - self.started, 1), **self.counters, **self.gauges,
                **{f"busy/{k}": v for k, v in self.busy_fractions().items()}}


class ProgressDisplay:
    """A live table in a terminal; one log line per refresh elsewhere (e.g. under `ray job submit`)."""

    def __init__(self, metrics: LoopMetrics, title: str, console: Console | None = None) -> None:
        self.metrics = metrics
        self.title = title
        self.console = console or Console(stderr=True)
        self._live = Live(console=self.console, auto_refresh=False) if self.console.is_terminal else None

    def __enter__(self) -> ProgressDisplay:
        if self._live:
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live:
            self._live.__exit__(*exc)

    def refresh(self) -> None:
        snap = self.metrics.snapshot()
        if self._live is None:
            keys = ("wall_s", "adapter_version", "attempts", "attempts_passed", "teacher_calls",
                    "refinements_verified", "examples_distinct", "examples_trained", "train_steps", "loss")
            self.console.print(" ".join(f"{k}={snap[k]:g}" for k in keys if k in snap), highlight=False)
            return
        table = Table(title=self.title, show_header=False, box=None)
        for key, value in snap.items():
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
        self._live.update(table, refresh=True)

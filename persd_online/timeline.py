"""When each stage of a run was busy, and how fast each produced its output: the data behind the report's
`stage_timeline.png`, pure (no I/O, no plotting).

A busy interval is one unit of a stage's work: a scheduler turn in the loop (a generation call, a sandbox
batch, a teacher refinement, an evaluation), one optimizer step of the trainer, or (colocated placement) one
training phase, as (stage, start, end) in
seconds since the epoch, recorded in `timeline.jsonl`. Throughput is a counter's increase per minute over
fixed windows of the `metrics.jsonl` snapshots (attempts scored, teacher calls, examples trained).

Invariants: a stage's bars are its intervals merged where they overlap (concurrent turns of one stage draw as
one bar); the windows tile the snapshots' span, and each rate is the counter's increase over its window / its
length, so the rates times the windows' lengths add up to the counter's increase over the run.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

PHASE_STAGE = "training phase"  # the colocated placement's training phases (scheduler.ColocatedScheduler)
STAGES = ("student", "evaluator", "sandbox", "teacher", "trainer", PHASE_STAGE)
THROUGHPUT = {"attempts": "attempts scored", "teacher_calls": "teacher calls", "examples_trained": "examples trained"}


def stage_bars(intervals: Iterable[dict[str, Any]], t0: float) -> dict[str, list[tuple[float, float]]]:
    """Per stage, its busy periods as (start, duration) in minutes since `t0`, overlapping intervals merged."""
    by_stage: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for i in intervals:
        by_stage[i["stage"]].append((float(i["start"]), float(i["end"])))
    bars: dict[str, list[tuple[float, float]]] = {}
    for stage, spans in by_stage.items():
        merged: list[list[float]] = []
        for start, end in sorted(spans):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        bars[stage] = [((s - t0) / 60, (e - s) / 60) for s, e in merged]
    return bars


def busy_share(bars: dict[str, list[tuple[float, float]]], span_min: float) -> dict[str, float]:
    """The share of `span_min` minutes each stage was busy (at most 1: overlaps are merged)."""
    return {stage: min(1.0, sum(w for _, w in spans) / span_min) if span_min > 0 else 0.0
            for stage, spans in bars.items()}


def throughput(snapshots: Sequence[dict[str, Any]], t0: float, window_s: float = 60.0,
               counters: Iterable[str] = THROUGHPUT) -> dict[str, list[tuple[float, float]]]:
    """Per counter, (window midpoint in minutes since `t0`, increase per minute) over consecutive windows of
    `window_s` seconds from the first snapshot to the last (the last window may be shorter). Snapshots carry
    "t" (epoch seconds) and cumulative counters; a counter is read between snapshots by linear interpolation."""
    rows = sorted((s for s in snapshots if "t" in s), key=lambda s: s["t"])
    if len(rows) < 2 or rows[-1]["t"] <= rows[0]["t"]:
        return {}
    t = np.array([r["t"] for r in rows], dtype=float)
    edges = np.append(np.arange(t[0], t[-1], window_s), t[-1])
    mids, minutes = (edges[:-1] + edges[1:]) / 2, np.diff(edges) / 60
    out: dict[str, list[tuple[float, float]]] = {}
    for name in counters:
        if any(name in r for r in rows):
            values = np.maximum.accumulate(np.array([float(r.get(name, 0.0)) for r in rows]))
            rates = np.diff(np.interp(edges, t, values)) / minutes
            out[name] = [(float((m - t0) / 60), float(r)) for m, r in zip(mids, rates, strict=True)]
    return out

"""Plots and a markdown summary from a run directory (reads only the run-directory contract).

- `learning_curve.png`: held-out pass@1 against teacher calls and against wall time, one line per task set
  (from the `eval` events);
- `stage_timeline.png`: when each stage was busy (from `timeline.jsonl`) and each stage's output per minute
  (attempts, teacher calls, examples trained; from `metrics.jsonl`);
- `summary.md`: held-out pass@1 of the base student against the final adapter, then the figures of
  `summary.json` as a table.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from persd_online.evaluator import describe_change  # noqa: E402
from persd_online.run_dir import read_jsonl  # noqa: E402
from persd_online.summary import RunSummary  # noqa: E402
from persd_online.timeline import STAGES, THROUGHPUT, busy_share, stage_bars, throughput  # noqa: E402


def _learning_curve(evals: list[dict[str, Any]], out: Path) -> None:
    """Full evaluations (every held-out task) as filled points with their 95% intervals; progress evaluations
    (the first `eval.progress_limit` tasks) as hollow points, a rougher and differently-sized sample."""
    fig, (by_calls, by_time) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    series: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in evals:
        series[e["task_set"]].append(e)
    for task_set, points in sorted(series.items()):
        points.sort(key=lambda e: e["wall_s"])
        full = [e for e in points if e.get("full", True)]
        progress = [e for e in points if not e.get("full", True)]
        for ax, x in ((by_calls, lambda e: e["teacher_calls"]), (by_time, lambda e: e["wall_s"] / 60)):
            err = [[e["pass1"] - e.get("ci_low", e["pass1"]) for e in full],
                   [e.get("ci_high", e["pass1"]) - e["pass1"] for e in full]]
            line = ax.errorbar([x(e) for e in full], [e["pass1"] for e in full], yerr=err, fmt="o-", capsize=3,
                               label=f"{task_set} ({full[0]['n_tasks'] if full else '?'} tasks, 95% CI)")
            if progress:
                ax.plot([x(e) for e in progress], [e["pass1"] for e in progress], "o", mfc="none",
                        color=line[0].get_color(), label=f"{task_set}, progress ({progress[0]['n_tasks']} tasks)")
        for e in points:
            by_time.annotate(f"v{e['adapter_version']}", (e["wall_s"] / 60, e["pass1"]), fontsize=7)
    by_calls.set(xlabel="teacher calls", ylabel="held-out pass@1", title="pass@1 vs teacher calls")
    by_time.set(xlabel="wall time (min)", title="pass@1 vs wall time")
    by_calls.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _timeline(intervals: list[dict[str, Any]], snapshots: list[dict[str, Any]], t0: float, out: Path) -> None:
    """When each stage was busy (one row per stage, its share of the run in the label), above each stage's
    output per minute (`persd_online.timeline`)."""
    fig, (rows, rates) = plt.subplots(2, 1, figsize=(10, 6), sharex=True, height_ratios=(3, 2))
    bars = stage_bars(intervals, t0)
    end = max((s + w for spans in bars.values() for s, w in spans), default=0.0)
    span = max(end, max((r["t"] - t0) / 60 for r in snapshots) if snapshots else 0.0)
    share = busy_share(bars, span)
    stages = [s for s in STAGES if s in bars] + sorted(set(bars) - set(STAGES))
    for y, stage in enumerate(stages):
        rows.broken_barh(bars[stage], (y - 0.4, 0.8), color=f"C{y}")
    rows.set(yticks=range(len(stages)), yticklabels=[f"{s} ({share[s]:.0%})" for s in stages], ylim=(-0.6, len(stages)),
             title="stage timeline: when each stage was busy (share of the run)")
    rows.invert_yaxis()
    for name, points in throughput(snapshots, t0).items():
        if points:
            rates.plot(*zip(*points, strict=True), marker=".", label=THROUGHPUT[name])
    rates.set(xlabel="wall time (min)", ylabel="per minute", title="throughput")
    if rates.lines:
        rates.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def base_vs_final(evals: list[dict[str, Any]]) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """Per held-out task set, its first evaluation (the base student, version 0 on a fresh run) and its last
    (the final adapter), from `eval` events in run order."""
    pairs: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    for e in evals:
        first = pairs.get(e["task_set"], (e, e))[0]
        pairs[e["task_set"]] = (first, e)
    return pairs


def _summary_markdown(summary: RunSummary, evals: list[dict[str, Any]]) -> str:
    text = "# Run summary\n\n"
    change = summary.heldout_change
    if change:
        text += "## Held-out pass@1: base student vs trained adapter\n\n"
        text += "".join(f"- {describe_change(name, c)}\n" for name, c in sorted(change.items())) + "\n"
    else:
        pairs = base_vs_final(evals)
        if pairs:
            text += ("## Held-out pass@1: base student vs trained adapter\n\n"
                     "| task set | base | trained |\n|---|---|---|\n")
            text += "".join(f"| {name} | v{a['adapter_version']}: {a['pass1']:.3f} | v{b['adapter_version']}: "
                            f"{b['pass1']:.3f} |\n" for name, (a, b) in sorted(pairs.items()))
            text += "\n"
    rows = [f"| {k} | {json.dumps(v) if isinstance(v, (dict, list)) else v} |"
            # per-task outcomes stay in summary.json
            for k, v in summary.model_dump(mode="json", exclude={"heldout", "heldout_change"}).items()]
    return text + "## Figures\n\n| figure | value |\n|---|---|\n" + "\n".join(rows) + "\n"


def build_report(run_root: str | Path) -> list[Path]:
    """Write the report of a run into `<run>/report/`; returns the files written."""
    root = Path(run_root)
    out = root / "report"
    out.mkdir(exist_ok=True)
    written = []
    events = list(read_jsonl(root / "events.jsonl")) if (root / "events.jsonl").exists() else []
    evals = [e for e in events if e.get("kind") == "eval"]
    if evals:
        _learning_curve(evals, out / "learning_curve.png")
        written.append(out / "learning_curve.png")
    intervals = list(read_jsonl(root / "timeline.jsonl")) if (root / "timeline.jsonl").exists() else []
    snapshots = list(read_jsonl(root / "metrics.jsonl")) if (root / "metrics.jsonl").exists() else []
    if intervals or snapshots:
        starts = [e["t"] for e in events if e.get("kind") == "start"]
        t0 = starts[0] if starts else min([i["start"] for i in intervals] + [s["t"] for s in snapshots])
        _timeline(intervals, snapshots, t0, out / "stage_timeline.png")
        written.append(out / "stage_timeline.png")
    if (root / "summary.json").exists():
        summary = RunSummary.read(root / "summary.json")
        (out / "summary.md").write_text(_summary_markdown(summary, evals))
        written.append(out / "summary.md")
    return written

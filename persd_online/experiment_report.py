"""The experiment's report: `experiment.json`, `experiment.md` (tables) and `experiment.png`.

Comparisons are paired, task by task (`stats.paired_difference`): on each held-out set, and on all held-out
tasks pooled ("all"), every arm against every arm listed before it (so each against `base` when base runs
first). The markdown table gives each arm's pass@1 with its 95% interval per set, its cost, and its paired
difference against `base` on all tasks with the verdict in words; a second table gives that difference per
set, a third every pair of training arms.

Invariants: reads only `ArmResult`s (the committed per-arm JSON), so the report can be rebuilt from
`benchmarks/results/` on any machine; an arm is compared only on tasks both arms were scored on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from persd_online import atomic
from persd_online.config import Config
from persd_online.heldout import SetScore, paired_rates
from persd_online.stats import PairedDifference, paired_difference, pass1_interval

if TYPE_CHECKING:
    from persd_online.experiment import ArmResult

ALL = "all"


def pooled(result: ArmResult) -> SetScore:
    """All of an arm's held-out tasks as one set (task ids prefixed by their set)."""
    outcomes = {f"{s.task_set}/{t}": r for s in result.scores for t, r in s.outcomes.items()}
    interval = pass1_interval(list(outcomes.values()))
    return SetScore(task_set=ALL, n_tasks=len(outcomes), n_samples=result.scores[0].n_samples,
                    temperature=result.scores[0].temperature, pass1=interval.value, ci_low=interval.low,
                    ci_high=interval.high, wall_s=sum(s.wall_s for s in result.scores),
                    generated_tokens=sum(s.generated_tokens for s in result.scores), outcomes=outcomes)


def _sets(result: ArmResult) -> dict[str, SetScore]:
    return {s.task_set: s for s in result.scores} | {ALL: pooled(result)}


def comparisons(results: dict[str, ArmResult]) -> list[dict[str, Any]]:
    """Every ordered pair (earlier arm a, later arm b) on every set: b - a, paired."""
    rows = []
    arms = list(results)
    for i, a in enumerate(arms):
        for b in arms[i + 1:]:
            sa, sb = _sets(results[a]), _sets(results[b])
            for name in sa:
                if name not in sb:
                    continue
                diff = paired_difference(*paired_rates(sa[name], sb[name]))
                rows.append({"a": a, "b": b, "task_set": name, **_diff_json(diff)})
    return rows


def _diff_json(diff: PairedDifference) -> dict[str, Any]:
    d = diff.difference
    return {"difference": d.value, "ci_low": d.low, "ci_high": d.high, "improved": diff.improved,
            "worsened": diff.worsened, "mcnemar_p": diff.p_value, "n_tasks": diff.n_tasks, "verdict": diff.verdict}


def _words(row: dict[str, Any]) -> str:
    verdict = row["verdict"] if row["verdict"] == "within noise" else f"{row['b']} {row['verdict']}"
    return (f"{row['difference']:+.3f} [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}], "
            f"p={row['mcnemar_p']:.2g}: {verdict}")


def markdown(results: dict[str, ArmResult], rows: list[dict[str, Any]], config: Config) -> str:
    """The README-ready tables."""
    e = config.experiment
    first = next(iter(results.values()))
    sets = [s.task_set for s in first.scores]
    sizes = ", ".join(f"{s.task_set} {s.n_tasks}" for s in first.scores)
    decoding = "greedy" if first.scores[0].temperature == 0 else (
        f"{first.scores[0].n_samples} samples at T={first.scores[0].temperature}")
    text = (f"Pool {config.tasks.pool} ({config.tasks.limit or 'all'} tasks); every training arm matched on "
            f"{e.budget} {e.match.replace('_', ' ')}; held-out: {sizes} tasks, {decoding}; 95% intervals by "
            "bootstrap over tasks; differences paired per task, McNemar's exact test.\n\n")
    head = ["arm", "teacher", "examples (distinct)", "tasks", "examples trained", "teacher calls", "train steps",
            "wall (s)"]
    head += [f"{s} pass@1 [95% CI]" for s in [*sets, ALL]]
    has_base = "base" in results
    if has_base:
        head.append("vs base, all tasks")
    text += "| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n"
    for arm, r in results.items():
        scores = _sets(r)
        cells = [arm + (" (short of budget)" if r.short_of_budget else ""), r.teacher, str(r.examples),
                 str(r.tasks), str(r.examples_trained), str(r.teacher_calls), str(r.train_steps), f"{r.wall_s:.0f}"]
        cells += [f"{scores[s].pass1:.3f} [{scores[s].ci_low:.3f}, {scores[s].ci_high:.3f}]" for s in [*sets, ALL]]
        if has_base:
            match = [x for x in rows if x["a"] == "base" and x["b"] == arm and x["task_set"] == ALL]
            cells.append(_words(match[0]) if match else "—")
        text += "| " + " | ".join(cells) + " |\n"
    if has_base and len(results) > 1:
        text += "\nAgainst base, per held-out set (arm − base):\n\n| arm | " + " | ".join(sets) + " |\n|---|"
        text += "---|" * len(sets) + "\n"
        for arm in list(results)[1:]:
            cells = [next((_words(x) for x in rows if x["a"] == "base" and x["b"] == arm and x["task_set"] == s),
                          "—") for s in sets]
            text += f"| {arm} | " + " | ".join(cells) + " |\n"
    pairs = [x for x in rows if x["task_set"] == ALL and x["a"] != "base"]
    if pairs:
        text += "\nPairs of training arms, all held-out tasks (b − a):\n\n| a | b | difference [95% CI], p, verdict |\n"
        text += "|---|---|---|\n" + "".join(f"| {x['a']} | {x['b']} | {_words(x)} |\n" for x in pairs)
    return text


def plot(results: dict[str, ArmResult], out: Path) -> None:
    """Left: pass@1 with 95% intervals per arm and set. Right: pass@1 (all tasks) against teacher calls."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, cost) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(results)
    sets = [s.task_set for s in next(iter(results.values())).scores] + [ALL]
    width = 0.8 / len(sets)
    for j, name in enumerate(sets):
        scores = [_sets(results[a])[name] for a in names]
        x = [i + (j - (len(sets) - 1) / 2) * width for i in range(len(names))]
        y = [s.pass1 for s in scores]
        err = [[s.pass1 - s.ci_low for s in scores], [s.ci_high - s.pass1 for s in scores]]
        bars.errorbar(x, y, yerr=err, fmt="o", capsize=3, label=name)
    bars.set_xticks(range(len(names)), names, rotation=20)
    bars.set(ylabel="held-out pass@1 (95% CI)", title="pass@1 per arm")
    bars.legend(fontsize=8)
    for a in names:
        s = _sets(results[a])[ALL]
        cost.errorbar([results[a].teacher_calls], [s.pass1], yerr=[[s.pass1 - s.ci_low], [s.ci_high - s.pass1]],
                      fmt="o", capsize=3)
        cost.annotate(a, (results[a].teacher_calls, s.pass1), fontsize=8, xytext=(4, 4), textcoords="offset points")
    cost.set(xlabel="teacher calls (a reference label counts as one)", ylabel="pass@1, all held-out tasks",
             title="pass@1 against teacher calls")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def write_report(results: dict[str, ArmResult], config: Config, out: Path) -> list[Path]:
    """Write experiment.json, experiment.md and experiment.png under `out`; returns their paths."""
    rows = comparisons(results)
    summary = {"pool": config.tasks.pool, "pool_limit": config.tasks.limit, "match": config.experiment.match,
               "budget": config.experiment.budget, "arms": {a: r.model_dump() for a, r in results.items()},
               "comparisons": rows}
    paths = [out / "experiment.json", out / "experiment.md", out / "experiment.png"]
    atomic.write_text(paths[0], json.dumps(summary, indent=1))
    atomic.write_text(paths[1], markdown(results, rows, config))
    plot(results, paths[2])
    return paths

"""`persd-online compare`: one table and one plot across online runs and offline evaluations.

Inputs are run directories (their `summary.json` and `config.yaml`) and `persd-online eval --out` results.
Each becomes one row: what it is (run or eval), the method, the adapter, the teacher and what it cost, pass@1
one-step, pass@1 after the last refine step (multi-step), and the equal-budget resampling baseline. A run's
pass@1 is its final held-out figure (the last evaluated version); multi-step figures come from `eval`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from persd_online.multistep import MultiStepResult
from persd_online.summary import RunSummary


@dataclass(frozen=True)
class Entry:
    """One compared result."""

    name: str
    kind: str
    method: str | None
    adapter: str | None
    teacher: str | None
    teacher_tokens: int | None
    teacher_cost_usd: float | None
    task_set: str | None
    pass1: float | None
    pass1_multistep: float | None
    refine_steps: int | None
    resample_pass: float | None


def _teacher(info: dict[str, Any] | None) -> tuple[str | None, int | None, float | None]:
    if not info:
        return None, None, None
    tokens = info.get("prompt_tokens", 0) + info.get("completion_tokens", 0)
    return info.get("kind"), tokens, info.get("cost_usd")


def _from_run(root: Path) -> Entry:
    import yaml

    summary = RunSummary.read(root / "summary.json")
    config_file = root / "config.yaml"
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    curve = summary.heldout_pass1
    kind, tokens, cost = _teacher(summary.teacher)
    last = curve[-1] if curve else None
    return Entry(name=root.name, kind="run (online)", method=config.get("method"),
                 adapter=f"v{last[0]}" if last else None, teacher=kind, teacher_tokens=tokens, teacher_cost_usd=cost,
                 task_set=",".join((config.get("eval") or {}).get("tasks", [])) or None,
                 pass1=last[1] if last else None, pass1_multistep=None, refine_steps=None, resample_pass=None)


def _from_eval(path: Path) -> Entry:
    try:
        result = MultiStepResult.read(path)
    except ValidationError:
        raise ValueError(f"{path} is not a `persd-online eval --out` result") from None
    extra = result.extra
    offline = extra.get("offline") or {}
    kind, tokens, cost = _teacher(offline.get("teacher"))
    steps = result.refine_steps
    return Entry(name=path.stem, kind="eval", method=offline.get("method") or ("base" if not extra.get("adapter")
                                                                               else None),
                 adapter=extra.get("adapter") or "base", teacher=kind, teacher_tokens=tokens, teacher_cost_usd=cost,
                 task_set=result.task_set, pass1=result.pass1_by_step[0],
                 pass1_multistep=result.pass1_by_step[-1] if steps else None, refine_steps=steps or None,
                 resample_pass=result.baseline_pass_at_k)


def load_entries(inputs: list[Path]) -> list[Entry]:
    """One entry per input: a run directory (with summary.json) or an eval result JSON."""
    entries = []
    for path in inputs:
        path = Path(path)
        if path.is_dir():
            if not (path / "summary.json").is_file():
                raise FileNotFoundError(f"{path} has no summary.json (is it a finished run directory?)")
            entries.append(_from_run(path))
        elif path.is_file():
            entries.append(_from_eval(path))
        else:
            raise FileNotFoundError(f"{path}: no such run directory or eval result")
    return entries


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def compare_table(entries: list[Entry]) -> Any:
    """The entries as a rich table."""
    from rich.table import Table

    table = Table(title="persd-online comparison")
    for column in ("name", "kind", "method", "adapter", "tasks", "teacher", "teacher tokens", "cost $",
                   "pass@1", "pass@1 multi-step", "resampling"):
        table.add_column(column, justify="right" if column[0] in "ptcr" and column != "teacher" else "left")
    for e in entries:
        multi = None if e.pass1_multistep is None else f"{e.pass1_multistep:.3f} (K={e.refine_steps})"
        resample = None if e.resample_pass is None else f"{e.resample_pass:.3f} (pass@{(e.refine_steps or 0) + 1})"
        table.add_row(e.name, e.kind, e.method or "–", e.adapter or "–", e.task_set or "–", e.teacher or "–",
                      "–" if e.teacher_tokens is None else str(e.teacher_tokens), _fmt(e.teacher_cost_usd, 4),
                      _fmt(e.pass1), multi or "–", resample or "–")
    return table


def plot(entries: list[Entry], out: str | Path) -> Path:
    """Grouped bars: pass@1, multi-step pass@1 and the resampling baseline of every entry."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [("pass@1", [e.pass1 for e in entries]),
              ("pass@1 multi-step", [e.pass1_multistep for e in entries]),
              ("resampling (equal budget)", [e.resample_pass for e in entries])]
    series = [(label, values) for label, values in series if any(v is not None for v in values)]
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(entries)), 4))
    for i, (label, values) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(entries))]
        ax.bar(xs, [v or 0.0 for v in values], width, label=label)
    ax.set_xticks(range(len(entries)), [f"{e.name}\n{e.method or ''}" for e in entries], fontsize=8)
    ax.set(ylabel="pass rate", ylim=(0, 1), title="pass@1 across runs and evaluations")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out

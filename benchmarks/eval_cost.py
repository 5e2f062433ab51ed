"""Seconds per held-out task: the evaluation's limits against today's settings, same adapter, one run.

Baseline ("before"): the evaluation as it was: served through LoRA (version 0, the all-zero adapter),
generating to the end-of-sequence token or `eval.max_new_tokens` (320): no stop at the closing code fence, no
repetition stop, no per-task caps. New ("after"): the adapter merged into the engine's weights (no LoRA), stop at the
program's end, the repetition stop (`persd_online.repetition`) and per-task token caps (`eval.cap_factor` x
the reference's length + `eval.cap_margin`). Both score the base student (version
0) greedily on the same tasks, both cores, each in its own process (a fresh engine; start-up not counted).

Reported: seconds per task and generated tokens for each, their ratio, pass@1 of each with its 95% interval,
and the paired difference (bootstrap 95% interval, McNemar's exact test): the limits must not change what
is scored. Writes benchmarks/results/eval_cost.json.

    python benchmarks/eval_cost.py [--tasks mbpp:validation humaneval] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SETTINGS = {
    "before": ["student.stop_at_program_end=false", "student.stop_repetition=false", "eval.cap_factor=null"],
    "after": [],
}
COMMON = [f"student.cpu_cores=0-{(os.cpu_count() or 1) - 1}", "eval.temperature=0", "eval.limit=null"]
OUT = Path(__file__).parent / "results" / "eval_cost.json"


def _one(setting: str, specs: list[str], limit: int | None, out: Path) -> None:
    """Score the base student under one setting (run in a child process: one engine per process)."""
    from persd_online.config import load_config
    from persd_online.heldout import score_adapter
    from persd_online.models import resolve_model
    from persd_online.tasks import load_tasks

    config = load_config(None, [*COMMON, *SETTINGS[setting], f"eval.tasks={json.dumps(specs)}"])
    sets = {spec: load_tasks(spec)[:limit] for spec in specs}
    model = resolve_model(config.student.model, config.cache_dir)
    with tempfile.TemporaryDirectory() as work:
        scores = score_adapter(config, model, None, sets, work, merged=setting == "after")
    out.write_text(json.dumps([s.model_dump() for s in scores]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["mbpp:validation", "humaneval"])
    parser.add_argument("--limit", type=int, default=None, help="first N tasks of each set")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--one", choices=list(SETTINGS), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        _one(args.one, args.tasks, args.limit, args.result)
        return

    from persd_online.heldout import SetScore, paired_rates
    from persd_online.stats import paired_difference

    runs: dict[str, list[SetScore]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for setting in SETTINGS:
            result = Path(tmp) / f"{setting}.json"
            cmd = [sys.executable, __file__, "--one", setting, "--result", str(result), "--tasks", *args.tasks]
            subprocess.run(cmd + (["--limit", str(args.limit)] if args.limit else []), check=True)
            runs[setting] = [SetScore.model_validate(s) for s in json.loads(result.read_text())]
    report: dict[str, object] = {"baseline": "before: LoRA serving (version 0), no stop at the program's end, no "
                                             "repetition stop, no caps",
                                 "sets": {}}
    total = {s: sum(x.wall_s for x in runs[s]) for s in SETTINGS}
    tasks = sum(x.n_tasks for x in runs["after"])
    for before, after in zip(runs["before"], runs["after"], strict=True):
        diff = paired_difference(*paired_rates(before, after))
        report["sets"][after.task_set] = {  # type: ignore[index]
            "tasks": after.n_tasks,
            "s_per_task_before": round(before.wall_s / before.n_tasks, 3),
            "s_per_task_after": round(after.wall_s / after.n_tasks, 3),
            "tokens_before": before.generated_tokens, "tokens_after": after.generated_tokens,
            "pass1_before": [before.pass1, before.ci_low, before.ci_high],
            "pass1_after": [after.pass1, after.ci_low, after.ci_high],
            "difference": [diff.difference.value, diff.difference.low, diff.difference.high],
            "changed_tasks": {"improved": diff.improved, "worsened": diff.worsened}, "mcnemar_p": diff.p_value,
            "verdict": diff.verdict,
        }
    report["s_per_task_before"] = round(total["before"] / tasks, 3)
    report["s_per_task_after"] = round(total["after"] / tasks, 3)
    report["speedup"] = round(total["before"] / total["after"], 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

"""The report is built from a run directory's files alone."""

import json
import time

from persd_online.config import Config
from persd_online.evaluator import heldout_change
from persd_online.report import build_report
from persd_online.run_dir import RunDir
from tests.summary_fixtures import make_summary


def _eval(version, task_set, passed, n, calls, full=True):
    outcomes = {f"T{i}": float(i < passed) for i in range(n)}
    return {"adapter_version": version, "task_set": task_set, "pass1": passed / n, "teacher_calls": calls,
            "wall_s": 60.0 * version, "n_tasks": n, "full": full, "ci_low": max(0.0, passed / n - 0.05),
            "ci_high": passed / n + 0.05, "eval_wall_s": 30.0, "outcomes": outcomes}


def test_report_from_run_files(tmp_path):
    run = RunDir.create(Config(runs_dir=tmp_path))
    evals = [_eval(0, "mbpp:test", 5, 100, 0), _eval(0, "humaneval", 2, 100, 0),
             _eval(1, "mbpp:test", 2, 20, 12, full=False), _eval(1, "humaneval", 1, 20, 12, full=False),
             _eval(2, "mbpp:test", 6, 100, 30), _eval(2, "humaneval", 40, 100, 30)]
    run.event("start")
    for i, e in enumerate(evals):
        run.event("eval", **e)
        run.metrics({"wall_s": 60.0 * i, "attempts": 10 * i, "examples_trained": 4 * i})
    now = time.time()
    run.timeline([{"stage": "student", "start": now, "end": now + 30},
                  {"stage": "trainer", "start": now + 10, "end": now + 40}])
    run.write_summary(make_summary(adapters_published=3, heldout_pass1=[(0, 0.05), (2, 0.06)], heldout=evals,
                                   heldout_change=heldout_change(evals)))
    run.close()
    written = build_report(run.root)
    assert {p.name for p in written} == {"learning_curve.png", "stage_timeline.png", "summary.md"}
    for png in written[:2]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    text = (run.root / "report" / "summary.md").read_text()
    assert "| adapters_published | 3 |" in text and json.dumps([[0, 0.05], [2, 0.06]]) in text
    assert '"outcomes"' not in text  # per-task outcomes stay in summary.json
    lines = {line.split(" (")[0].removeprefix("- "): line for line in text.splitlines() if line.startswith("- ")}
    assert "v0 0.050" in lines["mbpp:test"] and "-> v2 0.060" in lines["mbpp:test"]
    assert "within noise: the 95% interval of the difference contains zero" in lines["mbpp:test"]
    assert "better: the 95% interval of the difference excludes zero" in lines["humaneval"]


def test_heldout_change_pairs_first_and_last_full_evaluations():
    evals = [_eval(0, "mbpp:test", 5, 100, 0), _eval(3, "mbpp:test", 50, 20, 9, full=False),
             _eval(6, "mbpp:test", 25, 100, 20)]
    change = heldout_change(evals)["mbpp:test"]
    assert (change["before"]["version"], change["after"]["version"]) == (0, 6)  # the progress one is skipped
    assert change["improved"] == 20 and change["worsened"] == 0 and change["verdict"] == "better"
    assert heldout_change(evals[:1]) == {}  # one full evaluation: nothing to compare

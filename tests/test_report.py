"""The report is built from a run directory's files alone."""

import json

from persd_online.config import Config
from persd_online.report import build_report
from persd_online.run_dir import RunDir


def test_report_from_run_files(tmp_path):
    run = RunDir.create(Config(runs_dir=tmp_path))
    for i, (calls, pass1) in enumerate([(0, 0.05), (12, 0.075), (30, 0.1)]):
        for task_set in ("humaneval", "mbpp:test"):
            run.event("eval", adapter_version=i, task_set=task_set, pass1=pass1, teacher_calls=calls,
                      wall_s=60.0 * i)
        run.metrics({"wall_s": 60.0 * i, "busy/student": 0.5 + 0.1 * i, "busy/trainer": 0.3})
    run.write_summary({"adapters_published": 3, "heldout_pass1": [[0, 0.05], [2, 0.1]]})
    run.close()
    written = build_report(run.root)
    assert {p.name for p in written} == {"learning_curve.png", "stage_utilisation.png", "summary.md"}
    for png in written[:2]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    text = (run.root / "report" / "summary.md").read_text()
    assert "| adapters_published | 3 |" in text and json.dumps([[0, 0.05], [2, 0.1]]) in text
    assert "| humaneval | v0: 0.050 | v2: 0.100 |" in text and "| mbpp:test | v0: 0.050 | v2: 0.100 |" in text

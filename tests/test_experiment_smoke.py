"""`persd-online experiment` end to end on a tiny configuration: real engine, sandbox and trainer."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(sys.executable).parent / "persd-online"


@pytest.mark.slow
def test_experiment_runs_two_arms_and_resumes(tmp_path, student_model):
    out = tmp_path / "results"
    cmd = [str(SCRIPT), "experiment", "--arms", "base", "stand", "--out", str(out),
           "--set", f"runs_dir={tmp_path}", "--set", "tasks.limit=4", "--set", "experiment.budget=3",
           "--set", "experiment.epochs=1", "--set", "experiment.heldout=[mbpp:test]",
           "--set", "experiment.heldout_limit=6", "--set", "trainer.lr=1e-3",
           # one optimizer step: without warm-up, or its learning rate is 0 and the adapter is all zeros (the
           # student refuses to serve an adapter that changes nothing)
           "--set", "trainer.warmup_steps=0"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "experiment.json").read_text())
    base, stand = report["arms"]["base"], report["arms"]["stand"]
    assert list(base["scores"][0]["outcomes"]) == list(stand["scores"][0]["outcomes"])  # the same 6 tasks
    assert len(base["scores"][0]["outcomes"]) == 6
    assert stand["examples"] == 3 and stand["teacher_calls"] == 3 and stand["train_steps"] >= 1
    assert base["examples"] == 0 and base["teacher"] == "none"
    [row] = [r for r in report["comparisons"] if r["task_set"] == "all"]
    assert (row["a"], row["b"], row["n_tasks"]) == (("base", "stand", 6))
    assert "| stand |" in (out / "experiment.md").read_text()
    assert (out / "experiment.png").read_bytes()[:4] == b"\x89PNG"
    # resumed: both arms are finished, nothing runs again (no engine starts), the report is rebuilt
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 arm(s) finished already (base, stand), 0 to run" in again.stderr
    assert "student ready" not in again.stderr

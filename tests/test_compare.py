"""`persd-online compare` over a run directory and eval results (synthetic files, through the CLI)."""

from __future__ import annotations

import json

import pytest

from persd_online.cli import main
from persd_online.compare import load_entries
from persd_online.multistep import MultiStepResult
from tests.summary_fixtures import make_summary


def write_inputs(tmp_path):
    run = tmp_path / "runs" / "online"
    run.mkdir(parents=True)
    make_summary(heldout_pass1=[(0, 0.10), (4, 0.20)], teacher={
        "kind": "openai", "prompt_tokens": 900, "completion_tokens": 100, "cost_usd": 0.02}).write(run / "summary.json")
    (run / "config.yaml").write_text("method: persd_refine\neval:\n  tasks: [humaneval]\n")
    base = MultiStepResult(task_set="humaneval", adapter_version=0, n_samples=1, refine_steps=1, temperature=0.0,
                           n_tasks=20, tasks_with_seen_tests=20, pass_at_k={1: 0.1}, pass1_by_step=[0.1, 0.15],
                           refined_by_step=[0, 3], baseline_samples_per_task=2, baseline_pass_at_k=0.18,
                           baseline_seen_select_pass1=0.15, wall_s=1.0, per_task={}, extra={"adapter": None})
    trained = base.model_copy(update={"pass1_by_step": [0.2, 0.3], "extra": {
        "adapter": "adapters/stand", "offline": {"method": "stand", "teacher": None}}})
    (tmp_path / "base.json").write_text(json.dumps(base.to_json()))
    (tmp_path / "stand.json").write_text(json.dumps(trained.to_json()))
    return [run, tmp_path / "base.json", tmp_path / "stand.json"]


def test_entries_from_runs_and_evals(tmp_path):
    run, base, stand = load_entries(write_inputs(tmp_path))
    assert (run.kind, run.method, run.adapter, run.pass1, run.teacher_tokens) == (
        "run (online)", "persd_refine", "v4", 0.20, 1000)
    assert (base.method, base.pass1, base.pass1_multistep, base.resample_pass) == ("base", 0.1, 0.15, 0.18)
    assert (stand.method, stand.pass1_multistep) == ("stand", 0.3)


def test_compare_cli_prints_one_table_and_writes_a_plot(tmp_path, capsys):
    inputs = write_inputs(tmp_path)
    png = tmp_path / "cmp.png"
    assert main(["compare", *map(str, inputs), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "persd_refine" in out and "0.300 (K=1)" in out
    assert png.stat().st_size > 1000


def test_compare_rejects_what_it_cannot_read(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"kind": "other"}))
    with pytest.raises(ValueError):
        load_entries([tmp_path / "x.json"])
    assert main(["compare", str(tmp_path / "missing")]) == 2

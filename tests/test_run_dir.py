"""Run directory: naming, resume, append-only logs that survive a torn last line."""

import pytest

from persd_online.config import Config, load_config
from persd_online.run_dir import RunDir, read_jsonl


def test_create_names_and_records_config(tmp_path):
    config = load_config(None, [f"runs_dir={tmp_path}", "name=demo", "trainer.lr=1e-4"])
    first, second = RunDir.create(config), RunDir.create(config)
    assert first.root.name == "demo" and second.root.name == "demo-2"
    for sub in ("adapters", "checkpoints", "teacher_cache", "report"):
        assert (first.root / sub).is_dir()
    reopened, recorded = RunDir.resume(first.root)
    assert recorded == config and recorded.trainer.lr == 1e-4
    for run in (first, second, reopened):
        run.close()


def test_events_and_metrics_append_and_tolerate_a_torn_line(tmp_path):
    run = RunDir.create(Config(runs_dir=tmp_path))
    run.event("attempt", task_id="MBPP/601", passed=False)
    run.metrics({"loss": 1.5})
    run.close()
    with (run.root / "events.jsonl").open("a") as fh:
        fh.write('{"t": 1, "kind": "ver')  # a crash mid-write
    events = list(read_jsonl(run.root / "events.jsonl"))
    assert [e["kind"] for e in events] == ["attempt"] and events[0]["task_id"] == "MBPP/601"
    assert next(read_jsonl(run.root / "metrics.jsonl"))["loss"] == 1.5
    reopened, _ = RunDir.resume(run.root)
    reopened.event("resumed")
    reopened.close()


def test_resume_refuses_a_non_run_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        RunDir.resume(tmp_path)

"""The `persd-online` console script: every subcommand has help, and the task commands work."""

import subprocess
import sys
from pathlib import Path

import pytest

from persd_online.cli import build_parser
from persd_online.tasks import load_jsonl

SCRIPT = Path(sys.executable).parent / "persd-online"


def _subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_top_level_help_lists_every_subcommand():
    result = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for name in _subcommands():
        assert name in result.stdout


@pytest.mark.parametrize("name", _subcommands())
def test_every_subcommand_has_help(name):
    result = subprocess.run([str(SCRIPT), name, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: persd-online {name}")


def test_tasks_export_roundtrip(tmp_path):
    out = tmp_path / "val.jsonl"
    result = subprocess.run([str(SCRIPT), "tasks", "mbpp:validation", "--export", str(out)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "wrote 90 tasks" in result.stdout
    assert len(load_jsonl(out)) == 90


def test_bad_task_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": 1}\n')
    result = subprocess.run([str(SCRIPT), "tasks", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"{bad}:1: prompt: required field is missing" in result.stderr

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


def _fails_cleanly(*args: str, timeout: float = 60) -> str:
    """Run the command; it must exit 2 with one error message and no traceback. Returns stderr."""
    result = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and result.stderr.startswith("error: ")
    return result.stderr


def test_bad_input_gets_an_error_not_a_traceback(tmp_path):
    assert "mbpp:validation" in _fails_cleanly("tasks", "mbpp:nosuch")
    assert "unknown task set 'nosuch'" in _fails_cleanly("tasks", "nosuch")
    latin1 = tmp_path / "tasks.jsonl"
    latin1.write_bytes(b'{"task_id": "caf\xe9", "prompt": "p", "entry_point": "f", "tests": ["assert f()"]}\n')
    assert f"{latin1}:1: not UTF-8 text (byte 0xe9" in _fails_cleanly("tasks", str(latin1))
    assert "unknown arm(s) nosuch" in _fails_cleanly("experiment", "--arms", "base", "nosuch")
    assert "at most 40" in _fails_cleanly("experiment", "--set", "experiment.budget=41",
                                          "--set", f"runs_dir={tmp_path}")


def test_eval_refuses_a_directory_without_an_adapter_before_starting_the_engine(tmp_path):
    message = _fails_cleanly("eval", "--adapter", str(tmp_path), "--set", f"runs_dir={tmp_path}")
    assert "is not a published adapter" in message
    assert "vllm" not in message.lower() and not list(tmp_path.rglob("zero-adapter"))  # nothing was started

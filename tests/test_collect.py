"""Fast checks of the offline pieces: refinement under a spent budget, inpd de-duplication, adapter lookup,
and reading example files. (The real stack runs in tests/test_baselines.py.)"""

from __future__ import annotations

import asyncio
import json

import pytest

from persd_online import adapters
from persd_online.budget import BudgetExhausted
from persd_online.cascade import Cascade, Tier
from persd_online.collect import build_examples, refine_failures
from persd_online.offline import read_examples, resolve_adapter
from persd_online.records import Attempt, Verdict
from persd_online.tasks import Task
from persd_online.teacher import refinement_record

TASK = Task(task_id="t", prompt="Return a plus b.", entry_point="add", tests=["assert add(1, 2) == 3"],
            reference="def add(a, b):\n    return a + b\n")


class Template:
    def apply_chat_template(self, conversation, **kwargs):
        return "".join(m["content"] for m in conversation) + "\n<assistant>"


def attempt(i: int) -> tuple[Attempt, Verdict]:
    a = Attempt(attempt_id=f"t#{i}", task_id="t", sample_index=i, adapter_version=0, prompt_format="chat",
                completion="", program="def add(a, b):\n    return a - b\n", prompt_tokens=1, completion_tokens=1)
    return a, Verdict(subject_id=a.attempt_id, status="failed", passed=False, feedback="Input: (1, 2) Output: -1",
                      duration_s=0.0)


class OneCallTeacher:
    """Answers the reference once, then its budget is spent."""

    kind = "test"

    def __init__(self) -> None:
        self.calls = 0

    async def propose(self, task, attempt_id, program, feedback, round_no):
        self.calls += 1
        if self.calls > 1:
            raise BudgetExhausted("budget_tokens reached")
        return refinement_record(task, attempt_id, round_no, self.kind, "call-1", task.reference)


class PassIfReference:
    async def run(self, task, program, subject_id):
        ok = program == task.reference
        return Verdict(subject_id=subject_id, status="passed" if ok else "failed", passed=ok,
                       feedback="" if ok else "x", duration_s=0.0)


def test_a_spent_budget_stops_refinement_and_keeps_what_was_refined():
    pairs = [attempt(i) for i in range(3)]
    attempts, verdicts = [p[0] for p in pairs], [p[1] for p in pairs]
    cascade = Cascade([Tier("test", OneCallTeacher())], PassIfReference())
    outcomes, stop = asyncio.run(refine_failures(cascade, [TASK], attempts, verdicts))
    assert stop and "budget" in stop
    assert len(outcomes) == 1 and next(iter(outcomes.values())).verified is not None
    persd = build_examples("persd", [TASK], attempts, verdicts, outcomes, Template(), "chat")
    assert len(persd) == 1


def test_inpd_gives_one_example_per_failed_task_and_none_for_passed():
    pairs = [attempt(0), attempt(1)]
    attempts, verdicts = [p[0] for p in pairs], [p[1] for p in pairs]
    inpd = build_examples("inpd", [TASK], attempts, verdicts, {}, Template(), "chat")
    assert len(inpd) == 1 and inpd[0].method == "inpd"
    passed = [v.model_copy(update={"passed": True, "status": "passed"}) for v in verdicts]
    assert build_examples("inpd", [TASK], attempts, passed, {}, Template(), "chat") == []


def test_resolve_adapter_takes_a_version_dir_or_the_newest_under_adapters(tmp_path):
    for v in (1, 2):
        d = adapters.version_dir(tmp_path / "adapters", v)
        d.mkdir(parents=True)
        (d / adapters.MARKER).touch()
        (d / adapters.VERSION_FILE).write_text(json.dumps({"version": v}))
    (tmp_path / "adapters" / "v0003").mkdir()  # unpublished: ignored
    assert resolve_adapter(tmp_path) == (2, tmp_path / "adapters" / "v0002")
    assert resolve_adapter(tmp_path / "adapters" / "v0001") == (1, tmp_path / "adapters" / "v0001")
    with pytest.raises(FileNotFoundError):
        resolve_adapter(tmp_path / "adapters" / "v0003")


def test_read_examples_names_the_bad_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"nope": 1}\n')
    with pytest.raises(ValueError, match="data.jsonl:1"):
        read_examples(path)

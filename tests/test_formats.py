"""PERsD training examples: each method's filter and shape, lineage, ids, rendered with the real student
tokenizer's chat template (and the plain completion format)."""

from __future__ import annotations

import pytest

from persd_online.formats import attempt_examples, stand_examples
from persd_online.prompts import attempt_prompt, refine_prompt, render, target_text
from persd_online.records import Attempt, Refinement, Verdict
from persd_online.tasks import Task
from persd_online.verify import RefinementOutcome, VerifiedRound

ADD = Task(task_id="t/add", prompt="Return the sum of a and b.", entry_point="add",
           tests=["assert add(1, 2) == 3"], header="def add(a, b):",
           reference="def add(a, b):\n    return a + b\n")
NEG = Task(task_id="t/neg", prompt="Return -x.", entry_point="neg", tests=["assert neg(1) == -1"],
           header="def neg(x):", reference="def neg(x):\n    return -x\n")
NO_REFERENCE = Task(task_id="t/free", prompt="Return 1.", entry_point="one", tests=["assert one() == 1"])
WRONG = "def add(a, b):\n    return a - b\n"
FEEDBACK = "Input: add(1, 2)\nOutput: -1\nExpected: 3"
REFINED = "def add(a, b):\n    return b + a\n"


@pytest.fixture(scope="module")
def tokenizer(student_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(student_model)


@pytest.fixture(params=["chat", "completion"])
def fmt(request):
    return request.param


def attempt(attempt_id: str = "a-1", program: str = WRONG) -> Attempt:
    return Attempt(attempt_id=attempt_id, task_id=ADD.task_id, sample_index=0, adapter_version=4,
                   prompt_format="chat", completion=program, program=program, prompt_tokens=1,
                   completion_tokens=1)


def verdict(subject_id: str, passed: bool, feedback: str = FEEDBACK) -> Verdict:
    return Verdict(subject_id=subject_id, status="passed" if passed else "failed", passed=passed,
                   feedback="" if passed else feedback, duration_s=0.1)


def outcome(*passes: bool, attempt_id: str = "a-1") -> RefinementOutcome:
    """Refinement rounds of `attempt_id` with the given verdicts."""
    rounds = []
    for i, passed in enumerate(passes, start=1):
        refinement = Refinement(refinement_id=f"r{i}", attempt_id=attempt_id, task_id=ADD.task_id, round=i,
                                teacher_kind="openai", teacher_call_id=f"call-{i}",
                                program=REFINED if passed else WRONG)
        rounds.append(VerifiedRound(refinement=refinement, verdict=verdict(f"r{i}", passed, "Failed: x")))
    return RefinementOutcome(attempt_id=attempt_id, task_id=ADD.task_id, rounds=rounds)


def failed_examples(method, tokenizer, fmt, result=None):
    return attempt_examples(method, ADD, attempt(), verdict("a-1", False), result, tokenizer, fmt)


def test_stand_covers_every_task_with_a_reference(tokenizer, fmt):
    examples = stand_examples([ADD, NEG, NO_REFERENCE], tokenizer, fmt)
    assert [e.task_id for e in examples] == [ADD.task_id, NEG.task_id]
    for example, task in zip(examples, [ADD, NEG], strict=True):
        assert example.method == "stand"
        assert example.prompt == render(attempt_prompt(task, fmt), tokenizer)
        assert example.completion == target_text(task, task.reference, fmt)
        assert (example.source_attempt_id, example.adapter_version, example.teacher_call_id) == (None,) * 3


def test_chat_prompts_use_the_students_template(tokenizer):
    (example,) = stand_examples([ADD], tokenizer, "chat")
    assert example.prompt.startswith("<|im_start|>") and example.prompt.endswith("<|im_start|>assistant\n")
    assert example.completion == f"```python\n{ADD.reference.strip()}\n```"


def test_inpd_labels_failed_tasks_with_the_reference(tokenizer, fmt):
    (example,) = failed_examples("inpd", tokenizer, fmt)
    assert example.method == "inpd"
    assert example.prompt == render(attempt_prompt(ADD, fmt), tokenizer)
    assert example.completion == target_text(ADD, ADD.reference, fmt)
    assert (example.source_attempt_id, example.adapter_version, example.teacher_call_id) == ("a-1", 4, None)
    passed = attempt_examples("inpd", ADD, attempt(), verdict("a-1", True), None, tokenizer, fmt)
    assert passed == []


def test_persd_labels_only_verified_refinements(tokenizer, fmt):
    (example,) = failed_examples("persd", tokenizer, fmt, outcome(False, True))
    assert example.method == "persd"
    assert example.prompt == render(attempt_prompt(ADD, fmt), tokenizer)
    assert example.completion == target_text(ADD, REFINED, fmt)
    lineage = (example.source_attempt_id, example.adapter_version, example.teacher_call_id)
    assert lineage == ("a-1", 4, "call-2")
    assert failed_examples("persd", tokenizer, fmt, outcome(False, False)) == []
    assert failed_examples("persd", tokenizer, fmt, None) == []
    passed = attempt_examples("persd", ADD, attempt(), verdict("a-1", True), None, tokenizer, fmt)
    assert passed == []


def test_persd_refine_prompt_holds_the_wrong_code_and_its_feedback(tokenizer, fmt):
    (example,) = failed_examples("persd_refine", tokenizer, fmt, outcome(True))
    assert example.method == "persd_refine"
    assert example.prompt == render(refine_prompt(ADD, WRONG, FEEDBACK, fmt), tokenizer)
    assert "return a - b" in example.prompt
    assert all(part in example.prompt for part in ("add(1, 2)", "-1", "3"))
    assert example.completion == target_text(ADD, REFINED, fmt)
    assert example.teacher_call_id == "call-1"


def test_persd_combine_is_both(tokenizer, fmt):
    combined = failed_examples("persd_combine", tokenizer, fmt, outcome(True))
    separate = [*failed_examples("persd", tokenizer, fmt, outcome(True)),
                *failed_examples("persd_refine", tokenizer, fmt, outcome(True))]
    assert combined == separate and len(combined) == 2


def test_example_ids_follow_content_and_lineage(tokenizer):
    first = failed_examples("persd", tokenizer, "chat", outcome(True))[0]
    assert failed_examples("persd", tokenizer, "chat", outcome(True))[0].example_id == first.example_id
    other = attempt_examples("persd", ADD, attempt("a-2"), verdict("a-2", False),
                             outcome(True, attempt_id="a-2"), tokenizer, "chat")[0]
    assert other.completion == first.completion and other.example_id != first.example_id
    inpd = failed_examples("inpd", tokenizer, "chat")[0]
    assert len({first.example_id, other.example_id, inpd.example_id}) == 3


def test_mismatched_records_and_stand_are_rejected(tokenizer):
    with pytest.raises(ValueError, match="do not all belong"):
        attempt_examples("persd", ADD, attempt(), verdict("a-9", False), None, tokenizer, "chat")
    with pytest.raises(ValueError, match="do not all belong"):
        failed_examples("persd", tokenizer, "chat", outcome(True, attempt_id="a-9"))
    with pytest.raises(ValueError, match="stand_examples"):
        failed_examples("stand", tokenizer, "chat")

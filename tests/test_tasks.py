"""Task loaders: record counts of the vendored sets and the user JSONL format's error messages."""

import json

import pytest

from persd_online.tasks import MBPP_SPLITS, TaskFormatError, load_humaneval, load_jsonl, load_mbpp, load_tasks


def test_humaneval_has_164_tasks_scored_on_hidden_tests():
    tasks = load_humaneval()
    assert len(tasks) == 164
    assert len({t.task_id for t in tasks}) == 164
    assert all(isinstance(t.tests, str) and "def check(" in t.tests for t in tasks)
    # The 25 tasks whose seen split is empty, unparsable or reads undefined names have no seen tests.
    assert sum(t.seen_tests is None for t in tasks) == 25
    # HumanEval/44's formatted check reads a variable nothing defines: scored with the original `test`.
    he44 = next(t for t in tasks if t.task_id == "HumanEval/44")
    assert "check_assert" not in he44.tests and "def check(candidate)" in he44.tests
    # HumanEval/32 lost its formatted tests; it is scored with the original `test`.
    he32 = next(t for t in tasks if t.task_id == "HumanEval/32")
    assert "candidate(copy.deepcopy(coeffs))" in he32.tests


@pytest.mark.parametrize(("split", "count"), [("prompt", 10), ("test", 500), ("validation", 90),
                                              ("train", 374), ("all", 974)])
def test_mbpp_split_sizes(split, count):
    tasks = load_mbpp(split)
    assert len(tasks) == count
    low, high = MBPP_SPLITS[split]
    assert all(low <= int(t.task_id.split("/")[1]) <= high for t in tasks)


def test_mbpp_task_shape():
    task = next(t for t in load_mbpp("train") if t.task_id == "MBPP/601")
    assert task.entry_point == "max_chain_length"
    assert task.header == "def max_chain_length(arr, n):"
    assert task.seen_tests == [task.tests[0]] and len(task.tests) == 3
    assert task.tests[0] in task.prompt and "class Pair" in task.reference


def test_load_tasks_dispatches_specs(tmp_path):
    assert len(load_tasks("mbpp:validation")) == 90
    assert len(load_tasks("humaneval")) == 164
    with pytest.raises(ValueError, match="unknown task set"):
        load_tasks("codecontests")


def _write(tmp_path, records):
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


GOOD = {"task_id": "add", "prompt": "Add two numbers.", "entry_point": "add",
        "tests": ["assert add(1, 2) == 3"], "reference": "def add(a, b):\n    return a + b\n"}


def test_user_jsonl_both_test_forms(tmp_path):
    check = {"task_id": 7, "prompt": "Negate.", "entry_point": "neg",
             "tests": "def check(candidate):\n    assert candidate(1) == -1\n", "setup": "import math"}
    tasks = load_jsonl(_write(tmp_path, [GOOD, check]))
    assert [t.task_id for t in tasks] == ["add", "7"]
    assert tasks[1].setup == "import math" and tasks[0].source.endswith("tasks.jsonl")
    # The export format is the input format.
    again = load_jsonl(_write(tmp_path, [t.to_record() for t in tasks]))
    assert [t.model_dump(exclude={"source"}) for t in again] == [t.model_dump(exclude={"source"}) for t in tasks]


@pytest.mark.parametrize(("record", "message"), [
    ('{"task_id": "x", ', ":2: not valid JSON"),
    ({k: v for k, v in GOOD.items() if k != "entry_point"}, ":2: entry_point: required field is missing"),
    (GOOD | {"task_id": "b", "tests": "assert add(1, 2) == 3"}, ":2: tests: a string of tests must define"),
    (GOOD | {"task_id": "b", "tests": ["assert add(1, 2) =="]}, ":2: tests: item 0 is not valid Python"),
    (GOOD | {"task_id": "b", "tests": []}, ":2: tests: must hold at least one assert line"),
    (GOOD | {"task_id": "b", "entry_point": "add two"}, ":2: entry_point: must be a Python identifier"),
    (GOOD | {"task_id": "b", "prompt": 5}, ":2: prompt: Input should be a valid string"),
    (GOOD | {"task_id": "b", "solution": "x"}, ":2: solution: unknown field (allowed: task_id"),
    (GOOD, ":2: task_id: duplicate 'add' (first on line 1)"),
    ("[1, 2]", ":2: expected a JSON object, got list"),
])
def test_user_jsonl_errors_name_file_line_and_field(tmp_path, record, message):
    path = _write(tmp_path, [GOOD, record])
    with pytest.raises(TaskFormatError) as info:
        load_jsonl(path)
    assert f"{path}{message}" in str(info.value)


def test_user_jsonl_reports_every_bad_record(tmp_path):
    path = _write(tmp_path, [GOOD, "not json", GOOD | {"task_id": "c", "tests": []}])
    with pytest.raises(TaskFormatError, match=r"2 malformed task record\(s\)") as info:
        load_jsonl(path)
    assert ":2:" in str(info.value) and ":3:" in str(info.value)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(TaskFormatError, match="no tasks"):
        load_jsonl(_write(tmp_path, []))
    with pytest.raises(FileNotFoundError, match="task file not found"):
        load_jsonl(tmp_path / "nope.jsonl")

"""Every HumanEval canonical solution passes; simple wrong solutions fail (status ``failed``, with feedback).

The suites are built here from the vendored JSONL exactly as a caller of the sandbox would: the original
``test`` (what ``human_eval`` runs) and, where it compiles, the PERsD ``test_all`` (``check_assert`` helper).
"""

from __future__ import annotations

import textwrap
from typing import Any

import pytest

from sandbox import InvalidTests, Job, SandboxPool, Status, TestSuite
from sandbox.checks import compile_suite

# The wrong program runs the canonical solution in a namespace of its own (so recursion still reaches the
# right function) and perturbs what it returns, whatever the type.
WRONG_WRAPPER = textwrap.dedent('''
    _canonical = {{}}
    exec({source!r}, _canonical)

    def _perturb(value):
        if isinstance(value, bool):
            return not value
        if isinstance(value, (int, float)):
            return value + 1
        if isinstance(value, str):
            return value + "x"
        if isinstance(value, list):
            return value + [None]
        if isinstance(value, tuple):
            return value + (None,)
        if value is None:
            return 0
        return None

    def {entry_point}(*args, **kwargs):
        return _perturb(_canonical[{entry_point!r}](*args, **kwargs))
''')

# The formatting of these tasks' test_all dropped a loop but kept its body, which uses the loop variable
# (`check_assert('==', (x, y), candidate(x, y), x + y)`): even the canonical solution gets a NameError.
LOST_LOOP_VARIABLES = {"HumanEval/38", "HumanEval/44", "HumanEval/53", "HumanEval/151"}


def _suites(task: dict[str, Any]) -> list[tuple[str, TestSuite]]:
    suites = [("test", TestSuite(task["entry_point"], task["test"], prompt=task["prompt"]))]
    persd = TestSuite(task["entry_point"], task["test_all"], prompt=task["prompt"])
    try:
        compile_suite(persd)
    except InvalidTests:  # ten tasks' formatted tests are empty or broken (see persd_online/data/README.md)
        return suites
    if task["task_id"] not in LOST_LOOP_VARIABLES:
        suites.append(("test_all", persd))
    return suites


@pytest.fixture(scope="module")
def verdicts(pool: SandboxPool, humaneval: list[dict[str, Any]]) -> dict[str, list[tuple[str, str, Any]]]:
    kinds: dict[str, list[tuple[str, str, Job]]] = {"canonical": [], "returns_none": [], "perturbed": []}
    for task in humaneval:
        canonical = task["prompt"] + task["canonical_solution"]
        returns_none = f"def {task['entry_point']}(*args, **kwargs):\n    return None\n"
        perturbed = WRONG_WRAPPER.format(source=canonical, entry_point=task["entry_point"])
        for split, suite in _suites(task):
            kinds["canonical"].append((task["task_id"], split, Job(canonical, suite)))
            kinds["returns_none"].append((task["task_id"], split, Job(returns_none, suite)))
            kinds["perturbed"].append((task["task_id"], split, Job(perturbed, suite)))
    flat = [job for jobs in kinds.values() for _, _, job in jobs]
    results = iter(pool.run_batch(flat))
    return {kind: [(task_id, split, next(results)) for task_id, split, _ in jobs] for kind, jobs in kinds.items()}


def test_all_164_tasks_and_both_test_splits_are_used(verdicts: dict) -> None:
    canonical = verdicts["canonical"]
    assert len({task_id for task_id, _, _ in canonical}) == 164
    splits = [split for _, split, _ in canonical]
    assert splits.count("test") == 164 and splits.count("test_all") == 150


def test_every_canonical_solution_passes(verdicts: dict) -> None:
    wrong = [(task_id, split, r.status.value, r.feedback) for task_id, split, r in verdicts["canonical"]
             if r.status is not Status.PASSED]
    assert wrong == []


@pytest.mark.parametrize("kind", ["returns_none", "perturbed"])
def test_simple_wrong_solutions_fail(verdicts: dict, kind: str) -> None:
    not_failed = [(task_id, split, r.status.value, r.feedback) for task_id, split, r in verdicts[kind]
                  if r.status is not Status.FAILED or not r.feedback]
    assert not_failed == []
    assert all(any(t.status is Status.FAILED for t in r.tests) for _, _, r in verdicts[kind])


def test_wrong_solution_feedback_is_persd_style(verdicts: dict) -> None:
    by_task = {(task_id, split): r for task_id, split, r in verdicts["perturbed"]}
    # The formatted tests' check_assert message is passed through as is.
    assert by_task["HumanEval/0", "test_all"].feedback.startswith(
        "Input: ([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) Output: False Expected: True")
    # Plain asserts are rendered from the recorded call and comparison.
    assert by_task["HumanEval/0", "test"].feedback == (
        "Input: ([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) Output: False Expected: True")
    by_task = {(task_id, split): r for task_id, split, r in verdicts["returns_none"]}
    assert by_task["HumanEval/2", "test"].feedback == "Input: 3.5 Output: None Expected: 0.5"

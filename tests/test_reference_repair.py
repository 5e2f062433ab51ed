"""The reference_repair teacher tier and the personalisation measure.

Fast: the main cases run through the real sandbox (an in-process pool behind `PoolExecutor`); a scripted
executor counts runs and batches where the budget and the search order are checked.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Iterator

import pytest

from persd_online.config import ReferenceRepairTier
from persd_online.executor import PoolExecutor
from persd_online.personalisation import Hunk, apply_hunks, edit_distance, line_hunks
from persd_online.records import Refinement, Verdict
from persd_online.reference_repair import ReferenceRepair, _compiles, hunk_subsets, rename_entry, search_candidates
from persd_online.tasks import Task, load_tasks
from sandbox import SandboxPool


def make_task(entry_point: str, tests: list[str], reference: str, task_id: str = "t") -> Task:
    return Task(task_id=task_id, prompt=f"Write {entry_point}.", entry_point=entry_point, tests=tests,
                reference=reference)


@pytest.fixture(scope="module")
def pool() -> Iterator[SandboxPool]:
    with SandboxPool(workers=2, timeout=5.0, memory_mb=512, pin_cpus=False) as shared:
        yield shared


class ScriptedExecutor:
    """Passes the programs `passes` accepts; records every program run and the size of each batch."""

    def __init__(self, passes: Callable[[str], bool] = lambda program: False) -> None:
        self.passes = passes
        self.programs: list[str] = []
        self.batches: list[int] = []
        self._in_flight = 0

    async def run(self, task: Task, program: str, subject_id: str) -> Verdict:
        if self._in_flight == 0:
            self.batches.append(0)
        self.batches[-1] += 1
        self._in_flight += 1
        self.programs.append(program)
        await asyncio.sleep(0)
        self._in_flight -= 1
        ok = self.passes(program)
        return Verdict(subject_id=subject_id, status="passed" if ok else "failed", passed=ok,
                       feedback="" if ok else "failed", duration_s=0.0)


def repair(executor, task: Task, attempt: str, round_no: int = 1,
           **config) -> tuple[Refinement | None, ReferenceRepair]:
    teacher = ReferenceRepair(ReferenceRepairTier(**config), executor)
    return asyncio.run(teacher.propose(task, "attempt-1", attempt, "some feedback", round_no)), teacher


def passes(pool: SandboxPool, task: Task, program: str) -> bool:
    return asyncio.run(PoolExecutor(pool).run(task, program, "check")).passed


SUM_EVENS = make_task("sum_evens", ["assert sum_evens([1, 2, 3, 4]) == 6", "assert sum_evens([]) == 0",
                                    "assert sum_evens([5]) == 0"],
                      'def sum_evens(xs):\n    """Sum of the even numbers in xs."""\n    total = 0\n    for x in xs:\n'
                      '        if x % 2 == 0:\n            total += x\n    return total\n')
SUM_EVENS_ATTEMPT = ("def sum_evens(xs):\n    # add up the even ones\n    total = 0\n    for x in xs:\n"
                     "        if x % 2 == 1:\n            total += x\n    print('done')\n    return total\n")


def test_finds_the_minimal_edit_not_the_whole_reference(pool):
    label, teacher = repair(PoolExecutor(pool), SUM_EVENS, SUM_EVENS_ATTEMPT)
    assert label is not None and label.personalised is True
    assert label.program == SUM_EVENS_ATTEMPT.replace("x % 2 == 1", "x % 2 == 0")
    assert edit_distance(label.program, SUM_EVENS_ATTEMPT).changed_lines == 1
    assert edit_distance(SUM_EVENS.reference, SUM_EVENS_ATTEMPT).changed_lines == 3
    assert passes(pool, SUM_EVENS, label.program)
    assert (label.teacher_kind, label.prompt_tokens, label.completion_tokens, label.cost_usd, label.round) == (
        "reference_repair", 0, 0, 0.0, 1)
    # 3 hunks: the 6 proper subsets fit one batch; the search stopped there.
    assert teacher.state() == {"calls": 1, "edits": 1, "normalised": 0, "fallbacks": 0, "declined": 0,
                               "budget_exhausted": 0, "examine_capped": 0, "sandbox_runs": 6,
                               "skipped_uncompilable": 0}
    again, _ = repair(PoolExecutor(pool), SUM_EVENS, SUM_EVENS_ATTEMPT)
    assert again == label  # deterministic: same program, same call and refinement ids


def test_the_rename_alone_fixes_a_misnamed_recursive_function(pool):
    task = make_task("factorial", ["assert factorial(5) == 120", "assert factorial(1) == 1"],
                     "def factorial(n):\n    result = 1\n    for k in range(2, n + 1):\n        result *= k\n"
                     "    return result\n")
    attempt = "def fact(n):\n    if n <= 1:\n        return 1\n    return n * fact(n - 1)\n"
    label, teacher = repair(PoolExecutor(pool), task, attempt)
    assert label is not None and label.personalised is True
    assert label.program == attempt.replace("fact(", "factorial(")
    assert passes(pool, task, label.program)
    assert teacher.counts.normalised == 1 and teacher.counts.sandbox_runs == 1  # the normalisations' own batch


def test_a_missing_import_is_added(pool):
    task = make_task("hypotenuse", ["assert hypotenuse(3, 4) == 5.0"],
                     "import math\n\n\ndef hypotenuse(a, b):\n    return math.hypot(a, b)\n")
    attempt = "def hypotenuse(a, b):\n    return math.sqrt(a * a + b * b)\n"
    label, teacher = repair(PoolExecutor(pool), task, attempt)
    assert label is not None and label.personalised is True
    assert label.program == "import math\n" + attempt
    assert passes(pool, task, label.program)
    assert teacher.counts.normalised == 1 and teacher.counts.sandbox_runs == 1


def test_the_signature_is_aligned_to_the_reference(pool):
    task = make_task("scale", ["assert scale(3) == 6", "assert scale(3, 3) == 9"],
                     "def scale(x, factor=2):\n    result = x * factor\n    return result\n")
    attempt = "def scale(x):\n    return x * factor\n"
    label, _ = repair(PoolExecutor(pool), task, attempt)
    assert label is not None and label.personalised is True
    assert label.program == "def scale(x, factor=2):\n    return x * factor\n"


FALLBACK = make_task("f", ["assert f(1) == 2", "assert f(5) == 6"],
                     "def f(x):\n    z = x + 1\n    # twice, minus one\n    return z\n")
FALLBACK_ATTEMPT = "def f(x):\n    y = x * 2\n    # twice, minus one\n    return y - 1\n"


def test_falls_back_to_the_reference_when_no_edit_passes(pool):
    label, teacher = repair(PoolExecutor(pool), FALLBACK, FALLBACK_ATTEMPT)
    assert label is not None and label.personalised is False and label.program == FALLBACK.reference
    assert label.teacher_kind == "reference_repair"
    assert teacher.counts.fallbacks == 1 and teacher.counts.edits == 0 and teacher.counts.sandbox_runs == 2


def test_next_tier_returns_nothing_when_no_edit_passes(pool):
    label, teacher = repair(PoolExecutor(pool), FALLBACK, FALLBACK_ATTEMPT, on_no_edit="next_tier")
    assert label is None
    assert teacher.counts.declined == 1 and teacher.counts.fallbacks == 0


def test_no_reference_or_a_later_round_gets_nothing():
    executor = ScriptedExecutor()
    no_reference = Task(task_id="n", prompt="p", entry_point="f", tests=["assert f() == 1"])
    assert repair(executor, no_reference, "def f():\n    return 2\n")[0] is None
    assert repair(executor, FALLBACK, FALLBACK_ATTEMPT, round_no=2)[0] is None
    assert executor.programs == []


# Nine independent one-line hunks (eight assignments and the return): 2**9 - 2 = 510 proper subsets, all compile.
WIDE_ATTEMPT = "def f():\n" + "".join(f"    a{i} = 0\n    x = {i + 10}\n" for i in range(8)) + "    return 0\n"
WIDE_REFERENCE = WIDE_ATTEMPT.replace(" = 0\n", " = 1\n").replace("return 0", "return a0")
WIDE = make_task("f", ["assert f() == 1"], WIDE_REFERENCE)


def test_respects_the_candidate_budget_in_batches():
    executor = ScriptedExecutor()
    label, teacher = repair(executor, WIDE, WIDE_ATTEMPT, candidate_budget=10, batch=4)
    assert len(executor.programs) == 10 and executor.batches == [4, 4, 2]
    assert teacher.counts.sandbox_runs == 10 and teacher.counts.budget_exhausted == 1
    assert label is not None and label.personalised is False
    # Enough budget: every proper subset runs once, and the budget did not run out.
    executor = ScriptedExecutor()
    _, teacher = repair(executor, WIDE, WIDE_ATTEMPT, candidate_budget=1000, batch=64)
    assert len(executor.programs) == len(set(executor.programs)) == 2**9 - 2
    assert teacher.counts.budget_exhausted == 0 and executor.batches == [64] * 7 + [62]


def test_uncompilable_candidates_are_skipped_without_a_run():
    task = make_task("f", ["assert f('x') == 0"], "def f(x):\n    try:\n        y = int(x)\n"
                     "    except ValueError:\n        y = 0\n    return y\n")
    attempt = "def f(x):\n    if True:\n        y = int(x)\n    return y\n"
    executor = ScriptedExecutor(lambda program: True)
    label, teacher = repair(executor, task, attempt)
    # Either hunk alone is a `try` without `except` or an `except` without `try`.
    assert executor.programs == [] and teacher.counts.skipped_uncompilable == 2
    assert label is not None and label.personalised is False


def test_compiling_candidates_is_capped_too():
    # Every hunk swaps one bracket of a pair: no proper subset of them compiles.
    attempt = "def f(x):\n" + "".join(f"    y{i} = (\n        {i},\n    )\n" for i in range(20)) + "    return 0\n"
    reference = attempt.replace("(\n", "[\n").replace("    )\n", "    ]\n").replace("return 0", "return 1")
    executor = ScriptedExecutor()
    label, teacher = repair(executor, make_task("f", ["assert f(0) == 1"], reference), attempt, candidate_budget=4)
    assert executor.programs == [] and teacher.counts.skipped_uncompilable == 16 * 4
    assert teacher.counts.examine_capped == 1 and teacher.counts.budget_exhausted == 0
    assert label is not None and label.personalised is False


def test_never_returns_a_failing_program_as_an_edit():
    for salt in range(20):
        def accepted(program: str, salt: int = salt) -> bool:
            return hashlib.sha256(f"{salt}{program}".encode()).digest()[0] < 16  # about 1 in 16

        executor = ScriptedExecutor(accepted)
        label, _ = repair(executor, WIDE, WIDE_ATTEMPT, candidate_budget=40, batch=8)
        assert label is not None
        ran = executor.programs
        assert all(_compiles(program) for program in ran)
        if label.personalised:
            assert accepted(label.program)
            first = next(i for i, program in enumerate(ran) if accepted(program))
            assert label.program == ran[first]  # the first passing in search order
            assert len(ran) == -(-(first + 1) // 8) * 8  # stopped after that batch
        else:
            assert label.program == WIDE.reference and not any(accepted(program) for program in ran)


def test_search_order_is_smallest_first():
    hunks = [Hunk(0, 1, ("a", "b")), Hunk(2, 3, ("c",)), Hunk(4, 5, ("d",))]
    assert list(hunk_subsets(hunks)) == [(1,), (2,), (0,), (1, 2), (0, 1), (0, 2)]
    assert list(hunk_subsets(hunks[:1])) == []  # the only subset is the whole reference
    sizes = [edit_distance(c.program, WIDE_ATTEMPT).changed_lines
             for c in search_candidates(WIDE, WIDE_ATTEMPT, max_examined=1000)]
    assert sizes == sorted(sizes) and sizes[0] == 1 and len(sizes) == 2**9 - 2


def test_state_round_trips_and_describe_reports_counters():
    executor = ScriptedExecutor()
    _, teacher = repair(executor, WIDE, WIDE_ATTEMPT, candidate_budget=5)
    restored = ReferenceRepair(ReferenceRepairTier(), executor, teacher.state())
    assert restored.state() == teacher.state() and all(isinstance(v, int) for v in teacher.state().values())
    info = teacher.describe()
    assert info["kind"] == "reference_repair" and info["calls"] == 1 and info["sandbox_runs"] == 5
    assert (info["prompt_tokens"], info["completion_tokens"], info["cost_usd"]) == (0, 0, 0.0)
    with pytest.raises(ValueError, match="expected"):
        ReferenceRepair(ReferenceRepairTier(), executor, {"calls": 1})


def test_edit_distance_on_known_inputs():
    four = "a\nb\nc\nd\n"
    assert edit_distance(four, four) == edit_distance("a  \nb\nc\nd", four)  # trailing whitespace ignored
    same = edit_distance(four, four)
    assert (same.changed_lines, same.ratio, same.hunks) == (0, 0.0, 0)
    one = edit_distance("a\nB\nc\nd\n", four)
    assert (one.changed_lines, one.ratio, one.hunks) == (1, 0.25, 1)
    assert edit_distance("a\nb\nx\ny\nc\nd\n", four).changed_lines == 2  # two lines inserted
    assert edit_distance("a\nd\n", four).changed_lines == 2  # two lines deleted
    assert edit_distance("a\nX\nY\nZ\nc\nd\n", four).changed_lines == 3  # one line replaced by three
    two = edit_distance("B\nc\nd\nE\n", four)  # delete a, replace b, insert E... as difflib aligns it
    assert two.changed_lines == 3 and two.hunks == 2
    empty = edit_distance("x\ny\n", "")
    assert (empty.changed_lines, empty.ratio) == (2, 2.0)
    assert edit_distance("    indented\n", "indented\n").changed_lines == 1  # indentation counts
    label = "a\nB\nc\nx\nd\n"
    assert apply_hunks(four.splitlines(), line_hunks(four, label)) == label.splitlines()


def _mutate(task: Task, rename: bool) -> str | None:
    """The reference with a comment line on top, its last `return` returning None and, with `rename`, its
    function under another name."""
    lines = task.reference.splitlines()
    returns = [i for i, line in enumerate(lines) if line.strip().startswith("return ")]
    if not returns:
        return None
    i = returns[-1]
    lines[i] = lines[i][:len(lines[i]) - len(lines[i].lstrip())] + "return None"
    attempt = "# my attempt\n" + "\n".join(lines) + "\n"
    return (rename_entry(attempt, f"my_{task.entry_point}") or attempt) if rename else attempt


def test_repairs_of_mutated_mbpp_train_tasks_are_closer_than_the_reference(pool):
    tasks = load_tasks("mbpp:train")[:10]
    executor = PoolExecutor(pool)
    pairs = [(task, attempt) for i, task in enumerate(tasks) if (attempt := _mutate(task, i % 2 == 0)) is not None]
    assert sum(f"my_{task.entry_point}" in attempt for task, attempt in pairs) >= 3

    async def run_all():
        verdicts = await asyncio.gather(*(executor.run(t, a, t.task_id) for t, a in pairs))
        failing = [(t, a) for (t, a), v in zip(pairs, verdicts, strict=True) if not v.passed]
        teacher = ReferenceRepair(ReferenceRepairTier(), executor)
        labels = await asyncio.gather(*(teacher.propose(t, f"a-{t.task_id}", a, "", 1) for t, a in failing))
        return failing, labels

    failing, labels = asyncio.run(run_all())
    assert len(failing) >= 7
    for (task, attempt), label in zip(failing, labels, strict=True):
        assert label is not None and label.personalised is True, task.task_id
        ours, theirs = edit_distance(label.program, attempt), edit_distance(task.reference, attempt)
        assert ours.changed_lines < theirs.changed_lines, task.task_id
        assert label.program.startswith("# my attempt\n")

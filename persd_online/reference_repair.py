"""The `reference_repair` teacher tier: the smallest verified edit of the student's failed attempt toward the
task's reference solution.

PERsD wants a label that passes the tests and stays close to what the student wrote. With a reference at
hand, a cheap such label often exists without any LLM: the attempt with only the reference's lines that fix
it. `ReferenceRepair` (a `teacher.Teacher`, kind `reference_repair`) searches for it in the sandbox. It answers
in round 1 only (later rounds: None, like `ReferenceOracle`), and only for tasks with a reference.

DISTANCE MEASURE (`personalisation.edit_distance`, the one implementation): lines compared without trailing
whitespace, aligned by `difflib.SequenceMatcher(autojunk=False)` from the attempt to the label; every
non-equal block is a hunk that changes max(attempt lines removed, label lines inserted) lines; changed_lines
is the sum over hunks and ratio = changed_lines / max(attempt lines, 1).

Search order (each candidate compiles, differs from the attempt and from the reference, and is run once):
1. cheap normalisations, cumulative and in this order, each candidate verified: rename the attempt's function
   to `entry_point` when the attempt defines exactly one top-level function, under another name (every
   reference to it, recursion included; not when `entry_point` already occurs in the attempt); then add
   the reference's top-level import statements whose names the attempt does not import; then replace the
   entry point's `def` header with the reference's;
2. edits toward the reference: the line diff (`personalisation.line_hunks`) from the attempt (renamed, if
   step 1 renamed it; imports and the signature are left to the diff, which includes them only when they are
   needed) to the reference; the candidates are the attempt with a non-empty proper subset of the hunks
   applied (the whole set is the reference, which is the fallback, never an edit), smallest first: by
   changed lines (the sum of the applied hunks' sizes), then by fewer hunks, then by the hunks' positions.
   A candidate that does not compile (`compile()`, which also catches e.g. a `return` dedented out of its
   function) is skipped without a sandbox run.

Budget: candidates are verified in batches of at most `batch` (one `asyncio.gather` of `executor.run`,
which a batching executor sends as one sandbox batch; the normalisations are a batch of their own); the
search stops after the first batch with a passing candidate and returns the first passing one in search
order, the smallest of that batch. At most `candidate_budget` sandbox runs per call, normalisations
included; at most `EXAMINE_FACTOR * candidate_budget` hunk subsets are compiled per call (2**hunks grows
fast). A call that stops with candidates left is counted (`budget_exhausted`, `examine_capped`) and logged.
When nothing passes: `on_no_edit: reference` returns the reference, marked `personalised=False`;
`on_no_edit: next_tier` returns None, so the cascade tries its next tier.

Every refinement has `teacher_kind="reference_repair"`, no tokens, no cost, and a `teacher_call_id` that is
the content address of the inputs that determine the search (task tests, setup, entry point, reference,
attempt, budget, on_no_edit), so re-refining the same attempt gets the same ids.

Invariants: a returned edit (`personalised=True`) passed its tests in the sandbox in this call, and the
only program returned without passing is the reference fallback (`personalised=False`), which the caller
verifies like any refinement; at most `candidate_budget` sandbox runs per call; the search order is
deterministic (it depends on the texts only), so given the same verdicts a call returns the same label.

Limits: it needs a reference (None without one), and it is not an LLM teacher: it can only recombine the
attempt's lines with the reference's. The measure and the search are textual, so an attempt that differs
from the reference throughout (other variable names, indentation, structure) has no small edit, and a fix
that needs one line from the reference plus a consistent change elsewhere is found only as a larger hunk
subset, if within the budget. The smallest is the smallest in this order over this diff, not the smallest
possible program edit; and the normalisations go first, so a passing normalisation (e.g. imports added that
were not all needed) wins over a smaller edit the diff might have found.
"""

from __future__ import annotations

import ast
import asyncio
import heapq
import io
import logging
import tokenize
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from persd_online.config import ReferenceRepairTier
from persd_online.personalisation import Hunk, apply_hunks, line_hunks
from persd_online.records import Refinement
from persd_online.tasks import Task
from persd_online.teacher import refinement_record
from persd_online.teacher_cache import content_address
from persd_online.verify import Executor

log = logging.getLogger(__name__)

EXAMINE_FACTOR = 16
"""Hunk subsets compiled per call, at most, per sandbox run of `candidate_budget`."""

_FUNCTION = (ast.FunctionDef, ast.AsyncFunctionDef)
_OPEN, _CLOSE = frozenset("([{"), frozenset(")]}")


@dataclass
class RepairCounts:
    """What the tier has done (the checkpointable state)."""

    calls: int = 0  # round-1 proposals for a task with a reference
    edits: int = 0  # verified edits of the attempt returned
    normalised: int = 0  # ... of which a normalisation alone (rename, imports, signature)
    fallbacks: int = 0  # references returned (on_no_edit: reference)
    declined: int = 0  # None returned (on_no_edit: next_tier)
    budget_exhausted: int = 0  # calls that spent candidate_budget with candidates left
    examine_capped: int = 0  # calls whose search stopped at the compile cap
    sandbox_runs: int = 0
    skipped_uncompilable: int = 0  # candidates skipped without a run


@dataclass(frozen=True)
class Candidate:
    """A candidate label: how it was made and its program."""

    how: str  # "rename", "imports", "signature" or "edit"
    program: str


class ReferenceRepair:
    """A `Teacher` that returns the smallest verified edit of the attempt toward the reference (module doc)."""

    kind = "reference_repair"

    def __init__(self, config: ReferenceRepairTier, executor: Executor, state: dict[str, Any] | None = None) -> None:
        self._config = config
        self._executor = executor
        self.counts = RepairCounts()
        if state is not None:
            expected = {f.name for f in fields(RepairCounts)}
            if set(state) != expected:
                raise ValueError(f"reference_repair state has keys {sorted(state)}, expected {sorted(expected)}")
            self.counts = RepairCounts(**{k: int(v) for k, v in state.items()})

    async def propose(self, task: Task, attempt_id: str, program: str, feedback: str,
                      round_no: int) -> Refinement | None:
        """The smallest passing edit of `program` toward the reference, else the fallback (module docstring)."""
        if task.reference is None or round_no > 1:
            return None
        self.counts.calls += 1
        call_id = content_address({
            "teacher": self.kind, "task_id": task.task_id, "entry_point": task.entry_point, "tests": task.tests,
            "setup": task.setup, "reference": task.reference, "attempt": program,
            "candidate_budget": self._config.candidate_budget, "on_no_edit": self._config.on_no_edit,
        })
        found = await self._search(task, program, call_id)
        if found is not None:
            self.counts.edits += 1
            self.counts.normalised += found.how != "edit"
            return refinement_record(task, attempt_id, round_no, self.kind, call_id, found.program,
                                     personalised=True)
        if self._config.on_no_edit == "next_tier":
            self.counts.declined += 1
            return None
        self.counts.fallbacks += 1
        return refinement_record(task, attempt_id, round_no, self.kind, call_id, task.reference, personalised=False)

    async def _search(self, task: Task, program: str, call_id: str) -> Candidate | None:
        """The first passing candidate in search order, within the budget; None if none passed."""
        budget, runs = self._config.candidate_budget, 0
        capped: list[bool] = []
        candidates = search_candidates(task, program, EXAMINE_FACTOR * budget, self.counts, capped)
        pending = next(candidates, None)
        while pending is not None and runs < budget:
            batch: list[Candidate] = []
            # Normalisations form their own first batch: they are cheap and often enough on their own.
            while (pending is not None and len(batch) < min(self._config.batch, budget - runs)
                   and (not batch or (batch[0].how == "edit") == (pending.how == "edit"))):
                batch.append(pending)
                pending = next(candidates, None)
            verdicts = await asyncio.gather(*(self._executor.run(task, c.program, f"{call_id[:24]}-{runs + i}")
                                              for i, c in enumerate(batch)))
            runs += len(batch)
            self.counts.sandbox_runs += len(batch)
            for candidate, verdict in zip(batch, verdicts, strict=True):
                if verdict.passed:
                    log.debug("reference_repair %s: %s edit passed after %d run(s)", task.task_id, candidate.how,
                              runs)
                    return candidate
        if pending is not None:
            self.counts.budget_exhausted += 1
            log.info("reference_repair %s: candidate_budget (%d sandbox runs) spent with candidates left",
                     task.task_id, budget)
        elif capped:
            self.counts.examine_capped += 1
            log.info("reference_repair %s: stopped after compiling %d hunk subsets (%d x candidate_budget)",
                     task.task_id, EXAMINE_FACTOR * budget, EXAMINE_FACTOR)
        return None

    def describe(self) -> dict[str, Any]:
        """Kind, settings and counters (no tokens, no cost)."""
        return {"kind": self.kind, "model": "verified edits of the attempt toward the task reference (not an LLM)",
                "candidate_budget": self._config.candidate_budget, "on_no_edit": self._config.on_no_edit,
                "batch": self._config.batch, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0,
                **asdict(self.counts)}

    def state(self) -> dict[str, Any]:
        """The counters, for a checkpoint (restore by passing them to the constructor)."""
        return asdict(self.counts)


def search_candidates(task: Task, program: str, max_examined: int, counts: RepairCounts | None = None,
                      capped: list[bool] | None = None) -> Iterator[Candidate]:
    """The candidates in search order (module docstring): each compiles, each differs from the attempt, the
    reference and every earlier candidate. Stops after `max_examined` hunk subsets (appends True to `capped`);
    uncompilable candidates are counted in `counts.skipped_uncompilable`."""
    if task.reference is None:
        return
    seen = {_key(program), _key(task.reference)}

    def fresh(candidate: str) -> bool:
        key = _key(candidate)
        if key in seen:
            return False
        seen.add(key)
        if _compiles(candidate):
            return True
        if counts is not None:
            counts.skipped_uncompilable += 1
        return False

    steps = normalisations(program, task.reference, task.entry_point)
    for how, candidate in steps:
        if fresh(candidate):
            yield Candidate(how, candidate)
    base = steps[0][1] if steps and steps[0][0] == "rename" else program
    hunks = line_hunks(base, task.reference)
    base_lines = base.splitlines()
    for examined, subset in enumerate(hunk_subsets(hunks)):
        if examined >= max_examined:
            if capped is not None:
                capped.append(True)
            return
        candidate = "\n".join(apply_hunks(base_lines, [hunks[i] for i in subset])) + "\n"
        if fresh(candidate):
            yield Candidate("edit", candidate)


def hunk_subsets(hunks: Sequence[Hunk]) -> Iterator[tuple[int, ...]]:
    """Every non-empty proper subset of `hunks` (indices, ascending), lazily, smallest first: by the sum of
    their changed lines, then by fewer hunks, then by rank (hunks ordered by size, then position).

    Best-first over the subset tree in which a subset's children add the next rank or move its last rank one
    on: both children sort after their parent (sizes are >= 1 and ascending by rank), so the heap pops in order.
    """
    order = sorted(range(len(hunks)), key=lambda i: (hunks[i].changed_lines, i))
    size = [hunks[i].changed_lines for i in order]
    n = len(order)
    heap: list[tuple[int, int, tuple[int, ...]]] = [(size[0], 1, (0,))] if n else []
    while heap:
        total, count, ranks = heapq.heappop(heap)
        if count < n:
            yield tuple(sorted(order[r] for r in ranks))
        last = ranks[-1]
        if last + 1 < n:
            heapq.heappush(heap, (total + size[last + 1], count + 1, (*ranks, last + 1)))
            heapq.heappush(heap, (total - size[last] + size[last + 1], count, (*ranks[:-1], last + 1)))


def normalisations(program: str, reference: str, entry_point: str) -> list[tuple[str, str]]:
    """The cumulative normalisations that apply, in order: ("rename" | "imports" | "signature", program)."""
    steps: list[tuple[str, str]] = []
    current = program
    for how, step in (("rename", lambda p: rename_entry(p, entry_point)),
                      ("imports", lambda p: add_imports(p, reference)),
                      ("signature", lambda p: align_signature(p, reference, entry_point))):
        changed = step(current)
        if changed is not None:
            current = changed
            steps.append((how, current))
    return steps


def rename_entry(program: str, entry_point: str) -> str | None:
    """`program` with its one top-level function renamed to `entry_point` (every reference to it), or None
    when it defines no or several top-level functions, already that one, or uses the name otherwise."""
    tree, tokens = _parse(program), _tokens(program)
    if tree is None or tokens is None:
        return None
    functions = [node for node in tree.body if isinstance(node, _FUNCTION)]
    if len(functions) != 1 or functions[0].name == entry_point:
        return None
    if any(t.type == tokenize.NAME and t.string == entry_point for t in tokens):
        return None
    old = functions[0].name
    spots, previous = [], None
    for token in tokens:
        if token.type == tokenize.NAME and token.string == old and not (
                previous is not None and previous.type == tokenize.OP and previous.string == "."):
            spots.append(token.start)
        if token.type not in (tokenize.NL, tokenize.COMMENT):
            previous = token
    lines = io.StringIO(program).readlines()
    for row, col in sorted(spots, reverse=True):
        line = lines[row - 1]
        lines[row - 1] = line[:col] + entry_point + line[col + len(old):]
    return "".join(lines)


def add_imports(program: str, reference: str) -> str | None:
    """`program` with the reference's top-level imports whose names it does not import added (after its
    docstring and `from __future__` imports), or None when it lacks none (or either does not parse)."""
    tree, ref_tree = _parse(program), _parse(reference)
    if tree is None or ref_tree is None:
        return None
    have: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            have |= _imported_names(node)
    missing = []
    for node in ref_tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)) and not _imported_names(node) <= have:
            if isinstance(node, ast.ImportFrom) and node.module == "__future__":
                continue
            segment = ast.get_source_segment(reference, node)
            if segment:
                missing.append(segment)
                have |= _imported_names(node)
    if not missing:
        return None
    insert_at = 0
    for i, node in enumerate(tree.body):
        docstring = i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        if not (docstring or (isinstance(node, ast.ImportFrom) and node.module == "__future__")):
            break
        insert_at = node.end_lineno or insert_at
    lines = io.StringIO(program).readlines()
    head = "".join(lines[:insert_at])
    if head and not head.endswith("\n"):
        head += "\n"
    return head + "\n".join(missing) + "\n" + "".join(lines[insert_at:])


def align_signature(program: str, reference: str, entry_point: str) -> str | None:
    """`program` with the `def` header of `entry_point` replaced by the reference's, or None when they
    already agree (up to trailing whitespace) or either header cannot be found."""
    ours, theirs = _def_header(program, entry_point), _def_header(reference, entry_point)
    if ours is None or theirs is None:
        return None
    lines, ref_lines = io.StringIO(program).readlines(), io.StringIO(reference).readlines()
    header, ref_header = lines[ours[0]:ours[1] + 1], ref_lines[theirs[0]:theirs[1] + 1]
    if [line.rstrip() for line in header] == [line.rstrip() for line in ref_header]:
        return None
    replacement = "".join(ref_header)
    if not replacement.endswith("\n"):
        replacement += "\n"
    return "".join(lines[:ours[0]]) + replacement + "".join(lines[ours[1] + 1:])


def _def_header(source: str, entry_point: str) -> tuple[int, int] | None:
    """The 0-based first and last line of the last top-level `def entry_point(...):` header in `source`, or
    None (not found, or its body starts on the header's line)."""
    tree, tokens = _parse(source), _tokens(source)
    if tree is None or tokens is None:
        return None
    nodes = [node for node in tree.body if isinstance(node, _FUNCTION) and node.name == entry_point]
    if not nodes:
        return None
    node = nodes[-1]
    start = next((k for k, t in enumerate(tokens)
                  if t.type == tokenize.NAME and t.string == "def" and t.start[0] >= node.lineno), None)
    if start is None:
        return None
    depth = 0
    for k in range(start + 1, len(tokens)):
        token = tokens[k]
        if token.type != tokenize.OP:
            continue
        if token.string in _OPEN:
            depth += 1
        elif token.string in _CLOSE:
            depth -= 1
        elif token.string == ":" and depth == 0:
            after = tokens[k + 1] if k + 1 < len(tokens) else None
            if after is None or after.type not in (tokenize.NEWLINE, tokenize.COMMENT):
                return None
            return node.lineno - 1, token.start[0] - 1
    return None


def _imported_names(node: ast.Import | ast.ImportFrom) -> set[str]:
    """The names an import statement binds (`*` imports as `*module`)."""
    if isinstance(node, ast.Import):
        return {alias.asname or alias.name.split(".")[0] for alias in node.names}
    return {f"*{node.module}" if alias.name == "*" else alias.asname or alias.name for alias in node.names}


def _key(program: str) -> tuple[str, ...]:
    """A program's identity for the search: its lines without trailing whitespace or trailing blank lines."""
    lines = [line.rstrip() for line in program.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return tuple(lines)


def _parse(source: str) -> ast.Module | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return ast.parse(source)
        except (SyntaxError, ValueError, OverflowError, RecursionError):
            return None


def _compiles(source: str) -> bool:
    """Whether `source` compiles (never runs it): parse errors and e.g. `return` outside a function fail."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            compile(source, "<candidate>", "exec", dont_inherit=True)
        except (SyntaxError, ValueError, OverflowError, RecursionError):
            return False
    return True


def _tokens(source: str) -> list[tokenize.TokenInfo] | None:
    try:
        return list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError):
        return None

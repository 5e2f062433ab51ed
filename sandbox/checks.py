"""Trusted evaluation of a test suite against the program's stand-ins, test by test.

A suite compiles once (cached) into code where every test is wrapped as::

    with __persd_step__(i):
        <the test's statements>

so each test's outcome is recorded and later tests still run after a failure, while ``JobEnded`` (a
``BaseException``) stops everything. Tests are the assert lines of a list suite, or the top-level statements
of ``check(candidate)`` grouped by source line (``x = candidate(1); assert x == 2`` is one test). Inside
tests, ``assert`` statements without a message are rewritten to record what they compared, so that the PERsD
``Input/Output/Expected`` feedback can be rendered.

Names the tests use resolve, in order, to: the tests and setup themselves, implemented helpers of a Python
prompt, builtins, standard-library modules (imported in the judge), and only then the program's definitions
(as :class:`~sandbox.remote.Remote` stand-ins). Invariant: a test passes only if its block exits normally
while the job is still answering, and a suite passes only if every one of its tests did.
"""

from __future__ import annotations

import ast
import builtins
import functools
import importlib
import operator
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from types import CodeType, ModuleType
from typing import Any, TypeVar

from sandbox import ast_walk
from sandbox.feedback import MAX_PART_CHARS, cap, render_error, render_io, show
from sandbox.job import TestSuite
from sandbox.plan import planned_requests
from sandbox.remote import CandidateRaised, JobEnded, Session
from sandbox.result import Status, TestOutcome

_STEP, _COMPARE, _TRUTH = "__persd_step__", "__persd_compare__", "__persd_truth__"
_OPERATORS: dict[type[ast.cmpop], tuple[str, Callable[[Any, Any], Any], str]] = {
    ast.Eq: ("==", operator.eq, "=="), ast.NotEq: ("!=", operator.ne, "!="),
    ast.Lt: ("<", operator.lt, ">"), ast.LtE: ("<=", operator.le, ">="),
    ast.Gt: (">", operator.gt, "<"), ast.GtE: (">=", operator.ge, "<="),
    ast.Is: ("is", operator.is_, "is"), ast.IsNot: ("is not", operator.is_not, "is not"),
    ast.In: ("in", lambda a, b: a in b, "contains"), ast.NotIn: ("not in", lambda a, b: a not in b, "lacks"),
}
_OPERATOR_LIST = list(_OPERATORS.values())
_OPERATOR_INDEX = {op: i for i, op in enumerate(_OPERATORS)}
SETUP_TEST = "(test setup)"
_DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
_NAME_BINDERS = (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)
_BUILTIN_NAMES = frozenset(dir(builtins))
_Node = TypeVar("_Node", bound=ast.AST)


class InvalidTests(ValueError):
    """The suite's own code does not compile or has no tests."""


@dataclass(frozen=True)
class CompiledSuite:
    """A suite ready to run: code to execute in order, then (check form) the check function to call."""

    entry_point: str
    code: tuple[CodeType, ...]
    check_function: str | None
    tests: tuple[str, ...]  # source of each step, capped
    is_test: tuple[bool, ...]  # steps that are setup statements inside check() are not tests
    program_names: tuple[str, ...]  # what to ask the program for; the entry point first
    modules: tuple[tuple[str, ModuleType], ...]
    planned: tuple[bytes, ...] = ()  # requests the job may answer ahead (sandbox.plan)


@dataclass
class CheckRun:
    """Outcome per test index, any error outside the tests, and the test where the job ended (if it did)."""

    outcomes: dict[int, TestOutcome] = field(default_factory=dict)
    outside: TestOutcome | None = None
    ended_at: int | None = None


@functools.lru_cache(maxsize=4096)
def compile_suite(suite: TestSuite) -> CompiledSuite:
    """Compile a suite (cached by value). Raises :class:`InvalidTests`."""
    prelude = _prompt_helpers(suite.prompt, suite.entry_point)
    setup = _parse(suite.setup, "setup")
    check: ast.FunctionDef | None = None
    if isinstance(suite.tests, tuple):
        groups = [(_parse(t, f"test {i}").body, t) for i, t in enumerate(suite.tests)]
        module, check_name, param = ast.Module(body=[], type_ignores=[]), None, None
    else:
        module = _parse(suite.tests, "tests")
        check = next((n for n in module.body if isinstance(n, ast.FunctionDef) and n.name == "check"), None)
        if check is not None and check.args.args:
            module.body = [n for n in module.body if not _is_call_to(n, "check")]
            groups, check_name, param = _line_groups(check.body, suite.tests), "check", check.args.args[0].arg
        else:
            groups, check_name, param = _line_groups(module.body, suite.tests), None, None
            module.body = []
    if not any(body for body, _ in groups):
        raise InvalidTests("the suite has no tests")
    if check is not None:
        check.body = []  # its statements are the groups, walked once below (and replaced by them, wrapped)
    group_nodes = [ast_walk.nodes(*body) for body, _ in groups]
    free = _free_names(ast_walk.nodes(prelude, setup, module) + [n for nodes in group_nodes for n in nodes])
    modules = tuple((name, m) for name in sorted(free - {suite.entry_point})
                    if (m := _stdlib_module(name)) is not None)
    program_names = (suite.entry_point, *sorted(free - {suite.entry_point, *dict(modules)}))
    candidate_names = {suite.entry_point, *program_names, *([param] if param else [])}
    is_test = tuple(check_name is None or _is_test(nodes, candidate_names) for nodes in group_nodes)
    before = [prelude, setup, *(n for n in module.body if n is not check)]
    callees = {suite.entry_point, *([param] if param else [])}
    steps = list(zip((body for body, _ in groups), group_nodes, strict=True))
    planned = planned_requests(before, steps, callees, set(program_names))
    wrapped = [_wrap(i, body, nodes, candidate_names if is_test[i] else None)
               for i, (body, nodes) in enumerate(steps)]
    if check_name is None:
        module.body.extend(wrapped)
    else:
        check.body = wrapped  # type: ignore[union-attr]
    code = tuple(_compile(tree, name) for tree, name in ((prelude, "<prompt>"), (setup, "<setup>"),
                                                          (module, "<tests>")) if tree.body)
    tests = tuple(cap(textwrap.dedent(src).strip(), MAX_PART_CHARS) for _, src in groups)
    return CompiledSuite(suite.entry_point, code, check_name, tests, is_test, program_names, modules, planned)


def run_checks(suite: CompiledSuite, session: Session, stand_ins: dict[str, Any]) -> CheckRun:
    """Run every test against the stand-ins; stops early only if the job ends."""
    recorder = _Recorder(suite, session)
    namespace: dict[str, Any] = {
        "__name__": "__persd_tests__", "__builtins__": builtins, **dict(suite.modules), **stand_ins,
        _STEP: recorder.step, _COMPARE: recorder.compare, _TRUTH: recorder.truth,
    }
    try:
        for code in suite.code:
            exec(code, namespace)  # noqa: S102 - trusted test code
        if suite.check_function is not None:
            namespace[suite.check_function](stand_ins[suite.entry_point])
    except JobEnded:
        pass
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - any failure outside a test fails the suite
        recorder.run.outside = recorder.outcome(SETUP_TEST, exc)
    if session.ended is not None and recorder.run.ended_at is None:
        recorder.run.ended_at = recorder.current
    return recorder.run


def verdict(suite: CompiledSuite, run: CheckRun, ended: tuple[Status, str] | None
            ) -> tuple[Status, str, tuple[TestOutcome, ...]]:
    """Overall status, feedback and per-test outcomes; ``ended`` is how the job ended early, if it did.

    The status is that of the first outcome that is neither passed nor not-run; a test that was never
    reached fails, so a check that returns early cannot pass.
    """
    outcomes: list[TestOutcome] = [run.outside] if run.outside else []
    for i, test in enumerate(suite.tests):
        if ended is not None and run.ended_at is not None and i >= run.ended_at:
            outcomes.append(TestOutcome(test, *ended) if i == run.ended_at
                            else TestOutcome(test, Status.NOT_RUN))
            continue
        outcome = run.outcomes.get(i)
        if outcome is None and suite.is_test[i]:
            outcome = (TestOutcome(test, Status.NOT_RUN) if ended is not None
                       else TestOutcome(test, Status.FAILED, "AssertionError: test was not reached"))
        if outcome is not None:
            outcomes.append(outcome)
    if ended is not None and run.ended_at is None:
        outcomes.append(TestOutcome(SETUP_TEST, *ended))
    first = next((o for o in outcomes if o.status not in (Status.PASSED, Status.NOT_RUN)), None)
    if first is None:
        return Status.PASSED, "", tuple(outcomes)
    return first.status, first.feedback, tuple(outcomes)


class _Recorder:
    """Receives the wrapped tests' step, comparison and truth-test hooks."""

    def __init__(self, suite: CompiledSuite, session: Session) -> None:
        self._suite = suite
        self._session = session
        self._compared: tuple[Any, Any, str] | None = None  # output, expected, relation other than ==
        self.current: int | None = None
        self.run = CheckRun()

    def step(self, index: int) -> _Recorder:
        self.current, self._compared, self._session.last_call = index, None, None
        return self

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        index, self.current = self.current, None
        assert index is not None
        if self._session.ended is not None:
            if self.run.ended_at is None:
                self.run.ended_at = index
            return False
        if exc is None:
            if self._suite.is_test[index]:
                self.run.outcomes[index] = TestOutcome(self._suite.tests[index], Status.PASSED)
            return False
        if not isinstance(exc, Exception):
            return False
        self.run.outcomes[index] = self.outcome(self._suite.tests[index], exc)
        return True

    def compare(self, op_index: int, left: Any, right: Any, swapped: bool) -> Any:
        symbol, func, mirrored = _OPERATOR_LIST[op_index]
        result = func(left, right)
        output, expected = (right, left) if swapped else (left, right)
        self._compared = (output, expected, "" if symbol == "==" else f"{mirrored if swapped else symbol} ")
        return result

    def truth(self, value: Any, expected: bool) -> Any:
        self._compared = (value, expected, "")
        return value

    def outcome(self, test: str, exc: BaseException) -> TestOutcome:
        if isinstance(exc, CandidateRaised):
            status = Status.MEMORY if exc.type_name == "MemoryError" else Status.ERROR
            return TestOutcome(test, status, render_error(exc.type_name, exc.message))
        message = _message(exc)
        if not isinstance(exc, AssertionError):
            return TestOutcome(test, Status.FAILED, render_error(type(exc).__name__, message))
        if message:
            return TestOutcome(test, Status.FAILED, cap(message))
        call = self._session.last_call
        if call is not None and self._compared is not None:
            output, expected, relation = self._compared
            feedback = render_io(call[0], call[1], output, relation + show(expected))
            return TestOutcome(test, Status.FAILED, feedback)
        return TestOutcome(test, Status.FAILED, render_error("AssertionError", test))


def _rewrite_asserts(body: list[ast.stmt], nodes: list[ast.AST], names: set[str]) -> list[ast.stmt]:
    """``body`` (whose nodes are ``nodes``) with every ``assert`` without a message rewritten, wherever it is:
    ``assert a OP b`` → ``assert __persd_compare__(op, a, b, swapped)``; ``assert [not] x`` → truth."""
    for owner in nodes:
        for name in owner._fields:
            value = getattr(owner, name, None)
            if type(value) is list:
                value[:] = [_rewrite_assert(item, names) if type(item) is ast.Assert else item for item in value]
    return [_rewrite_assert(stmt, names) if type(stmt) is ast.Assert else stmt for stmt in body]


def _rewrite_assert(node: ast.Assert, names: set[str]) -> ast.stmt:
    if node.msg is not None:
        return node
    test = node.test
    if isinstance(test, ast.Compare) and len(test.ops) == 1 and type(test.ops[0]) in _OPERATORS:
        left, right = test.left, test.comparators[0]
        swapped = not ast_walk.mentions(left, names) and ast_walk.mentions(right, names)
        call = _call(_COMPARE, ast.Constant(_OPERATOR_INDEX[type(test.ops[0])]), left, right, ast.Constant(swapped))
    elif isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        call = ast.UnaryOp(op=ast.Not(), operand=_call(_TRUTH, test.operand, ast.Constant(False)))
    else:
        call = _call(_TRUTH, test, ast.Constant(True))
    return ast.copy_location(ast.Assert(test=_locate(call, node), msg=None), node)


def _call(name: str, *args: ast.expr) -> ast.Call:
    return ast.Call(func=ast.Name(id=name, ctx=ast.Load()), args=list(args), keywords=[])


def _wrap(index: int, body: list[ast.stmt], nodes: list[ast.AST], candidate_names: set[str] | None) -> ast.With:
    """The test's statements inside ``with __persd_step__(index):``, asserts rewritten if it is a test."""
    if candidate_names is not None:
        body = _rewrite_asserts(body, nodes, candidate_names)
    node = ast.With(items=[ast.withitem(context_expr=_call(_STEP, ast.Constant(index)))], body=body)
    return _locate(node, body[0])


def _locate(node: _Node, like: ast.AST) -> _Node:
    """Give the nodes we created (those without a position) ``like``'s position, not descending into the
    original nodes they hold: much cheaper than ``ast.fix_missing_locations`` over the whole suite."""
    position = (like.lineno, like.col_offset, like.end_lineno, like.end_col_offset)  # type: ignore[attr-defined]
    stack: list[ast.AST] = [node]
    while stack:
        current = stack.pop()
        if "lineno" in current._attributes:
            if hasattr(current, "lineno"):
                continue
            current.lineno, current.col_offset, current.end_lineno, current.end_col_offset = position  # type: ignore[attr-defined]
        stack.extend(ast_walk.children(current))
    return node


def _line_groups(body: list[ast.stmt], source: str) -> list[tuple[list[ast.stmt], str]]:
    """Statements grouped by shared source lines, each with its source text."""
    groups: list[list[ast.stmt]] = []
    for stmt in body:
        if groups and stmt.lineno <= (groups[-1][-1].end_lineno or groups[-1][-1].lineno):
            groups[-1].append(stmt)
        else:
            groups.append([stmt])
    lines = source.splitlines()
    return [(g, "\n".join(lines[g[0].lineno - 1:(g[-1].end_lineno or g[-1].lineno)])) for g in groups]


def _is_test(nodes: list[ast.AST], candidate_names: set[str]) -> bool:
    return any(type(node) is ast.Assert or (type(node) is ast.Name and node.id in candidate_names)  # type: ignore[attr-defined]
               for node in nodes)


def _is_call_to(node: ast.stmt, name: str) -> bool:
    return (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Name) and node.value.func.id == name)


def _prompt_helpers(prompt: str, entry_point: str) -> ast.Module:
    """The imports and implemented top-level definitions of a Python prompt, minus the entry point."""
    try:
        tree = ast.parse(prompt)
    except (SyntaxError, ValueError):
        return ast.Module(body=[], type_ignores=[])
    keep = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom)) or (
        isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name != entry_point
        and _implemented(node))]
    return ast.Module(body=keep, type_ignores=[])


def _implemented(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> bool:
    return any(not isinstance(s, ast.Pass) and not _is_docstring_or_ellipsis(s) for s in node.body)


def _is_docstring_or_ellipsis(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)


def _parse(source: str, what: str) -> ast.Module:
    try:
        return ast.parse(source)
    except SyntaxError as exc:
        raise InvalidTests(f"{what}: SyntaxError: {exc.msg} (line {exc.lineno})") from None


def _compile(tree: ast.Module, filename: str) -> CodeType:
    try:
        try:
            return compile(tree, filename, "exec")
        except (TypeError, ValueError):  # a node without a position (every node we add is given one)
            return compile(ast.fix_missing_locations(tree), filename, "exec")
    except (SyntaxError, ValueError, TypeError) as exc:
        raise InvalidTests(f"{filename}: {type(exc).__name__}: {exc}") from None


def _free_names(nodes: list[ast.AST]) -> set[str]:
    """Names read by some of ``nodes`` but bound by none, builtins excluded."""
    loaded: set[str] = set()
    bound: set[str] = set()
    for node in nodes:
        kind = type(node)
        if kind is ast.Name:
            (loaded if type(node.ctx) is ast.Load else bound).add(node.id)  # type: ignore[attr-defined]
            continue
        if kind in _DEFINITIONS:
            bound.add(node.name)  # type: ignore[attr-defined]
        elif kind is ast.arg:
            bound.add(node.arg)  # type: ignore[attr-defined]
        elif kind is ast.alias:
            bound.add(node.asname or node.name.split(".")[0])  # type: ignore[attr-defined]
        elif kind in _NAME_BINDERS and node.name:  # type: ignore[attr-defined]
            bound.add(node.name)  # type: ignore[attr-defined]
    return loaded - bound - _BUILTIN_NAMES


def _stdlib_module(name: str) -> ModuleType | None:
    if name not in sys.stdlib_module_names:
        return None
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _message(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # noqa: BLE001
        return ""

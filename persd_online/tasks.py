"""Code-generation tasks: the one `Task` record and the loaders that produce it.

Three sources produce the same record: the vendored HumanEval (seen/hidden test split), the vendored MBPP
(with its standard splits by task id), and a user's own JSONL file in the format documented in the README.

Invariants:
- every loader returns tasks with unique ids, in file order;
- a malformed user record is an error naming the file, line and field; nothing is silently dropped;
- `tests` are what a task is scored with; `seen_tests` (optional) are the ones a model may see as feedback
  at inference time (PERsD's two-step mode). Held-out scoring never uses `seen_tests`.
"""

from __future__ import annotations

import ast
import builtins
import json
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

DATA_DIR = Path(__file__).parent / "data"
HUMANEVAL_FILE = DATA_DIR / "humaneval_seen_hidden.jsonl"
MBPP_FILE = DATA_DIR / "mbpp.jsonl"

MbppSplit = Literal["prompt", "test", "validation", "train", "all"]
# MBPP's standard split by task id (Austin et al. 2021), inclusive ranges.
MBPP_SPLITS: dict[str, tuple[int, int]] = {
    "prompt": (1, 10),
    "test": (11, 510),
    "validation": (511, 600),
    "train": (601, 974),
    "all": (1, 974),
}

Tests = list[str] | str
"""Either Python assert lines that call the function by its name, or source defining `check(candidate)`."""


class Task(BaseModel):
    """One executable code-generation task."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    task_id: str = Field(description="Unique id within its task set.")
    prompt: str = Field(description="What the student is asked: the problem statement (and header, if any).")
    entry_point: str = Field(description="Name of the function the tests call.")
    tests: Tests = Field(description="Tests used to score a program.")
    seen_tests: Tests | None = Field(default=None, description="Tests a model may see as feedback.")
    header: str | None = Field(default=None, description="Code a completion-style prompt starts from.")
    reference: str | None = Field(default=None, description="A reference solution (full source).")
    setup: str = Field(default="", description="Code run before the tests (e.g. fixtures).")
    source: str = Field(default="user", description="Where the task came from.")

    @field_validator("task_id", mode="before")
    @classmethod
    def _id_as_str(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("entry_point")
    @classmethod
    def _entry_is_identifier(cls, value: str) -> str:
        if not value.isidentifier():
            raise ValueError(f"must be a Python identifier, got {value!r}")
        return value

    @field_validator("tests", "seen_tests")
    @classmethod
    def _tests_are_python(cls, value: Tests | None) -> Tests | None:
        if value is None:
            return value
        if isinstance(value, list):
            if not value:
                raise ValueError("must hold at least one assert line")
            for i, line in enumerate(value):
                _parse_python(line, f"item {i}")
        else:
            tree = _parse_python(value, "check source")
            if not any(isinstance(n, ast.FunctionDef) and n.name == "check" for n in tree.body):
                raise ValueError("a string of tests must define `def check(candidate):`")
        return value

    def to_record(self) -> dict[str, Any]:
        """This task in the user JSONL format (the format `load_jsonl` and `python -m sandbox` read)."""
        return self.model_dump(exclude_defaults=True, exclude={"source"}) | {"task_id": self.task_id}


class TaskFormatError(ValueError):
    """A task file has malformed records; the message lists each as `file:line: field: problem`."""


class TaskSpecError(ValueError):
    """A task-set spec that names no task set (an unknown set or MBPP split)."""


def _ast(source: str) -> ast.Module:
    """Parse task data; its invalid escape sequences (common in MBPP) are the data's, not ours to warn on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return ast.parse(source)


def _parse_python(source: str, what: str) -> ast.Module:
    if not source.strip():
        raise ValueError(f"{what} is empty")
    try:
        return _ast(source)
    except SyntaxError as exc:
        raise ValueError(f"{what} is not valid Python ({exc.msg}, line {exc.lineno})") from None


def _usable_check(check_source: str) -> bool:
    """True if the source parses, its `check` function holds at least one statement beyond a docstring,
    and `check` reads no name that nothing defines (some formatted HumanEval tests lost their variables)."""
    try:
        tree = _ast(check_source)
    except SyntaxError:
        return False
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "check":
            has_body = not all(isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant) for s in node.body)
            return has_body and not _undefined_names(node, tree)
    return False


def _bindings(nodes: Iterable[ast.AST]) -> set[str]:
    names = set()
    for node in nodes:
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.alias):
            names.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
    return names


def _undefined_names(function: ast.FunctionDef, module: ast.Module) -> set[str]:
    """Names `function` reads that neither it, the module's top level, nor the builtins define."""
    top = [n for stmt in module.body for n in
           ([stmt] if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else ast.walk(stmt))]
    bound = set(dir(builtins)) | _bindings(top) | _bindings(ast.walk(function))
    read = {n.id for n in ast.walk(function) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return read - bound


def _read_jsonl(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if line.strip():
                yield lineno, json.loads(line)


def load_humaneval(path: Path = HUMANEVAL_FILE) -> list[Task]:
    """HumanEval's 164 tasks: scored on all tests (`test_all`), with the docstring examples as `seen_tests`."""
    tasks = []
    for _, rec in _read_jsonl(path):
        # Some formatted test sources lost their tests or do not parse (see data/README.md): fall back.
        scoring = rec["test_all"] if _usable_check(rec["test_all"]) else rec["test"]
        seen = rec["test_seen"] if _usable_check(rec["test_seen"]) else None
        tasks.append(
            Task(
                task_id=rec["task_id"],
                prompt=rec["prompt"],
                entry_point=rec["entry_point"],
                tests=scoring,
                seen_tests=seen,
                header=rec["prompt"],
                reference=rec["prompt"] + rec["canonical_solution"],
                source="humaneval",
            )
        )
    return tasks


def _mbpp_header(code: str, entry_point: str) -> str | None:
    """The `def entry_point(...):` line(s) of an MBPP reference solution."""
    try:
        tree = _ast(code)
    except SyntaxError:
        return None
    lines = code.splitlines()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == entry_point:
            return "\n".join(lines[node.lineno - 1 : node.body[0].lineno - 1]).rstrip() or lines[
                node.lineno - 1
            ].split(":")[0] + ":"
    return None


def load_mbpp(split: MbppSplit = "all", path: Path = MBPP_FILE) -> list[Task]:
    """MBPP tasks of one standard split; the prompt shows the first test as the example (`seen_tests`)."""
    if split not in MBPP_SPLITS:
        raise TaskSpecError(f"unknown MBPP split {split!r} in 'mbpp:{split}'; choose one of "
                            f"{', '.join(f'mbpp:{s}' for s in MBPP_SPLITS)}")
    low, high = MBPP_SPLITS[split]
    tasks = []
    for _, rec in _read_jsonl(path):
        if not low <= rec["task_id"] <= high:
            continue
        code = rec["code"].replace("\r\n", "\n")
        example = rec["test_list"][0]
        tasks.append(
            Task(
                task_id=f"MBPP/{rec['task_id']}",
                prompt=f"{rec['text']}\nYour code should pass this test:\n{example}",
                entry_point=rec["entrypoint"].strip(),
                tests=rec["test_list"],
                seen_tests=[example],
                header=_mbpp_header(code, rec["entrypoint"].strip()),
                reference=code,
                setup=rec["test_setup_code"].replace("\r\n", "\n"),
                source=f"mbpp:{split}",
            )
        )
    return tasks


def load_jsonl(path: str | Path) -> list[Task]:
    """A user's tasks from JSONL; raises `TaskFormatError` listing every malformed record."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file not found: {path}")
    tasks: list[Task] = []
    errors: list[str] = []
    seen_ids: dict[str, int] = {}
    for lineno, raw in enumerate(path.read_bytes().splitlines(), start=1):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            errors.append(f"{where}: not UTF-8 text (byte {raw[exc.start]:#04x} at column {exc.start + 1}); "
                          "save the file as UTF-8")
            continue
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(rec, dict):
            errors.append(f"{where}: expected a JSON object, got {type(rec).__name__}")
            continue
        try:
            task = Task.model_validate({"source": str(path)} | rec)
        except ValidationError as exc:
            errors.extend(f"{where}: {_field_error(err)}" for err in exc.errors())
            continue
        if task.task_id in seen_ids:
            errors.append(f"{where}: task_id: duplicate {task.task_id!r} (first on line {seen_ids[task.task_id]})")
            continue
        seen_ids[task.task_id] = lineno
        tasks.append(task)
    if errors:
        shown = "\n  ".join(errors[:20])
        more = f"\n  … and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise TaskFormatError(f"{len(errors)} malformed task record(s):\n  {shown}{more}")
    if not tasks:
        raise TaskFormatError(f"{path}: no tasks in file")
    return tasks


def _field_error(err: Any) -> str:
    field = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("list[", "str")))
    if err["type"] == "missing":
        return f"{field}: required field is missing"
    if err["type"] == "extra_forbidden":
        return f"{field}: unknown field (allowed: {', '.join(Task.model_fields)})"
    return f"{field}: {err['msg'].removeprefix('Value error, ')}"


def load_tasks(spec: str) -> list[Task]:
    """Tasks named by a spec: `humaneval`, `mbpp` or `mbpp:<split>`, or a path to a user JSONL file."""
    name, _, split = spec.partition(":")
    if name == "humaneval" and not split:
        return load_humaneval()
    if name == "mbpp":
        return load_mbpp(split or "all")  # type: ignore[arg-type]
    if Path(spec).suffix == ".jsonl" or Path(spec).exists():
        return load_jsonl(spec)
    raise TaskSpecError(f"unknown task set {spec!r}: use humaneval, mbpp, mbpp:<split> or a path to a .jsonl file")

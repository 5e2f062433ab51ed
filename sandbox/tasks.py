"""Reading the project's JSONL task format and program files, with errors that name file, line and field.

Task lines: ``task_id`` (str or int), ``prompt`` (str), ``entry_point`` (str), ``tests`` (a list of assert
lines, or a ``check(candidate)`` source string), and optionally ``seen_tests`` (same shape), ``reference``
(str), ``setup`` (str). Program lines: ``{"task_id": ..., "program": "<source>"}``, several per task allowed.
Task ids match by their string form, so ``601`` and ``"601"`` name the same task.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandbox.checks import InvalidTests, compile_suite
from sandbox.job import TestSuite


class InputError(ValueError):
    """A malformed input line; the message reads ``FILE:LINE: field 'x': problem``."""

    def __init__(self, path: Path, line: int, field: str | None, problem: str) -> None:
        where = f"{path}:{line}: " + (f"field {field!r}: " if field else "")
        super().__init__(where + problem)


@dataclass(frozen=True)
class Task:
    task_id: str | int
    prompt: str
    entry_point: str
    tests: str | tuple[str, ...]
    seen_tests: str | tuple[str, ...] | None = None
    reference: str | None = None
    setup: str = ""

    def suite(self, seen: bool = False) -> TestSuite:
        """The suite to run: all tests, or the seen ones (falling back to all when there are none)."""
        tests = self.seen_tests if seen and self.seen_tests else self.tests
        return TestSuite(self.entry_point, tests, setup=self.setup, prompt=self.prompt)


@dataclass(frozen=True)
class Program:
    task_id: str | int
    program: str
    line: int


def read_tasks(path: Path) -> dict[str, Task]:
    """Tasks by the string form of their id. Raises :class:`InputError`."""
    tasks: dict[str, Task] = {}
    for line, row in _rows(path):
        task = Task(
            task_id=_field(path, line, row, "task_id", (str, int)),
            prompt=_field(path, line, row, "prompt", str),
            entry_point=_field(path, line, row, "entry_point", str).strip(),
            tests=_tests(path, line, row, "tests", required=True),  # type: ignore[arg-type]
            seen_tests=_tests(path, line, row, "seen_tests", required=False),
            reference=_field(path, line, row, "reference", str, required=False),
            setup=_field(path, line, row, "setup", str, required=False) or "",
        )
        key = str(task.task_id)
        if key in tasks:
            raise InputError(path, line, "task_id", f"duplicate task id {task.task_id!r}")
        for seen in (False, True):
            try:
                compile_suite(task.suite(seen))
            except (InvalidTests, ValueError) as exc:
                raise InputError(path, line, "seen_tests" if seen else "tests", str(exc)) from None
        tasks[key] = task
    return tasks


def read_programs(path: Path, tasks: dict[str, Task]) -> list[Program]:
    """Programs in file order, each naming a known task. Raises :class:`InputError`."""
    programs = []
    for line, row in _rows(path):
        task_id = _field(path, line, row, "task_id", (str, int))
        if str(task_id) not in tasks:
            raise InputError(path, line, "task_id", f"unknown task {task_id!r}")
        programs.append(Program(task_id, _field(path, line, row, "program", str), line))
    return programs


def _rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, 0, None, f"cannot read: {exc}") from None
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InputError(path, number, None, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
        if not isinstance(row, dict):
            raise InputError(path, number, None, "each line must be a JSON object")
        yield number, row


def _field(path: Path, line: int, row: dict[str, Any], name: str, kinds: type | tuple[type, ...],
           required: bool = True) -> Any:
    if name not in row or row[name] is None:
        if required:
            raise InputError(path, line, name, "missing")
        return None
    value = row[name]
    if not isinstance(value, kinds) or isinstance(value, bool):
        names = " or ".join(k.__name__ for k in (kinds if isinstance(kinds, tuple) else (kinds,)))
        raise InputError(path, line, name, f"expected {names}, got {type(value).__name__}")
    return value


def _tests(path: Path, line: int, row: dict[str, Any], name: str,
           required: bool) -> str | tuple[str, ...] | None:
    value = _field(path, line, row, name, (str, list), required)
    if isinstance(value, list):
        if not all(isinstance(t, str) for t in value):
            raise InputError(path, line, name, "a list of tests must hold only strings")
        return tuple(value)
    return value

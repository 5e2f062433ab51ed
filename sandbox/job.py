"""What a job is (a program and the tests it must pass) and the limits a pool runs jobs under.

A ``TestSuite`` is trusted task data; it is evaluated by the judge, never shown to the program's process.
``tests`` is either a tuple of assert statements that call the function by ``entry_point`` name, or the
source of a ``check(candidate)`` function (plus any helpers it needs, such as HumanEval's ``check_assert``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class TestSuite:
    """The tests of one task.

    ``setup`` is trusted code run before the tests, beside them (MBPP's ``test_setup_code``). ``prompt`` is
    the task prompt: when it is Python, its implemented top-level helpers other than the entry point
    (HumanEval/32's ``poly``) are trusted and used by the tests instead of whatever the program defines
    under that name.
    """

    __test__ = False  # not a pytest test class

    entry_point: str
    tests: str | tuple[str, ...]
    setup: str = ""
    prompt: str = ""

    def __post_init__(self) -> None:
        if not self.entry_point.isidentifier():
            raise ValueError(f"entry_point {self.entry_point!r} is not a Python identifier")
        if isinstance(self.tests, list):
            object.__setattr__(self, "tests", tuple(self.tests))
        if isinstance(self.tests, tuple):
            if not self.tests or not all(isinstance(t, str) and t.strip() for t in self.tests):
                raise ValueError("tests must be a non-empty list of non-empty assert statements")
        elif not isinstance(self.tests, str) or not self.tests.strip():
            raise ValueError("tests must be a check(candidate) source string or a list of assert statements")


@dataclass(frozen=True)
class Limits:
    """Per-job resource limits; ``timeout`` is wall-clock seconds for loading the program and all tests."""

    timeout: float = 3.0
    memory_mb: int = 1024  # address space of each process of the job
    max_processes: int = 32  # processes and threads of a job (pids cgroup per worker, RLIMIT_NPROC)
    max_open_files: int = 256
    max_file_mb: int = 16  # largest file the job may write (stdout and stderr are pipes: never capped)
    output_tail_chars: int = 2000  # how much of the end of stdout/stderr a Result keeps (the rest is dropped)

    def __post_init__(self) -> None:
        if not (self.timeout > 0 and self.memory_mb > 0 and self.max_processes > 0 and self.max_open_files > 0
                and self.max_file_mb > 0 and self.output_tail_chars >= 0):
            raise ValueError(f"invalid limits: {self}")

    @property
    def cpu_seconds(self) -> int:
        """CPU-time limit: a second above the wall-clock limit, so that the wall clock normally decides."""
        return math.ceil(self.timeout) + 1


@dataclass(frozen=True)
class Job:
    """One program to run against one suite."""

    program: str
    suite: TestSuite

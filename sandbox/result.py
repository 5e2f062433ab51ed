"""Result records returned for every job.

Invariants:
  * ``Result.status`` is ``passed`` only when every test of the suite was observed to complete and hold by the
    trusted judge; nothing the program prints, returns or does to its own process can set it.
  * ``sandbox_error`` means the harness failed twice (a worker died); it says nothing about the program.
  * ``feedback`` is empty for a pass, otherwise it describes the first failing test in PERsD form and is
    length-capped; ``stdout``/``stderr`` are capped tails.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from typing import Any


class Status(str, enum.Enum):
    """Verdict of a job, or of one test within it (``not_run`` only appears on tests)."""

    PASSED = "passed"
    FAILED = "failed"  # a test did not hold: a false assertion, or the check could not use the output
    ERROR = "error"  # the program raised (at load time, or inside a call), or was not loadable
    TIMEOUT = "timeout"  # wall-clock or CPU limit
    MEMORY = "memory"  # address-space limit (MemoryError)
    CRASHED = "crashed"  # the process died on its own (signal, os._exit, a corrupted result channel)
    SANDBOX_ERROR = "sandbox_error"  # the harness failed; retried once before being reported
    NOT_RUN = "not_run"  # a test after a fatal outcome

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class TestOutcome:
    """One test of a suite: its source (capped), verdict and, if it did not pass, PERsD feedback."""

    __test__ = False  # not a pytest test class

    test: str
    status: Status
    feedback: str = ""


@dataclass(frozen=True)
class Result:
    """Everything the harness observed about one (program, tests) job."""

    status: Status
    feedback: str
    tests: tuple[TestOutcome, ...]
    duration_s: float
    peak_memory_mb: float | None = None
    stdout: str = ""
    stderr: str = ""
    attempts: int = 1

    @property
    def passed(self) -> bool:
        return self.status is Status.PASSED

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (statuses as strings, ``passed`` included)."""
        data = asdict(self)
        data["status"] = self.status.value
        data["passed"] = self.passed
        data["tests"] = [{**t, "status": t["status"].value} for t in data["tests"]]
        return data

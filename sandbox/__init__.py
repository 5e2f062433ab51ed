"""Sandboxed execution of generated programs against trusted tests (usable without persd_online).

Quick use::

    from sandbox import Job, SandboxPool, TestSuite

    suite = TestSuite(entry_point="add", tests=["assert add(1, 2) == 3"])
    with SandboxPool(workers=2, timeout=3.0) as pool:
        results = pool.run_batch([Job("def add(a, b):\\n    return a + b", suite)])
    results[0].status  # Status.PASSED

Exports resolve lazily, so the zygote process that forks jobs imports only the few modules it needs (a
smaller zygote forks faster).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "InvalidTests": "sandbox.checks",
    "IsolationConfig": "sandbox.isolation",
    "IsolationReport": "sandbox.isolation",
    "Job": "sandbox.job",
    "Limits": "sandbox.job",
    "TestSuite": "sandbox.job",
    "SandboxPool": "sandbox.pool",
    "run": "sandbox.pool",
    "run_batch": "sandbox.pool",
    "Result": "sandbox.result",
    "Status": "sandbox.result",
    "TestOutcome": "sandbox.result",
}
__all__ = [
    "InvalidTests", "IsolationConfig", "IsolationReport", "Job", "Limits", "Result", "SandboxPool", "Status",
    "TestOutcome", "TestSuite", "run", "run_batch",
]

if TYPE_CHECKING:
    from sandbox.checks import InvalidTests
    from sandbox.isolation import IsolationConfig, IsolationReport
    from sandbox.job import Job, Limits, TestSuite
    from sandbox.pool import SandboxPool, run, run_batch
    from sandbox.result import Result, Status, TestOutcome


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sandbox' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value

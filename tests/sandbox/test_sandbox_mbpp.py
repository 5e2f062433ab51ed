"""Every MBPP reference program passes its tests (``test_list``, with ``test_setup_code``) in the sandbox.

The suites are built from the vendored JSONL as a caller of the sandbox would. A reference that computes for
longer than the shared pool's limit is run again in a pool of its own with a generous one: it must pass there.
"""

from __future__ import annotations

from typing import Any

from sandbox import Job, SandboxPool, Status, TestSuite

SLOW_LIMIT_S = 30.0


def _job(task: dict[str, Any]) -> Job:
    suite = TestSuite(task["entrypoint"].strip(), tuple(task["test_list"]),
                      setup=task["test_setup_code"].replace("\r\n", "\n"))
    return Job(task["code"].replace("\r\n", "\n"), suite)


def test_every_mbpp_reference_passes(pool: SandboxPool, mbpp: list[dict[str, Any]]) -> None:
    assert len(mbpp) == 974
    jobs = [_job(task) for task in mbpp]
    results = pool.run_batch(jobs)
    slow = [i for i, r in enumerate(results) if r.status is Status.TIMEOUT]
    assert [(mbpp[i]["task_id"], r.status, r.feedback) for i, r in enumerate(results)
            if not r.passed and i not in slow] == []
    assert len(slow) <= 5, [mbpp[i]["task_id"] for i in slow]  # HumanEval-like limits: few references are slow
    with SandboxPool(workers=1, timeout=SLOW_LIMIT_S, memory_mb=pool.limits.memory_mb) as patient:
        again = patient.run_batch([jobs[i] for i in slow])
    assert [(mbpp[i]["task_id"], r.status) for i, r in zip(slow, again, strict=True) if not r.passed] == []

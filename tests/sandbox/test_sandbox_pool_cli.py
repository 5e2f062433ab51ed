"""The pool's contract (order, callbacks, retry of a dead worker, ``sandbox_error``) and ``python -m sandbox``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO

from sandbox import Job, SandboxPool, Status, TestSuite
from sandbox.isolation import LEFTOVER_PREFIX, own_pids_cgroup

DOUBLES = TestSuite("f", ("assert f(1) == 2", "assert f(3) == 6"))


def test_batch_keeps_input_order_and_reports_each_result_once(pool: SandboxPool) -> None:
    programs = [f"import time\ndef f(x):\n    time.sleep({(7 - i) % 4} * 0.02)\n    return {i % 3} * x\n"
                for i in range(12)]
    seen: list[int] = []
    results = pool.run_batch([Job(p, DOUBLES) for p in programs], on_result=lambda i, r: seen.append(i))
    assert sorted(seen) == list(range(12))
    assert [r.status for r in results] == [Status.PASSED if i % 3 == 2 else Status.FAILED for i in range(12)]
    assert results[0].feedback == "Input: 1 Output: 0 Expected: 2"
    assert results[1].feedback == "Input: 1 Output: 1 Expected: 2"


def test_a_malformed_suite_fails_its_own_jobs_only(pool: SandboxPool) -> None:
    broken = TestSuite("f", "def check(candidate):\n    assert candidate(1) ==\n")
    results = pool.run_batch([Job("def f(x):\n    return 2 * x\n", s) for s in (broken, DOUBLES)])
    assert results[0].status is Status.SANDBOX_ERROR and not results[0].passed
    assert results[0].feedback.startswith("InvalidTests: tests: SyntaxError"), results[0].feedback
    assert results[1].status is Status.PASSED


def test_result_fields(pool: SandboxPool) -> None:
    result = pool.run("def f(x):\n    print('hello')\n    return 1 // (x - 3) if x == 3 else 2 * x\n", DOUBLES)
    assert result.status is Status.ERROR
    assert result.feedback == "ZeroDivisionError: integer division or modulo by zero"
    assert [(t.test, t.status) for t in result.tests] == [("assert f(1) == 2", Status.PASSED),
                                                          ("assert f(3) == 6", Status.ERROR)]
    assert result.stdout == "hello\nhello\n" and 0 < result.duration_s < 2 and result.peak_memory_mb > 0
    data = result.to_dict()
    assert data["status"] == "error" and data["passed"] is False and data["tests"][1]["status"] == "error"
    json.dumps(data)


def _kill_workers(pool: SandboxPool, times: int, killed: list[str]) -> threading.Thread:
    """Kill the running worker process ``times`` times, each time once it has a job in hand."""
    def killer() -> None:
        for _ in range(times):
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                worker = pool._workers[0]
                if worker.queue and worker.proc.poll() is None:
                    time.sleep(0.3)  # let it start the job
                    killed.append(worker.name)
                    worker.proc.kill()
                    while pool._workers and pool._workers[0] is worker:
                        time.sleep(0.01)
                    break
                time.sleep(0.01)
    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize(("deaths", "status"), [(1, Status.PASSED), (2, Status.SANDBOX_ERROR)])
def test_a_dead_worker_is_retried_once_then_reported_as_sandbox_error(deaths: int, status: Status) -> None:
    slow = "import time\ndef f(x):\n    time.sleep(1)\n    return 2 * x\n"
    killed: list[str] = []
    with SandboxPool(workers=1, timeout=5.0) as own:
        killer = _kill_workers(own, deaths, killed)
        result = own.run(slow, TestSuite("f", ("assert f(1) == 2",)))
        killer.join(timeout=30)
        assert own.restarts == deaths
        assert own.run("def f(x):\n    return 2 * x\n", DOUBLES).passed  # the replacement works
    assert result.status is status, result.feedback
    assert result.attempts == 2
    # A killed worker cannot clean up after itself: the pool removes its cgroups and scratch directory.
    assert len(killed) == deaths
    places = [Path(tempfile.gettempdir()), *([cgroup] if (cgroup := own_pids_cgroup()) else [])]
    assert [p for place in places for p in place.iterdir()
            if any(p.name.startswith(f"{LEFTOVER_PREFIX}{name}-") for name in killed)] == []
    if status is Status.SANDBOX_ERROR:
        assert result.feedback.startswith("SandboxError: ")


def _sandbox_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sandbox", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_cli_runs_programs_in_input_order(tmp_path: Path) -> None:
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("\n".join(json.dumps(t) for t in [
        {"task_id": "add", "prompt": "Add.", "entry_point": "add", "tests": ["assert add(1, 2) == 3"]},
        {"task_id": 7, "prompt": "Double.", "entry_point": "double",
         "tests": "def check(candidate):\n    assert candidate(2) == 4\n"},
    ]) + "\n")
    programs = tmp_path / "programs.jsonl"
    programs.write_text("\n".join(json.dumps(p) for p in [
        {"task_id": "add", "program": "def add(a, b):\n    return a + b\n"},
        {"task_id": "7", "program": "def double(x):\n    return x + 1\n"},
        {"task_id": "add", "program": "def add(a, b):\n    while True:\n        pass\n"},
        {"task_id": 7, "program": "def double(x)\n"},
    ]) + "\n")
    out = tmp_path / "out" / "results.jsonl"
    done = _sandbox_cli("run", "--tasks", str(tasks), "--programs", str(programs), "--out", str(out),
                        "--workers", "2", "--timeout", "1", "--memory-mb", "512", "--quiet")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["task_id"], r["status"], r["passed"]) for r in rows] == [
        ("add", "passed", True), ("7", "failed", False), ("add", "timeout", False), (7, "error", False)]
    assert rows[1]["feedback"] == "Input: 2 Output: 3 Expected: 4"
    assert rows[3]["feedback"].startswith("SyntaxError: ")
    assert all({"task_id", "status", "passed", "feedback", "duration_s", "tests", "stdout", "stderr",
                "peak_memory_mb", "attempts"} <= r.keys() for r in rows)


def test_cli_names_the_bad_line(tmp_path: Path) -> None:
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"task_id": "a", "prompt": "", "entry_point": "a", "tests": ["assert a("]}) + "\n")
    programs = tmp_path / "programs.jsonl"
    programs.write_text("")
    done = _sandbox_cli("run", "--tasks", str(tasks), "--programs", str(programs), "--out", str(tmp_path / "o"))
    assert done.returncode == 2
    assert f"{tasks}:1: field 'tests': " in done.stderr


AFFINITY = TestSuite("f", ("assert f() == 0",))
SHOW_AFFINITY = "import os\ndef f():\n    print(sorted(os.sched_getaffinity(0)))\n    return 0\n"


@pytest.mark.parametrize("pin", [True, False])
def test_pinned_workers_run_their_jobs_on_their_own_cpu(pin: bool) -> None:
    usable = sorted(os.sched_getaffinity(0))
    with SandboxPool(workers=2, timeout=5.0, pin_cpus=pin) as pool:
        jobs = [Job(SHOW_AFFINITY, AFFINITY)] * 6
        seen = {r.stdout.strip() for r in pool.run_batch(jobs)}
    if pin:
        assert seen <= {str([usable[0]]), str([usable[1 % len(usable)]])}, seen
    else:
        assert seen == {str(usable)}


def test_jobs_go_to_their_suites_home_worker_until_it_runs_dry() -> None:
    from types import SimpleNamespace

    from sandbox.pool import _Batch

    suites = [TestSuite("f", (f"assert f({i}) == 0",)) for i in range(6)]
    jobs = [Job("def f(x):\n    return 0\n", suites[i % 6]) for i in range(30)]
    batch = _Batch(SimpleNamespace(_workers=[None, None, None]), jobs, None)  # type: ignore[arg-type]
    homes = {batch._home(job) for job in jobs}
    slot = next(iter(homes))
    own = [batch._next_for(slot) for _ in range(len(batch._pending[slot]))]
    assert own and all(batch._home(jobs[i]) == slot for i in own)  # type: ignore[index]
    assert own == sorted(own)  # its own jobs in input order
    longest = max(batch._pending, key=len)
    tail = longest[-1]
    assert batch._next_for(slot) == tail  # then the last job of the busiest other worker

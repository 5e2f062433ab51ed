"""The judge: runs each job in a process of its zygote and decides the verdict, in the trusted worker.

Per job it takes from the zygote the process it forked ahead (its channel and the pipes of its stdout/stderr,
drained whenever the judge waits: :mod:`sandbox.output`), talks to it through a
:class:`~sandbox.remote.Session` while the tests run here (the calls planned by :mod:`sandbox.plan` answered
ahead; a request off the plan re-runs the job unplanned), then has the zygote kill and reap everything the
job created. A harness failure (zygote died, job process never came up) restarts the zygote and retries the
job once; a second failure is reported as ``sandbox_error``.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time

from sandbox import wire
from sandbox.checks import CheckRun, CompiledSuite, InvalidTests, compile_suite, run_checks, verdict
from sandbox.errors import SandboxFailure
from sandbox.feedback import render_error
from sandbox.job import Job, Limits
from sandbox.output import OutputTail
from sandbox.program import program_payload
from sandbox.remote import CandidateRaised, JobEnded, PlanMismatch, Session
from sandbox.result import Result, Status, TestOutcome
from sandbox.zygote_handle import JobExit, ZygoteHandle

logger = logging.getLogger(__name__)

MAX_FRAME_BYTES = 16 * 1024 * 1024
_FAILURE_STDERR_CHARS = 500  # of a job process that failed to come up, in the sandbox failure's message


class Judge:
    """Runs jobs in sandboxed processes and decides their verdicts."""

    def __init__(self, limits: Limits, zygote: ZygoteHandle) -> None:
        self._limits = limits
        self._zygote = zygote

    def stop(self) -> None:
        self._zygote.close()

    def execute(self, job: Job, attempts: int) -> Result:
        """Run one job; harness failures are retried while ``attempts`` last, then reported."""
        start = time.monotonic()
        try:
            suite = compile_suite(job.suite)
        except InvalidTests as exc:
            return Result(Status.SANDBOX_ERROR, render_error("InvalidTests", str(exc)), (), 0.0)
        try:
            program = program_payload(job.program)
        except CandidateRaised as exc:  # the program does not compile: no job process is needed to say so
            return Result(Status.ERROR, render_error(exc.type_name, exc.message), _not_run(suite),
                          time.monotonic() - start)
        failure = ""
        for attempt in range(1, attempts + 1):
            try:
                try:
                    return self._attempt(program, suite, attempt, suite.planned)
                except PlanMismatch:
                    logger.debug("the tests left the plan of %s; running it again unplanned", suite.entry_point)
                    return self._attempt(program, suite, attempt, ())
            except SandboxFailure as exc:
                failure = str(exc)
                logger.warning("sandbox failure (attempt %d of %d): %s; restarting the zygote",
                               attempt, attempts, failure)
                self._zygote.stop()
                try:
                    self._zygote.start()
                except SandboxFailure as restart:
                    failure = f"{failure}; restart failed: {restart}"
        return Result(Status.SANDBOX_ERROR, render_error("SandboxError", failure), _not_run(suite),
                      time.monotonic() - start, attempts=attempts)

    def _attempt(self, program: bytes | str, suite: CompiledSuite, attempt: int, planned: tuple[bytes, ...]) -> Result:
        start = time.monotonic()
        seq, (channel, out, err) = self._zygote.start_job()
        ours = socket.socket(fileno=channel)
        chars = self._limits.output_tail_chars
        keep_bytes = 4 * max(chars, _FAILURE_STDERR_CHARS)  # UTF-8: at most 4 bytes a character
        stdout, stderr = OutputTail(out, keep_bytes), OutputTail(err, keep_bytes)
        try:
            session = Session(wire.DeadlineChannel(ours, MAX_FRAME_BYTES, (stdout, stderr)),
                              start + self._limits.timeout)
            failure: SandboxFailure | None = None
            try:
                stage = self._load_and_check(program, suite, session, planned)
            except SandboxFailure as exc:
                failure = exc
            finally:
                exit_info = self._zygote.finish(seq)
            stdout.drain_to_end()  # every process of the job is gone: what it wrote is all in the pipes
            stderr.drain_to_end()
            if failure is not None:
                raise SandboxFailure(f"{failure}; job stderr: {stderr.text(_FAILURE_STDERR_CHARS)!r}")
            if session.off_plan:  # even if a test swallowed the PlanMismatch
                raise PlanMismatch()
            ended = self._ending(session.ended, exit_info) if session.ended is not None else None
            if isinstance(stage, CheckRun):
                status, feedback, tests = verdict(suite, stage, ended)
            else:
                status, feedback = stage or ended  # type: ignore[misc]
                tests = _not_run(suite)
            return Result(status, feedback, tests, time.monotonic() - start, exit_info.max_rss_kb / 1024,
                          stdout.text(chars), stderr.text(chars), attempt)
        finally:
            ours.close()
            os.close(out)
            os.close(err)

    @staticmethod
    def _load_and_check(program: bytes | str, suite: CompiledSuite, session: Session,
                        planned: tuple[bytes, ...]) -> CheckRun | tuple[Status, str] | None:
        """Load the program and run the tests: (status, feedback) if loading failed, None if the job ended."""
        try:
            stand_ins = session.load(program, suite.program_names, planned)
        except CandidateRaised as exc:
            return (Status.MEMORY if exc.type_name == "MemoryError" else Status.ERROR,
                    render_error(exc.type_name, exc.message))
        except JobEnded:
            return None
        if suite.entry_point not in stand_ins:
            return Status.ERROR, render_error("NameError", f"name {suite.entry_point!r} is not defined")
        return run_checks(suite, session, stand_ins)

    def _ending(self, ended: JobEnded, exit_info: JobExit) -> tuple[Status, str]:
        """Status and feedback for a job that stopped answering."""
        limit = self._limits.timeout
        if ended.kind == "timeout":
            return Status.TIMEOUT, render_error("TimeoutError", f"exceeded the {limit:g} s time limit")
        if ended.kind == "protocol":
            return Status.CRASHED, render_error("ProcessError", f"the program corrupted its result channel "
                                                                f"({ended.detail})")
        if os.WIFSIGNALED(exit_info.wait_status):
            signum = os.WTERMSIG(exit_info.wait_status)
            if signum == signal.SIGXCPU or (signum == signal.SIGKILL
                                            and exit_info.cpu_s >= self._limits.cpu_seconds - 0.5):
                return Status.TIMEOUT, render_error("TimeoutError", "exceeded the CPU-time limit")
            return Status.CRASHED, render_error("ProcessError", f"killed by {signal.Signals(signum).name}")
        code = os.waitstatus_to_exitcode(exit_info.wait_status)
        return Status.CRASHED, render_error("ProcessError", f"exited with code {code} before the tests ended")


def _not_run(suite: CompiledSuite) -> tuple[TestOutcome, ...]:
    return tuple(TestOutcome(t, Status.NOT_RUN)
                 for t, is_test in zip(suite.tests, suite.is_test, strict=True) if is_test)

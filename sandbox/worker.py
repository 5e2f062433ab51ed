"""A sandbox worker: a trusted judge process that owns one zygote and runs jobs one at a time.

Pool ↔ worker messages (pickled, over a ``multiprocessing`` connection on a socketpair)::

    pool → worker   ("jobs", [(index, attempts, Job), ...]) | ("stop",)
    worker → pool   ("hello", {layer: state}) | ("results", [(index, Result), ...]) | ("log", level, message)

Results go back two at a time (and at the end of each "jobs" message): half the wake-ups of the pool, which
otherwise cost ~3% of the CPU of a run of small programs.

Per job the worker takes from the zygote the process it forked ahead (its channel and the memory files of its
stdout/stderr), talks to it through a :class:`~sandbox.remote.Session` while the tests run here (the calls
planned by :mod:`sandbox.plan` answered ahead; a request off the plan re-runs the job unplanned), then has
the zygote kill and reap everything the job created. A harness failure (zygote died, job process never came up) restarts
the zygote and retries the job once; a second failure is reported as ``sandbox_error``.
"""

from __future__ import annotations

import logging
import marshal
import os
import select
import shutil
import signal
import site
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from sandbox import wire
from sandbox.checks import CheckRun, CompiledSuite, InvalidTests, compile_suite, run_checks, verdict
from sandbox.errors import ProtocolError, SandboxFailure
from sandbox.feedback import render_error
from sandbox.isolation import LEFTOVER_PREFIX, IsolationConfig, PidsCgroup
from sandbox.job import Job, Limits
from sandbox.program import program_payload
from sandbox.remote import CandidateRaised, JobEnded, PlanMismatch, Session
from sandbox.result import Result, Status, TestOutcome
from sandbox.zygote_boot import ZygoteSpec, boot

logger = logging.getLogger(__name__)

MAX_FRAME_BYTES = 16 * 1024 * 1024
RESULTS_PER_MESSAGE = 2
_ZYGOTE_START_SECONDS = 60.0
_ZYGOTE_REAP_SECONDS = 10.0
@dataclass(frozen=True)
class JobExit:
    """How the job process ended, as reported by the zygote."""

    wait_status: int
    max_rss_kb: int
    cpu_s: float


class ZygoteHandle:
    """The worker's side of its zygote: start, run a job, end it, stop."""

    def __init__(self, limits: Limits, config: IsolationConfig, name: str, scratch_dir: str) -> None:
        self._limits, self._config, self._name, self._scratch = limits, config, name, scratch_dir
        self._pid: int | None = None  # the process forked to boot the zygote
        self._control: socket.socket | None = None
        self._cgroup: PidsCgroup | None = None
        self._starts = 0
        self._seq = 0

    def start(self) -> dict[str, str]:
        """Start a zygote and return its isolation report. Raises ``SandboxFailure``.

        The zygote boots in a process forked from this one (:mod:`sandbox.zygote_boot`). It is moved into its
        pids cgroup while it starts, and creates no process before it is told so: joining a cgroup waits for an
        RCU grace period (~20 ms here) that would otherwise delay every start.
        """
        self._starts += 1
        control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        spec = ZygoteSpec(theirs.fileno(), self._limits, self._config.namespaces, tuple(site.getsitepackages()),
                          self._scratch, os.getuid(), os.getpid(), self._config.disabled)
        with theirs:
            self._pid = os.fork()
            if self._pid == 0:
                control.close()
                boot(spec)
        self._control = control
        try:
            control.send(marshal.dumps(("cgroup", self._join_cgroup(self._pid))))
        except OSError as exc:
            raise SandboxFailure(f"zygote unreachable: {exc}") from None
        hello = self._receive(time.monotonic() + _ZYGOTE_START_SECONDS)
        if hello[0] != "hello" or type(hello[1]) is not dict:
            raise SandboxFailure(f"zygote said {hello[0]!r} instead of hello")
        return hello[1]

    def _join_cgroup(self, pid: int) -> str:
        """Put process ``pid`` in a fresh pids cgroup; "active", or why there is none."""
        if not self._config.cgroup:
            return "disabled by configuration"
        try:
            self._cgroup = PidsCgroup.create(f"{LEFTOVER_PREFIX}{self._name}-{self._starts}",
                                             self._limits.max_processes + 2)
            self._cgroup.add(pid)
        except OSError as exc:
            if self._cgroup is not None:
                self._cgroup.remove()
                self._cgroup = None
            return f"unavailable: {exc.strerror or exc}"
        return "active"

    def start_job(self) -> tuple[int, list[int]]:
        """Hand the next job to the zygote's waiting process: its seq and [channel, stdout, stderr]."""
        self._seq += 1
        try:
            self._control.send(marshal.dumps(("run", self._seq)))  # type: ignore[union-attr]
        except OSError as exc:
            raise SandboxFailure(f"zygote unreachable: {exc}") from None
        message, fds = self._receive_fds(time.monotonic() + _ZYGOTE_REAP_SECONDS)
        if message != ("job", self._seq) or len(fds) != 3:
            for fd in fds:
                os.close(fd)
            raise SandboxFailure(f"zygote answered {message!r} with {len(fds)} descriptors to run")
        return self._seq, fds

    def finish(self, seq: int) -> JobExit:
        """End job ``seq`` (if it has not ended) and wait until everything it created is reaped."""
        try:
            self._control.send(marshal.dumps(("kill", seq)))  # type: ignore[union-attr]
        except OSError:
            pass
        deadline = time.monotonic() + _ZYGOTE_REAP_SECONDS
        while True:
            message = self._receive(deadline)
            if message[0] == "done" and len(message) == 5 and message[1] == seq:
                _, _, status, rss, cpu = message
                if type(status) is int and type(rss) is int and type(cpu) is float:
                    return JobExit(status, rss, cpu)
                raise SandboxFailure("malformed done message")

    def stop(self) -> None:
        """Stop the zygote (closing its control socket ends it), then remove its cgroup."""
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._pid is not None:
            if not _reap_within(self._pid, 5.0):
                os.kill(self._pid, signal.SIGKILL)  # its PID 1 child dies with it (parent-death signal)
                _reap_within(self._pid, 5.0)
            self._pid = None
        if self._cgroup is not None:
            for _ in range(50):
                try:
                    self._cgroup.remove()
                    break
                except OSError:
                    time.sleep(0.1)
            self._cgroup = None

    def pids_in_use(self) -> int | None:
        """Processes in this zygote's cgroup (zygote included), if it has one."""
        return self._cgroup.current() if self._cgroup else None

    def _receive(self, deadline: float) -> tuple[Any, ...]:
        message, fds = self._receive_fds(deadline)
        for fd in fds:  # descriptors come only with "job"
            os.close(fd)
        return message

    def _receive_fds(self, deadline: float) -> tuple[tuple[Any, ...], list[int]]:
        assert self._control is not None
        poller = select.poll()
        poller.register(self._control, select.POLLIN)
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not poller.poll(remaining * 1000):
            raise SandboxFailure("zygote did not answer in time")
        data, fds, _, _ = socket.recv_fds(self._control, 65536, 3)
        if not data:
            raise SandboxFailure("zygote exited")
        try:
            message = wire.load_plain(data)
        except ProtocolError:
            message = ()
        if type(message) is not tuple or not message:
            for fd in fds:
                os.close(fd)
            raise SandboxFailure("malformed zygote message")
        return message, fds


class Judge:
    """Runs jobs in sandboxed processes and decides their verdicts."""

    def __init__(self, limits: Limits, config: IsolationConfig, name: str) -> None:
        self._limits = limits
        self._scratch = tempfile.mkdtemp(prefix=f"{LEFTOVER_PREFIX}{name}-")
        self._zygote = ZygoteHandle(limits, config, name, self._scratch)

    def start(self) -> dict[str, str]:
        return self._zygote.start()

    def stop(self) -> None:
        self._zygote.stop()
        shutil.rmtree(self._scratch, ignore_errors=True)

    def pids_in_use(self) -> int | None:
        return self._zygote.pids_in_use()

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
        try:
            session = Session(wire.DeadlineChannel(ours, MAX_FRAME_BYTES), start + self._limits.timeout)
            try:
                stage = self._load_and_check(program, suite, session, planned)
            except SandboxFailure as exc:
                raise SandboxFailure(f"{exc}; job stderr: {_tail(err, 500)!r}") from None
            finally:
                exit_info = self._zygote.finish(seq)
            if session.off_plan:  # even if a test swallowed the PlanMismatch
                raise PlanMismatch()
            ended = self._ending(session.ended, exit_info) if session.ended is not None else None
            if isinstance(stage, CheckRun):
                status, feedback, tests = verdict(suite, stage, ended)
            else:
                status, feedback = stage or ended  # type: ignore[misc]
                tests = _not_run(suite)
            chars = self._limits.output_tail_chars
            return Result(status, feedback, tests, time.monotonic() - start, exit_info.max_rss_kb / 1024,
                          _tail(out, chars), _tail(err, chars), attempt)
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


def _reap_within(pid: int, seconds: float) -> bool:
    """Reap child ``pid`` if it exits within ``seconds``; False if it is still running."""
    pidfd = os.pidfd_open(pid)
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        if not poller.poll(seconds * 1000):
            return False
    finally:
        os.close(pidfd)
    os.waitpid(pid, 0)
    return True


def _not_run(suite: CompiledSuite) -> tuple[TestOutcome, ...]:
    return tuple(TestOutcome(t, Status.NOT_RUN)
                 for t, is_test in zip(suite.tests, suite.is_test, strict=True) if is_test)


def _tail(fd: int, chars: int) -> str:
    """The last ``chars`` characters written to a memory file (undecodable bytes replaced)."""
    if chars <= 0:
        return ""
    size = os.fstat(fd).st_size
    data = os.pread(fd, chars * 4, max(0, size - chars * 4))
    return data.decode("utf-8", "replace")[-chars:]


class _ForwardToPool(logging.Handler):
    def __init__(self, conn: Connection) -> None:
        super().__init__()
        self._conn = conn

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._conn.send(("log", record.levelno, record.getMessage()))
        except OSError:
            pass


def main() -> None:
    """Entry point of a worker process: ``python -c <boot> <fd> <name>``; the first message is its config
    (limits, isolation, and the CPU to pin itself, its zygote and its jobs to, or None)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the pool decides when workers stop
    os.set_inheritable(int(sys.argv[1]), False)  # the zygote boots in a fork of this process, then execs
    conn = Connection(int(sys.argv[1]))
    logging.getLogger("sandbox").addHandler(_ForwardToPool(conn))
    logging.getLogger("sandbox").setLevel(logging.INFO)
    limits, config, cpu = conn.recv()
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})  # before the zygote starts: it and every job inherit it
    judge = Judge(limits, config, sys.argv[2])
    try:
        conn.send(("hello", judge.start()))
        while True:
            try:
                message = conn.recv()
            except EOFError:
                return
            if message[0] == "stop":
                return
            results = []
            for index, attempts, job in message[1]:
                results.append((index, judge.execute(job, attempts)))
                if len(results) == RESULTS_PER_MESSAGE:
                    conn.send(("results", results))
                    results = []
            if results:
                conn.send(("results", results))
    finally:
        judge.stop()

"""The zygote: a pre-initialised Python process that forks one sandboxed process per job.

A worker starts it with a fresh ``exec`` and a scrubbed environment, so its memory holds nothing of the
worker's (``/proc/self/environ`` included). It enters the worker-level isolation once, imports the modules
programs commonly use, freezes them out of the garbage collector, and then serves this control protocol on
a ``SOCK_SEQPACKET`` socket (marshal-encoded tuples)::

    worker → zygote   ("cgroup", state)                                once, first: the zygote is in its
                                                                       pids cgroup ("active") or why not
    zygote → worker   ("hello", {layer: state})                        once, when ready
    worker → zygote   ("run", seq)
    zygote → worker   ("job", seq) + descriptors [channel, stdout, stderr]
    zygote → worker   ("done", seq, wait_status, max_rss_kb, cpu_s)    when the job is over
    worker → zygote   ("kill", seq)                                    end the job now

The next job's process is forked ahead, as soon as the previous one is reaped: it enters the job sandbox and
waits on its channel, so fork and sandbox set-up overlap the worker's own work instead of delaying the job.

Invariants: one job at a time, and at most one more process forked ahead that has run no program code;
before "done" is sent, every process the job created is dead and reaped (the next one is forked only
after); the zygote never runs program code and never reads anything a job writes. The job's exit is
noticed through a pidfd, so a job whose descendants keep its channel open still ends promptly.
"""

from __future__ import annotations

import gc
import importlib
import json
import marshal
import os
import resource
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from sandbox import candidate, isolation
from sandbox.job import Limits

PRELOADED_MODULES = (
    "array", "bisect", "cmath", "collections", "copy", "dataclasses", "datetime", "decimal", "enum",
    "fractions", "functools", "hashlib", "heapq", "itertools", "json", "math", "numbers", "operator",
    "random", "re", "statistics", "string", "textwrap", "typing", "unicodedata",
)
EXIT_SETUP_FAILED = 121
_REAP_SECONDS = 5.0


@dataclass(frozen=True)
class ZygoteSpec:
    """What a worker tells its zygote on the command line (JSON)."""

    control_fd: int
    limits: Limits
    namespaces: bool
    site_packages: tuple[str, ...]  # what jobs may import besides the standard library (no .pth files run)
    scratch_dir: str  # host directory for per-job working directories when there is no mount namespace
    outer_uid: int
    worker_pid: int
    disabled: tuple[str, ...] = ()  # namespace layers not to attempt

    def to_json(self) -> str:
        return json.dumps({**self.__dict__, "limits": self.limits.__dict__})

    @classmethod
    def from_json(cls, text: str) -> ZygoteSpec:
        data = json.loads(text)
        return cls(**{**data, "limits": Limits(**data["limits"]), "site_packages": tuple(data["site_packages"]),
                      "disabled": tuple(data["disabled"])})


def main() -> None:
    """Entry point of the zygote process: ``python -I -S -c <boot> <spec-json>``."""
    spec = ZygoteSpec.from_json(sys.argv[1])
    sys.dont_write_bytecode = True
    sys.path.extend(spec.site_packages)
    control = socket.socket(fileno=spec.control_fd)
    report = isolation.IsolationReport()
    cgroup = marshal.loads(control.recv(65536) or marshal.dumps(("cgroup", "the worker went away")))
    report.layers["cgroup_pids"] = str(cgroup[1])  # no process is created before this point
    user_processes = isolation.count_user_processes(spec.outer_uid) if spec.outer_uid != 0 else 0
    if spec.namespaces:
        isolation.enter_worker_namespaces(report, spec.disabled)
    else:
        for layer in isolation.NAMESPACE_LAYERS:
            report.layers[layer] = "disabled by configuration"
    isolation.isolate_filesystem(report, _paths_python_needs(), scratch_mb=4 * spec.limits.max_file_mb)
    isolation.lock_down_zygote(report)
    job_user = _choose_job_user(spec, report)
    # RLIMIT_NPROC counts every process of the job's real user; it is ignored for root.
    nproc_limit = (spec.limits.max_processes if job_user else
                   user_processes + spec.limits.max_processes if spec.outer_uid != 0 else None)
    report.layers["rlimit_nproc"] = isolation.ACTIVE if nproc_limit else "ignored by the kernel for root"
    isolation.limit_job_resources(spec.limits, job_user, nproc_limit)
    for name in PRELOADED_MODULES:
        importlib.import_module(name)
    candidate.warm_up()
    gc.collect()
    gc.freeze()
    _Zygote(control, spec, report, job_user).serve()


def _choose_job_user(spec: ZygoteSpec, report: isolation.IsolationReport) -> tuple[int, int] | None:
    """Run jobs as an unprivileged uid when we are really root and the Python installation is reachable.

    This holds with or without the namespaces: where they are refused, the uid is what keeps a job from
    signalling, reading the environment of, or writing the files of the root-owned host processes.
    """
    if spec.outer_uid != 0 or os.geteuid() != 0:
        report.layers["job_user"] = "not root: jobs keep the worker's uid, without capabilities"
        return None
    user = isolation.job_user_for(spec.worker_pid)
    pid = os.fork()
    if pid == 0:  # probe: can that user read the interpreter's standard library?
        os.setresgid(user[1], user[1], user[1])
        os.setresuid(user[0], user[0], user[0])
        readable = os.access(os.__file__, os.R_OK) and os.access(os.path.dirname(os.__file__), os.X_OK)
        os._exit(0 if readable else 1)
    if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0:
        report.layers["job_user"] = "the Python installation is not readable by other users: jobs run as root"
        return None
    if not report.active("private_tmp"):
        os.chmod(spec.scratch_dir, 0o711)  # job directories are made in here: let the job user reach its own
    report.layers["job_user"] = isolation.ACTIVE
    return user


def _paths_python_needs() -> list[str]:
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *sys.path,
             str(Path(__file__).parents[1]), os.path.dirname(os.path.realpath(sys.executable))}
    return sorted({os.path.realpath(p) for p in roots if p and os.path.exists(p)})


@dataclass(frozen=True)
class _Prepared:
    """A forked job process waiting for its program, and the descriptors the worker gets for it."""

    pid: int
    workdir: str
    fds: list[int]  # the judge's end of the channel, the stdout and stderr memory files


class _Zygote:
    def __init__(self, control: socket.socket, spec: ZygoteSpec, report: isolation.IsolationReport,
                 job_user: tuple[int, int] | None) -> None:
        self._control = control
        self._spec = spec
        self._job_user = job_user
        self._private_tmp = report.active("private_tmp")
        self._pid1 = os.getpid() == 1
        self._devnull = os.open(os.devnull, os.O_RDONLY)
        self._poller = select.poll()
        self._poller.register(control, select.POLLIN)
        if self._private_tmp:
            os.environ["HOME"] = os.environ["TMPDIR"] = isolation.WORKDIR
        self._send(("hello", report.layers))

    def serve(self) -> None:
        job = self._prepare()
        while True:
            message, fds = self._receive()
            for fd in fds:
                os.close(fd)
            if message is None:
                return
            if message[0] == "run":
                self._run_job(message[1], job)
                job = self._prepare()  # while the worker reads the verdict and fetches the next job

    def _prepare(self) -> _Prepared:
        """Fork the next job's process: sandboxed, its stdio and channel in place, waiting for the program."""
        workdir = self._make_workdir()
        judge_end, job_end = socket.socketpair()
        stdout = os.memfd_create("stdout", os.MFD_CLOEXEC)
        stderr = os.memfd_create("stderr", os.MFD_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            try:
                self._control.close()
                if not self._private_tmp:
                    os.environ["HOME"] = os.environ["TMPDIR"] = workdir
                stdio_and_channel = (self._devnull, stdout, stderr, job_end.fileno())
                isolation.enter_job_sandbox(self._spec.limits, stdio_and_channel, workdir, self._job_user,
                                            new_session=not self._pid1)
                candidate.serve(socket.socket(fileno=3))
            except BaseException:  # noqa: BLE001 - report why the sandbox could not be set up, then exit
                traceback.print_exc()
            finally:
                os._exit(EXIT_SETUP_FAILED)
        job_end.close()
        return _Prepared(pid, workdir, [judge_end.detach(), stdout, stderr])

    def _run_job(self, seq: int, job: _Prepared) -> None:
        try:
            socket.send_fds(self._control, [marshal.dumps(("job", seq))], job.fds)
        finally:
            for fd in job.fds:
                os.close(fd)
        self._wait_for_end(job.pid, seq)
        status, rusage = self._reap(job.pid)
        if self._private_tmp:
            isolation.wipe_scratch(isolation.SCRATCH, isolation.WORKDIR)
        else:
            shutil.rmtree(job.workdir, ignore_errors=True)
        self._send(("done", seq, status, rusage.ru_maxrss, rusage.ru_utime + rusage.ru_stime))

    def _make_workdir(self) -> str:
        if self._private_tmp:
            workdir = isolation.WORKDIR
            os.mkdir(workdir, 0o700)
        else:
            workdir = tempfile.mkdtemp(prefix="job-", dir=self._spec.scratch_dir)
        if self._job_user is not None:
            os.chown(workdir, *self._job_user)
        return workdir

    def _wait_for_end(self, pid: int, seq: int) -> None:
        """Block until the job process exits or the worker asks to end the job."""
        pidfd = os.pidfd_open(pid)
        self._poller.register(pidfd, select.POLLIN)
        try:
            while True:
                for fd, _ in self._poller.poll():
                    if fd == pidfd:
                        return
                    message, fds = self._receive()
                    for extra in fds:
                        os.close(extra)
                    if message is None or message == ("kill", seq):
                        return
        finally:
            self._poller.unregister(pidfd)
            os.close(pidfd)

    def _reap(self, pid: int) -> tuple[int, resource.struct_rusage]:
        """Kill everything the job created and reap it; returns the job process's wait status and usage."""
        self._kill_job(pid)
        _, status, rusage = os.wait4(pid, 0)
        deadline = time.monotonic() + _REAP_SECONDS
        while True:
            try:
                reaped, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return status, rusage
            if reaped == 0:
                if time.monotonic() > deadline:
                    os._exit(EXIT_SETUP_FAILED)  # as PID 1 this makes the kernel kill the whole namespace
                self._kill_job(pid)
                time.sleep(0.001)

    def _kill_job(self, pid: int) -> None:
        if self._pid1:
            try:
                os.kill(-1, signal.SIGKILL)  # every process of our PID namespace except ourselves
            except ProcessLookupError:
                pass
            return
        for target in [pid, *self._adopted_children()]:
            for kill in (os.killpg, os.kill):
                try:
                    kill(target, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass

    @staticmethod
    def _adopted_children() -> list[int]:
        """Our children: the job process and, as subreaper, any orphan that escaped its process group."""
        try:
            return [int(p) for p in Path(f"/proc/self/task/{os.getpid()}/children").read_text().split()]
        except OSError:
            return []

    def _send(self, message: tuple[object, ...]) -> None:
        self._control.send(marshal.dumps(message))

    def _receive(self) -> tuple[tuple[object, ...] | None, list[int]]:
        data, fds, _, _ = socket.recv_fds(self._control, 65536, 4)
        if not data:
            return None, fds
        return marshal.loads(data), fds


if __name__ == "__main__":
    main()

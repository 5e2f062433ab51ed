"""The zygote: a lean, pre-initialised Python process that forks one sandboxed process per job.

:mod:`sandbox.zygote_boot` applies the worker-level isolation and then ``exec``s this, so the zygote holds
only what jobs need: this module, the job side of the protocol, and the modules programs commonly import,
frozen out of the garbage collector. Every job is forked from it, so its size is a cost per job (~40 µs per
MiB here, in ``fork``'s page-table copy and the job's exit); it took a third off each job's ``fork`` and exit
to leave the boot's modules behind. It serves this control protocol on a ``SOCK_SEQPACKET`` socket
(marshal-encoded tuples)::

    worker → zygote   ("cgroup", state)                                once, first (to the boot): the zygote
                                                                       is in its pids cgroup, or why not
    zygote → worker   ("hello", {layer: state})                        once, when ready
    worker → zygote   ("run", seq)
    zygote → worker   ("job", seq) + descriptors [channel, stdout, stderr]  (the judge's ends: socket, pipes)
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
import marshal
import os
import resource
import select
import signal
import socket
import sys
import time
from typing import TypedDict

from sandbox import candidate, job_sandbox

# What programs import often enough to be worth a place in every job: each of these was imported by at least
# 2 of the 1138 HumanEval and MBPP reference programs. Anything else is imported by the job that needs it.
PRELOADED_MODULES = (
    "array", "bisect", "cmath", "collections", "functools", "heapq", "itertools", "math", "operator", "re",
    "string", "typing",
)
EXIT_SETUP_FAILED = 121
_REAP_SECONDS = 5.0


class ZygoteParams(TypedDict):
    """What the boot hands the zygote it execs (marshalled, hex, on the command line)."""

    control_fd: int
    cpu_seconds: int  # each job's CPU-time limit
    job_user: tuple[int, int] | None  # (uid, gid) jobs switch to, if any
    private_tmp: bool  # /tmp is this worker's own tmpfs (jobs work in WORKDIR, wiped after each)
    scratch_dir: str  # where job directories are made without a private /tmp
    kept_in_scratch: list[str]  # entries of the private /tmp bound in from the host: never wiped
    site_packages: list[str]
    layers: dict[str, str]  # the isolation report so far


def main() -> None:
    """Entry point, exec'd by :mod:`sandbox.zygote_boot`: ``python -I -S -c <boot> <marshalled-params-hex>``."""
    params: ZygoteParams = marshal.loads(bytes.fromhex(sys.argv[1]))
    sys.dont_write_bytecode = True
    sys.path.extend(params["site_packages"])
    job_sandbox.lock_down_zygote(params["layers"])
    for name in PRELOADED_MODULES:
        importlib.import_module(name)
    candidate.warm_up()
    gc.collect()
    gc.freeze()
    _Zygote(params).serve()


class _Zygote:
    def __init__(self, params: ZygoteParams) -> None:
        self._control = socket.socket(fileno=params["control_fd"])
        self._cpu_seconds = params["cpu_seconds"]
        self._job_user = params["job_user"]
        self._private_tmp = params["private_tmp"]
        self._scratch_dir = params["scratch_dir"]
        self._kept_in_scratch = frozenset(params["kept_in_scratch"])
        self._pid1 = os.getpid() == 1
        self._devnull = os.open(os.devnull, os.O_RDONLY)
        self._poller = select.poll()
        self._poller.register(self._control, select.POLLIN)
        if self._private_tmp:
            os.environ["HOME"] = os.environ["TMPDIR"] = job_sandbox.WORKDIR
        self._send(("hello", params["layers"]))

    def serve(self) -> None:
        job = self._prepare()
        while True:
            message = self._receive()
            if message is None:
                return
            if message[0] == "run":
                self._run_job(message[1], job)  # type: ignore[arg-type]
                job = self._prepare()  # while the worker reads the verdict and fetches the next job

    def _prepare(self) -> tuple[int, str, list[int]]:
        """Fork the next job's process, sandboxed, its stdio and channel in place, waiting for the program:
        (pid, working directory, [the judge's ends of the channel and of the stdout and stderr pipes])."""
        workdir = self._make_workdir()
        judge_end, job_end = socket.socketpair()
        stdout, job_stdout = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)  # the job makes its own ends blocking
        stderr, job_stderr = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        pid = os.fork()
        if pid == 0:
            try:
                self._control.close()
                if not self._private_tmp:
                    os.environ["HOME"] = os.environ["TMPDIR"] = workdir
                stdio_and_channel = (self._devnull, job_stdout, job_stderr, job_end.fileno())
                job_sandbox.enter_job_sandbox(self._cpu_seconds, stdio_and_channel, workdir, self._job_user,
                                              new_session=not self._pid1)
                candidate.serve(socket.socket(fileno=3))
            except BaseException:  # noqa: BLE001 - report why the sandbox could not be set up, then exit
                import traceback

                traceback.print_exc()
            finally:
                os._exit(EXIT_SETUP_FAILED)
        job_end.close()
        os.close(job_stdout)
        os.close(job_stderr)
        return pid, workdir, [judge_end.detach(), stdout, stderr]

    def _run_job(self, seq: int, job: tuple[int, str, list[int]]) -> None:
        pid, workdir, fds = job
        try:
            socket.send_fds(self._control, [marshal.dumps(("job", seq))], fds)
        finally:
            for fd in fds:
                os.close(fd)
        self._wait_for_end(pid, seq)
        status, rusage = self._reap(pid)
        if self._private_tmp:
            job_sandbox.wipe_scratch(job_sandbox.SCRATCH, job_sandbox.WORKDIR, self._kept_in_scratch)
        else:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
        self._send(("done", seq, status, rusage.ru_maxrss, rusage.ru_utime + rusage.ru_stime))

    def _make_workdir(self) -> str:
        if self._private_tmp:
            workdir = job_sandbox.WORKDIR
            os.mkdir(workdir, 0o700)
        else:
            import tempfile  # only without a private /tmp

            workdir = tempfile.mkdtemp(prefix="job-", dir=self._scratch_dir)
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
                    message = self._receive()
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
            with open(f"/proc/self/task/{os.getpid()}/children") as children:
                return [int(p) for p in children.read().split()]
        except OSError:
            return []

    def _send(self, message: tuple[object, ...]) -> None:
        self._control.send(marshal.dumps(message))

    def _receive(self) -> tuple[object, ...] | None:
        """The worker's next message (None: it is gone). It never sends descriptors, and any sent anyway are
        discarded by the kernel, since we read no ancillary data."""
        data = self._control.recv(65536)
        return marshal.loads(data) if data else None


if __name__ == "__main__":
    main()

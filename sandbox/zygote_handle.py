"""The worker's side of its zygote: launch it, hand out each job's process, end the job, stop.

The messages are those of :mod:`sandbox.zygote`. The zygote boots in a process forked from the worker
(:mod:`sandbox.zygote_boot`), so this module and what it imports is all the worker needs before that fork.
"""

from __future__ import annotations

import marshal
import os
import select
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from sandbox import wire
from sandbox.errors import ProtocolError, SandboxFailure
from sandbox.isolation import LEFTOVER_PREFIX, IsolationConfig, PidsCgroup
from sandbox.job import Limits
from sandbox.job_sandbox import ACTIVE
from sandbox.zygote_boot import ZygoteSpec, boot

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

    def __init__(self, limits: Limits, config: IsolationConfig, name: str, site_packages: tuple[str, ...] = ()
                 ) -> None:
        self._limits, self._config, self._name, self._site_packages = limits, config, name, site_packages
        self._scratch = tempfile.mkdtemp(prefix=f"{LEFTOVER_PREFIX}{name}-")
        self._pid: int | None = None  # the process forked to boot the zygote
        self._control: socket.socket | None = None
        self._cgroup: PidsCgroup | None = None
        self._starts = 0
        self._seq = 0

    def start(self) -> dict[str, str]:
        """Start a zygote and return its isolation report. Raises ``SandboxFailure``."""
        self.launch()
        return self.wait_ready()

    def launch(self) -> None:
        """Fork the process that boots the zygote (:mod:`sandbox.zygote_boot`) and return at once.

        The boot first joins the zygote's pids cgroup, which waits ~10-20 ms for an RCU grace period: time in
        which the worker can do something else (import what its judge needs).
        """
        self._starts += 1
        state = "disabled by configuration"
        if self._config.cgroup:
            try:
                self._cgroup = PidsCgroup.create(f"{LEFTOVER_PREFIX}{self._name}-{self._starts}",
                                                 self._limits.max_processes + 2)
                state = ACTIVE
            except OSError as exc:
                state = f"unavailable: {exc.strerror or exc}"
        control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        spec = ZygoteSpec(theirs.fileno(), self._limits, self._config.namespaces, self._site_packages,
                          self._scratch, os.getuid(), os.getpid(), self._cgroup, state, self._config.disabled)
        with theirs:
            self._pid = os.fork()
            if self._pid == 0:
                control.close()
                boot(spec)
        self._control = control

    def wait_ready(self) -> dict[str, str]:
        """Wait for the launched zygote's hello; its isolation report. Raises ``SandboxFailure``."""
        hello = self._receive(time.monotonic() + _ZYGOTE_START_SECONDS)
        if hello[0] != "hello" or type(hello[1]) is not dict:
            raise SandboxFailure(f"zygote said {hello[0]!r} instead of hello")
        if hello[1].get("cgroup_pids") != ACTIVE and self._cgroup is not None:
            self._cgroup.remove()  # the boot could not join it
            self._cgroup = None
        return hello[1]

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

    def close(self) -> None:
        """Stop the zygote for good and remove its scratch directory."""
        self.stop()
        shutil.rmtree(self._scratch, ignore_errors=True)

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

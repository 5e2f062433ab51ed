"""A sandbox worker process: owns one zygote and a judge, and runs the jobs the pool sends, one at a time.

Pool ↔ worker messages (pickled, over a ``multiprocessing`` connection on a socketpair; :class:`_PoolLink`)::

    pool → worker   ("jobs", [(index, attempts, Job), ...]) | ("stop",)
    worker → pool   ("hello", {layer: state}) | ("results", [(index, Result), ...]) | ("log", level, message)

Results go back two at a time (and at the end of each "jobs" message): half the wake-ups of the pool, which
otherwise cost ~3% of the CPU of a run of small programs. Each job is run by :class:`sandbox.judge.Judge`.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import sys
from typing import Any

from sandbox import wire
from sandbox.zygote_handle import ZygoteHandle

RESULTS_PER_MESSAGE = 2


class _PoolLink:
    """The worker's end of the pool's ``multiprocessing`` connection, read and written in its framing (a 4-byte
    length, then a pickle) without importing ``multiprocessing``: ~9 ms of the worker's start, before which its
    zygote could not be launched."""

    def __init__(self, fd: int) -> None:
        self._sock = socket.socket(fileno=fd)
        self._sock.set_inheritable(False)  # the zygote boots in a fork of this process, then execs

    def send(self, message: object) -> None:
        wire.send_blocking(self._sock, pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))

    def recv(self) -> Any:
        """The pool's next message; None once it is gone."""
        data = wire.recv_blocking(self._sock)
        return None if data is None else pickle.loads(data)  # noqa: S301 - the pool is the trusted caller


def _forward_logs(link: _PoolLink) -> None:
    """Send the sandbox's log records to the pool (``logging`` is imported late: launching the zygote does not
    need it)."""
    import logging

    class ToPool(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            try:
                link.send(("log", record.levelno, record.getMessage()))
            except OSError:
                pass

    logging.getLogger("sandbox").addHandler(ToPool())
    logging.getLogger("sandbox").setLevel(logging.INFO)


def main() -> None:
    """Entry point of a worker process: ``python -c <boot> <fd> <name>``; the first message is its config
    (limits, isolation, the CPU to pin itself, its zygote and its jobs to (or None), site-packages)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the pool decides when workers stop
    link = _PoolLink(int(sys.argv[1]))
    limits, config, cpu, site_packages = link.recv()
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})  # before the zygote starts: it and every job inherit it
    zygote = ZygoteHandle(limits, config, sys.argv[2], site_packages)
    zygote.launch()
    # Imported while the zygote boots (its first ~10-20 ms are spent waiting to join its cgroup).
    from sandbox.judge import Judge

    _forward_logs(link)
    judge = Judge(limits, zygote)
    try:
        link.send(("hello", zygote.wait_ready()))
        while (message := link.recv()) is not None and message[0] != "stop":
            results = []
            for index, attempts, job in message[1]:
                results.append((index, judge.execute(job, attempts)))
                if len(results) == RESULTS_PER_MESSAGE:
                    link.send(("results", results))
                    results = []
            if results:
                link.send(("results", results))
    finally:
        judge.stop()

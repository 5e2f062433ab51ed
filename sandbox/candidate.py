"""The job process's side: load the program, then answer the judge's requests with plain data.

Nothing here is trusted. The program can rewrite any of it, write anything to the channel, or exit at any
time; the judge only ever believes plain values it decodes itself, and decides every verdict on its side.
Requests (judge → job, pickled by the trusted judge)::

    (on start, before any request)     → ("started",)
    ("load", program, names, planned)  → ("ready", {name: description}) or ("load_error", type, message),
                                         then the answers to the ``planned`` requests, in order, unasked;
                                         ``program`` is marshalled code (:mod:`sandbox.program`) or source
    ("call", handle, args, kwargs)     → description | ("raise", type, message, is_builtin)
    ("getattr", handle, name)          → description | ("raise", ...)
    ("setattr", handle, name, value)   → ("value", None) | ("raise", ...)

A description is ``("value", plain)`` or ``("ref", handle, type_name)``; handles index the job's object table,
so objects the program defines (an MBPP ``Pair``, a tree ``Node``) stay in the job and are only ever named.
"""

from __future__ import annotations

import builtins
import functools
import io
import itertools
import marshal
import os
import pickle
import socket
import sys
from typing import NoReturn

from sandbox import wire

PROGRAM_MODULE_NAME = "__candidate__"  # not "__main__", so `if __name__ == "__main__":` blocks stay inert


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, table: list[object]) -> None:
        super().__init__(io.BytesIO(data))
        self._table = table

    def persistent_load(self, pid: object) -> object:
        return self._table[pid]  # type: ignore[index]


def serve(channel: socket.socket) -> NoReturn:
    """Run the job: load the program, then answer requests until the judge hangs up. Never returns."""
    table: list[object] = []
    try:
        _serve(channel, table)
    finally:
        os._exit(0)


def _serve(channel: socket.socket, table: list[object]) -> None:
    wire.send_blocking(channel, wire.dump_plain(("started",)))
    request = wire.recv_blocking(channel)
    if request is None:
        return
    _, program, names, planned = pickle.loads(request)
    namespace: dict[str, object] = {"__name__": PROGRAM_MODULE_NAME, "__builtins__": builtins}
    try:
        code = marshal.loads(program) if type(program) is bytes else compile(program, wire.PROGRAM_FILENAME, "exec",
                                                                             dont_inherit=True)
        exec(code, namespace)  # noqa: S102 - this is the sandboxed process
    except BaseException as exc:  # noqa: BLE001 - every failure of the program is reported, SystemExit included
        _flush_stdio()
        wire.send_blocking(channel, wire.dump_plain(("load_error", *wire.describe_exception(exc)[:2])))
        return
    _flush_stdio()
    found = {name: _describe(namespace[name], table) for name in names if name in namespace}
    wire.send_blocking(channel, wire.dump_plain(("ready", found)))
    for request in itertools.chain(planned, iter(functools.partial(wire.recv_blocking, channel), None)):
        op, handle, *rest = _Unpickler(request, table).load()
        target = table[handle]
        try:
            if op == "call":
                reply = _describe(target(*rest[0], **rest[1]), table)  # type: ignore[operator]
            elif op == "getattr":
                reply = _describe(getattr(target, rest[0]), table)
            else:
                setattr(target, rest[0], rest[1])
                reply = ("value", None)
        except BaseException as exc:  # noqa: BLE001
            reply = ("raise", *wire.describe_exception(exc))
        _flush_stdio()
        wire.send_blocking(channel, wire.dump_plain(reply))


_WARM_UP_PROGRAM = """
from typing import List
import math

def f(xs: List[int], k: int = 2) -> list:
    out = [math.isqrt(x) for x in xs if x % k == 0]
    return out + [str(k), (1, 2.5), {"a": {1, 2}}, None, True, b"x", sorted(xs)[::-1]]

class P:
    def __init__(self, a):
        self.a = a
"""


def warm_up() -> None:
    """Run this side of the protocol once, in-process, on a trusted program (a zygote calls it before it forks).

    CPython 3.11 specialises bytecode and fills its type cache on first use; done here, every job process
    inherits that state instead of writing it again into pages it shares with the zygote (each such write is
    a copy-on-write page fault, a large part of a small job's cost).
    """
    judge, job = socket.socketpair()
    with judge, job:
        planned = (pickle.dumps(("call", 0, ([1, 2],), {}), protocol=pickle.HIGHEST_PROTOCOL),)
        requests = [("load", _WARM_UP_PROGRAM, ("f", "P"), planned), ("call", 0, ([4, 9, 16, 3], ), {"k": 1}),
                    ("call", 0, (list(range(20)),), {}), ("call", 1, (3,), {}), ("getattr", 2, "a"),
                    ("setattr", 2, "a", [1]), ("call", 0, ("x",), {})]
        for request in requests:
            judge.sendall(wire.frame(pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL)))
        judge.shutdown(socket.SHUT_WR)
        _serve(job, [])  # the replies stay unread in the socket buffer and go with it


def _describe(value: object, table: list[object]) -> tuple[object, ...]:
    try:
        return ("value", wire.to_plain(value))
    except (TypeError, ValueError, RecursionError):
        table.append(value)
        return ("ref", len(table) - 1, type(value).__name__[:100])


def _flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001, S110 - the program may have replaced or closed its streams
            pass

"""The byte-level channel between the judge and a job process, and the plain-data rules for what crosses it.

Frames are a 4-byte big-endian length followed by the payload. The judge reads frames from the job with a
deadline and a size cap, so a job that stalls mid-frame, floods, or lies about lengths cannot hang or bloat
the judge; while it waits, it drains the job's output pipes (:mod:`sandbox.output`), which would otherwise fill
and stall the job. Job → judge payloads are ``marshal`` data that the judge accepts only if every node is an
exact builtin plain type (:data:`PLAIN_TYPES`); ``marshal`` itself never runs code, and anything else (code
objects, cycles, oversized trees) is rejected as a protocol error.
"""

from __future__ import annotations

import builtins
import marshal
import numbers
import select
import socket
import struct
import time
from typing import TYPE_CHECKING

from sandbox.errors import ProtocolError

if TYPE_CHECKING:  # the job side (and so the zygote) never imports it
    from sandbox.output import OutputTail

PLAIN_TYPES: frozenset[type] = frozenset(
    {type(None), bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset}
)
_SCALARS = (type(None), bool, int, float, complex, str, bytes)
_CONTAINERS = (list, tuple, set, frozenset)
MAX_PLAIN_NODES = 1_000_000
MAX_MESSAGE_CHARS = 1000
PROGRAM_FILENAME = "<program>"  # in tracebacks and syntax errors
_MAX_DEPTH = 200
_HEADER = struct.Struct("!I")


class JobTimeout(Exception):
    """The deadline passed while waiting on the job."""


def frame(payload: bytes) -> bytes:
    return _HEADER.pack(len(payload)) + payload


def send_blocking(sock: socket.socket, payload: bytes) -> None:
    """Job side: send one frame, blocking (the judge is trusted to read)."""
    sock.sendall(frame(payload))


def recv_blocking(sock: socket.socket) -> bytes | None:
    """Job side: read one frame, blocking; ``None`` when the judge closed the channel."""
    header = _recv_exact_blocking(sock, _HEADER.size)
    if header is None:
        return None
    return _recv_exact_blocking(sock, _HEADER.unpack(header)[0])


def _recv_exact_blocking(sock: socket.socket, size: int) -> bytes | None:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            return None
        got += n
    return bytes(buf)


class DeadlineChannel:
    """Judge side of a job channel: non-blocking socket, every read and write bounded by a deadline; the job's
    ``outputs`` are drained whenever the judge waits."""

    def __init__(self, sock: socket.socket, max_frame_bytes: int, outputs: tuple[OutputTail, ...] = ()) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._max = max_frame_bytes
        self._buf = bytearray()
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)
        self._outputs = {output.fd: output for output in outputs}
        for fd in self._outputs:
            self._poll.register(fd, select.POLLIN)

    def send(self, payload: bytes, deadline: float) -> None:
        """Send one frame; raises ``JobTimeout`` or ``ConnectionError`` (the job went away)."""
        data = memoryview(frame(payload))
        while data:
            try:
                data = data[self._sock.send(data):]
            except BlockingIOError:
                self._wait(select.POLLOUT, deadline)

    def recv(self, deadline: float) -> bytes | None:
        """Read one frame; ``None`` on end of stream. Raises ``JobTimeout`` or ``ProtocolError``."""
        while True:
            if len(self._buf) >= _HEADER.size:
                size = _HEADER.unpack_from(self._buf)[0]
                if size > self._max:
                    raise ProtocolError(f"frame of {size} bytes exceeds the {self._max}-byte cap")
                end = _HEADER.size + size
                if len(self._buf) >= end:
                    payload = bytes(self._buf[_HEADER.size:end])
                    del self._buf[:end]
                    return payload
            try:
                chunk = self._sock.recv(65536)
            except BlockingIOError:
                self._wait(select.POLLIN, deadline)
                continue
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            self._buf += chunk

    def _wait(self, events: int, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise JobTimeout()
        self._poll.modify(self._sock.fileno(), events)
        for fd, _ in self._poll.poll(remaining * 1000.0):
            output = self._outputs.get(fd)
            if output is not None and not output.drain():  # no writer left: stop watching it
                self._poll.unregister(fd)
                del self._outputs[fd]


def to_plain(value: object) -> object:
    """Job side: the value as exact builtin plain data, converting builtin subclasses and numeric ABCs.

    Raises ``TypeError`` when the value (or something inside it) has no plain form; the job then hands the
    judge an opaque reference instead.
    """
    budget = [MAX_PLAIN_NODES]
    return _to_plain(value, budget, 0)


def _to_plain(value: object, budget: list[int], depth: int) -> object:
    budget[0] -= 1
    if budget[0] < 0 or depth > _MAX_DEPTH:
        raise TypeError("value too large or too deeply nested")
    if type(value) in _SCALARS:
        return value
    if isinstance(value, dict):
        return {_to_plain(k, budget, depth + 1): _to_plain(v, budget, depth + 1) for k, v in value.items()}
    for base in _CONTAINERS:
        if isinstance(value, base):
            items = [_to_plain(v, budget, depth + 1) for v in value]
            return items if base is list else base(items)
    for base in _SCALARS:
        if isinstance(value, base):
            return base(value)
    if isinstance(value, numbers.Integral):
        return int(value)  # numpy and other integer scalars
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"{type(value).__name__} is not plain data")


def dump_plain(value: object) -> bytes:
    """Job side: marshal a (converted) plain value."""
    return marshal.dumps(value)


def load_plain(data: bytes) -> object:
    """Judge side: decode a job's payload, accepting only exact plain types. Raises ``ProtocolError``."""
    try:
        value = marshal.loads(data)
    except (EOFError, ValueError, TypeError) as exc:
        raise ProtocolError(f"undecodable payload: {exc}") from None
    _check_plain(value)
    return value


def _check_plain(value: object) -> None:
    stack: list[tuple[object, int]] = [(value, 0)]
    nodes = 0
    while stack:
        item, depth = stack.pop()
        nodes += 1
        kind = type(item)
        if kind not in PLAIN_TYPES or nodes > MAX_PLAIN_NODES or depth > _MAX_DEPTH:
            raise ProtocolError(f"payload holds {kind.__name__!s} or is too large/deep")
        if kind is dict:
            stack.extend((k, depth + 1) for k in item)  # type: ignore[union-attr]
            stack.extend((v, depth + 1) for v in item.values())  # type: ignore[union-attr]
        elif kind in (list, tuple, set, frozenset):
            stack.extend((v, depth + 1) for v in item)  # type: ignore[union-attr]


def describe_exception(exc: BaseException) -> tuple[str, str, bool]:
    """An exception as plain data: its type's name, its message (a syntax error's with the line) and whether
    the type is the builtin of that name."""
    kind = type(exc)
    try:
        message = str(exc)
    except Exception:  # noqa: BLE001 - a program's exception may fail to render
        message = ""
    if isinstance(exc, SyntaxError) and exc.lineno is not None:
        message = f"{exc.msg} (line {exc.lineno})"
    return kind.__name__[:100], message[:MAX_MESSAGE_CHARS], getattr(builtins, kind.__name__, None) is kind

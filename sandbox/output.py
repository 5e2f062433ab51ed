"""A job's stdout and stderr: pipes that the judge drains while it waits on the job, keeping only their tail.

The job's descriptors 1 and 2 are the write ends of two pipes; the judge holds the read ends, reads them
whenever it waits on the job (:class:`sandbox.wire.DeadlineChannel`) and once more when every process of the
job is gone. A write never fails for the volume written before it (a full pipe only waits for the judge's
next read), so how much a program prints, through ``print`` or ``os.write(1, …)``, never changes its verdict.

Invariants: only the last ``keep_bytes`` bytes of each stream are held, so a flood costs the judge reading
time, never memory; the judge's ends are non-blocking (the zygote creates the pipes so, and the job makes its
own ends blocking), so a drain never waits, even on a writer that outlived the job.
"""

from __future__ import annotations

import os

_READ_BYTES = 65536  # a pipe's default capacity: one read usually empties it


class OutputTail:
    """The judge's end of one output pipe, and the tail read from it so far."""

    def __init__(self, fd: int, keep_bytes: int) -> None:
        self.fd = fd
        self._keep = keep_bytes
        self._tail = b""

    def drain(self) -> bool:
        """Read what the pipe holds (one read, made when it is readable); False once no writer is left."""
        return self._read() != b""

    def drain_to_end(self) -> None:
        """Read everything left, once every process of the job is gone (stops early if a writer survived)."""
        while self._read():
            pass

    def _read(self) -> bytes | None:
        """One read: the bytes (kept in the tail), ``b""`` at the end of the stream, None if the pipe is empty."""
        try:
            chunk = os.read(self.fd, _READ_BYTES)
        except BlockingIOError:
            return None
        if chunk and self._keep:
            self._tail = (self._tail + chunk)[-self._keep:]
        return chunk

    def text(self, chars: int) -> str:
        """The last ``chars`` characters read (undecodable bytes replaced)."""
        return self._tail.decode("utf-8", "replace")[-chars:] if chars > 0 else ""

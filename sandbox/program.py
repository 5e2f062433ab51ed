"""A program's code, compiled in the judge and sent to the job process marshalled.

Compiling in a freshly forked job process cost ~0.3 ms and ~60 copy-on-write page faults per job; in the
long-lived judge it costs ~0.05 ms, and unmarshalling in the job a few microseconds. CPython's compiler only
parses and translates: none of the program runs in the judge. What the judge does not take on: a program over
:data:`MAX_COMPILED_CHARS` is sent as source and compiled by the job, under the job's limits, so that no
program can make the judge spend unbounded time or memory. A crash of the compiler would end the worker,
whose job is retried once and then reported as ``sandbox_error``, never as a verdict.
"""

from __future__ import annotations

import marshal
import warnings

from sandbox import wire
from sandbox.remote import candidate_exception

MAX_COMPILED_CHARS = 200_000


def program_payload(source: str) -> bytes | str:
    """The marshalled code of ``source``, or the source itself if it is too large to compile here.

    Raises the program's ``SyntaxError`` (or ``ValueError`` for a null byte, ``RecursionError`` for nesting
    too deep) as a :class:`~sandbox.remote.CandidateRaised`, as the job would have reported it.
    """
    if len(source) > MAX_COMPILED_CHARS:
        return source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SyntaxWarnings are the program's, not the judge's to print
            code = compile(source, wire.PROGRAM_FILENAME, "exec", dont_inherit=True)
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError) as exc:
        type_name, message, _ = wire.describe_exception(exc)
        raise candidate_exception(type_name, message, builtin=True) from None
    return marshal.dumps(code)

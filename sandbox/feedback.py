"""PERsD feedback text for a failing test, always length-capped.

A failed assertion about a call renders as ``Input: <args> Output: <value> Expected: <value>`` (the form of
the PERsD ``check_assert`` helper: one positional argument is shown bare, several as a tuple); anything else
renders as ``ErrorType: message``.
"""

from __future__ import annotations

import reprlib
from typing import Any

MAX_PART_CHARS = 300
MAX_FEEDBACK_CHARS = 1000

_repr = reprlib.Repr()
_repr.maxlevel = 4
_repr.maxlist = _repr.maxtuple = _repr.maxset = _repr.maxfrozenset = _repr.maxdict = 30
_repr.maxstring = _repr.maxother = 200
_repr.maxlong = 100


def cap(text: str, limit: int = MAX_FEEDBACK_CHARS) -> str:
    """``text`` cut to ``limit`` characters, keeping its start and end."""
    if len(text) <= limit:
        return text
    head = (limit - 5) * 2 // 3
    return f"{text[:head]} ... {text[len(text) - (limit - 5 - head):]}"


def show(value: Any) -> str:
    """``str(value)`` as ``check_assert`` would print it, bounded in time and length."""
    try:
        text = value if type(value) is str else _repr.repr(value)
    except Exception:  # noqa: BLE001 - e.g. ints beyond the str() digit limit
        text = f"<{type(value).__name__}>"
    return cap(text, MAX_PART_CHARS)


def render_io(args: tuple[Any, ...], kwargs: dict[str, Any], output: Any, expected: str) -> str:
    """``Input: … Output: … Expected: …`` for the last call of a failed test."""
    shown = [show(a) for a in args] + [f"{k}={show(v)}" for k, v in kwargs.items()]
    if len(shown) == 1 and not kwargs:
        arguments = shown[0]
    else:
        arguments = f"({', '.join(shown)}{',' if len(shown) == 1 else ''})"
    arguments, expected = cap(arguments, MAX_PART_CHARS), cap(expected, MAX_PART_CHARS)
    return cap(f"Input: {arguments} Output: {show(output)} Expected: {expected}")


def render_error(type_name: str, message: str) -> str:
    """``ErrorType: message`` (just the type when there is no message)."""
    return cap(f"{type_name}: {message}" if message else type_name)

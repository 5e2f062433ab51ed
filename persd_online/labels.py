"""Distinct training labels: which (task, target program) pairs the trainer has been sent.

A label is an example's task and completion; two examples with the same both teach the same thing (the
reference oracle returns the same program for every failure of a task; replay re-sends an example). The
experiment matches arms on distinct labels, and the curriculum uses "was this fix new?" to stop re-picking
tasks whose label it already has.

Invariants: a key depends only on (task_id, completion); `add` counts each key once however often it is
sent; the set round-trips through JSON (`keys()` / `Labels(keys)`), so a resumed run counts on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from persd_online.records import Example


def label_key(example: Example) -> str:
    """A short stable key of the example's (task, completion)."""
    return hashlib.sha256(f"{example.task_id}\0{example.completion}".encode()).hexdigest()[:20]


class Labels:
    """The distinct labels sent to the trainer so far."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._keys = set(keys)

    def add(self, examples: Iterable[Example]) -> int:
        """Record `examples`; returns how many of them were new labels."""
        new = {label_key(e) for e in examples} - self._keys
        self._keys |= new
        return len(new)

    def __len__(self) -> int:
        return len(self._keys)

    def keys(self) -> list[str]:
        return sorted(self._keys)

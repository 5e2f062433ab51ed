"""Bounded staleness: how far behind the trainer an attempt may be and still become training data.

The rule. Let `v` be the trainer's newest published adapter version and `u` the version that generated an
attempt. An example derived from that attempt may be trained only while `v - u <= max_staleness`; older
ones are dropped at the trainer and counted (`is_stale`).

Admission keeps drops rare instead of merely counting them: the driver starts new generation only while
(1) the student serves a version `u >= v - max_staleness` (else everything it makes is stale on arrival),
and (2) the attempts in flight (admitted, not yet handed to the trainer) plus the trainer's backlog (examples
handed over but not yet trained: its queue and its fresh buffer) fit in what the trainer consumes before it
publishes past `u + max_staleness`: `(max_staleness + 1 - (v - u)) * examples_per_version`. The trainer
trains in arrival order, so the backlog moves it on before any new attempt's example is reached; without the
backlog and lag terms, a burst waiting at a slow trainer went stale while generation kept adding to it.
(3) Progress: when nothing is in flight and the trainer is starved (it waits for examples to fill a step),
one task's attempts are admitted whatever the room (`forced`): only they can move it. Those the step needs
are fresh; the rest of the task's examples (at most `unit - 1`) can land after the step publishes and go
stale. That is the whole price: with examples arriving in admission order, no other example goes stale
(the property test in tests/test_ledger.py checks both). Without this rule, a step bigger than the room
left (a cold replay buffer wants a whole batch of fresh examples) waited for examples the gate would never
admit.
"""

from __future__ import annotations

from dataclasses import dataclass


def is_stale(attempt_version: int | None, trainer_version: int, max_staleness: int) -> bool:
    """True if an example from an attempt of `attempt_version` is too old to train (None: offline data)."""
    return attempt_version is not None and trainer_version - attempt_version > max_staleness


@dataclass
class StalenessGate:
    """Admission control for new attempts (see the module docstring)."""

    max_staleness: int
    examples_per_version: int
    in_flight: int = 0
    forced: int = 0  # grants made past the room by the progress rule (3)

    @property
    def capacity(self) -> int:
        """Attempts that may be in flight when the student serves the trainer's newest version."""
        return (self.max_staleness + 1) * self.examples_per_version

    def admit(self, wanted: int, student_version: int, trainer_version: int, backlog: int = 0,
              unit: int = 1, starved: bool = False) -> int:
        """How many of `wanted` new attempts may start now (a multiple of `unit`: the samples of one task), with
        `backlog` examples waiting at the trainer (`starved`: it waits for more to fill a step); the caller
        must `finish` each admitted attempt once its examples are handed to the trainer (or it was not made
        after all)."""
        room = self._room(student_version, trainer_version, backlog)
        if room is None:
            return 0
        forced = self._forced(room, unit, starved) and unit <= wanted
        if forced:
            room = unit
            self.forced += 1
        granted = max(0, min(wanted, room)) // unit * unit
        self.in_flight += granted
        return granted

    def can_admit(self, student_version: int, trainer_version: int, backlog: int = 0, unit: int = 1,
                  starved: bool = False) -> bool:
        """Whether `admit` would grant `unit` attempts now (it changes nothing)."""
        room = self._room(student_version, trainer_version, backlog)
        return room is not None and (room >= unit or self._forced(room, unit, starved))

    def _room(self, student_version: int, trainer_version: int, backlog: int) -> int | None:
        """Attempts that fit now (rule 2); None when the student lags too far (rule 1)."""
        lag = trainer_version - student_version
        if lag > self.max_staleness:
            return None
        return self.capacity - lag * self.examples_per_version - self.in_flight - backlog

    def _forced(self, room: int, unit: int, starved: bool) -> bool:
        """The progress rule (3)."""
        return starved and self.in_flight == 0 and room < unit

    def finish(self, count: int = 1) -> None:
        """`count` admitted attempts left the pipeline (trained, dropped, or passed without a label)."""
        if count > self.in_flight:
            raise ValueError(f"finishing {count} attempts but only {self.in_flight} are in flight")
        self.in_flight -= count

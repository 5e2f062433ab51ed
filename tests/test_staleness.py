"""The staleness rule and the admission gate."""

import pytest

from persd_online.staleness import StalenessGate, is_stale


def test_is_stale_rule():
    assert not is_stale(3, trainer_version=4, max_staleness=1)
    assert is_stale(2, trainer_version=4, max_staleness=1)
    assert not is_stale(4, trainer_version=4, max_staleness=0)
    assert is_stale(3, trainer_version=4, max_staleness=0)
    assert not is_stale(None, trainer_version=99, max_staleness=0)  # offline data never goes stale


def test_gate_bounds_in_flight_attempts():
    gate = StalenessGate(max_staleness=1, examples_per_version=8)
    assert gate.capacity == 16
    assert gate.admit(10, student_version=0, trainer_version=0) == 10
    assert gate.admit(10, student_version=0, trainer_version=0) == 6
    assert gate.admit(1, student_version=0, trainer_version=0) == 0
    gate.finish(4)
    assert gate.admit(10, student_version=1, trainer_version=1) == 4


def test_gate_counts_the_trainers_backlog():
    gate = StalenessGate(max_staleness=1, examples_per_version=8)
    assert gate.admit(10, student_version=0, trainer_version=0, backlog=12) == 4
    assert gate.admit(10, student_version=0, trainer_version=0, backlog=12) == 0
    gate.finish(4)  # handed over: now part of the backlog, which the trainer works off
    assert gate.admit(10, student_version=0, trainer_version=0, backlog=16) == 0
    assert gate.admit(10, student_version=0, trainer_version=0, backlog=6) == 10


def test_a_lagging_student_gets_only_what_trains_before_its_version_expires():
    gate = StalenessGate(max_staleness=2, examples_per_version=8)
    assert gate.admit(30, student_version=4, trainer_version=5) == 16  # v5 and v6 still accept v4's examples
    gate.finish(16)
    assert gate.admit(30, student_version=4, trainer_version=6, backlog=4) == 4


def test_gate_grants_whole_tasks_and_counts_only_what_it_grants():
    gate = StalenessGate(max_staleness=1, examples_per_version=2)
    for _ in range(5):  # room for 1 attempt, tasks of 2 samples: nothing granted, nothing leaks
        assert gate.admit(12, student_version=1, trainer_version=1, backlog=3, unit=2) == 0
    assert gate.in_flight == 0
    assert gate.admit(12, student_version=1, trainer_version=1, backlog=1, unit=2) == 2
    assert gate.in_flight == 2


def test_gate_refuses_a_student_too_far_behind():
    gate = StalenessGate(max_staleness=1, examples_per_version=8)
    assert gate.admit(4, student_version=1, trainer_version=3) == 0
    assert gate.admit(4, student_version=2, trainer_version=3) == 4
    with pytest.raises(ValueError, match="only 4 are in flight"):
        gate.finish(5)


def test_a_starved_trainer_gets_one_task_whatever_the_room():
    # publish every step, 2 fresh per version: room 4; a cold replay buffer wants 4 fresh for its first step,
    # and 3 examples wait there (one attempt of two tasks passed): room 1, less than a task of 2 samples.
    gate = StalenessGate(max_staleness=1, examples_per_version=2)
    assert gate.admit(12, student_version=0, trainer_version=0, backlog=3, unit=2) == 0
    assert gate.admit(12, student_version=0, trainer_version=0, backlog=3, unit=2, starved=True) == 2
    assert gate.admit(12, student_version=0, trainer_version=0, backlog=3, unit=2, starved=True) == 0  # one
    gate.finish(2)
    assert gate.admit(12, student_version=0, trainer_version=2, backlog=3, unit=2, starved=True) == 0  # lag

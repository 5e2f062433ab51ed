"""Curriculum policies: fixable failures first, retirement and re-checks, parking, checkpointing."""

import json

from persd_online.config import CurriculumConfig
from persd_online.curriculum import Curriculum


def _curriculum(n=6, **overrides):
    return Curriculum.new([f"t{i}" for i in range(n)], CurriculumConfig(**overrides))


def test_fixable_failures_rank_above_unseen_and_unfixable():
    cur = _curriculum(recheck_prob=0.0)
    for _ in range(3):
        cur.record_attempt("t1", version=0, passed=False)
        cur.record_attempt("t2", version=0, passed=False)
    cur.record_teacher("t1", verified=True)   # the teacher can fix t1
    cur.record_teacher("t2", verified=False)  # not t2
    picks = cur.next(3, version=0)
    assert picks[0].task_id == "t1" and "teacher fixes 0.67" in picks[0].reason
    assert "t2" not in [p.task_id for p in picks]  # below the unseen tasks
    assert all(p.reason == "unseen" for p in picks[1:])


def test_in_flight_tasks_are_not_picked_twice():
    cur = _curriculum(n=4)
    first = {p.task_id for p in cur.next(3, version=0)}
    second = {p.task_id for p in cur.next(3, version=0)}
    assert len(first) == 3 and len(second) == 1 and not first & second
    cur.release(next(iter(first)))
    assert len(cur.next(3, version=0)) == 1


def test_retire_after_consecutive_passes_and_reactivate_on_failure():
    cur = _curriculum(n=2, retire_after_passes=2, recheck_prob=0.0)
    cur.record_attempt("t0", 0, True)
    assert cur.stats["t0"].state == "active"
    cur.record_attempt("t0", 0, True)
    assert cur.stats["t0"].state == "retired"
    assert [p.task_id for p in cur.next(2, version=0)] == ["t1"]  # retired only when nothing else is free
    cur.release("t1")
    cur.record_attempt("t0", 1, False)  # forgot it
    assert cur.stats["t0"].state == "active"


def test_retired_tasks_are_rechecked_sometimes():
    cur = _curriculum(n=40, recheck_prob=0.5, seed=3)
    for i in range(20):
        for _ in range(2):
            cur.record_attempt(f"t{i}", 0, True)
    picks = cur.next(20, version=0)
    rechecks = [p for p in picks if p.reason.startswith("re-check")]
    assert 3 <= len(rechecks) <= 17
    assert all(cur.stats[p.task_id].state == "retired" for p in rechecks)


def test_park_tasks_the_teacher_cannot_fix():
    cur = _curriculum(n=2, park_after_teacher_failures=2)
    cur.record_teacher("t0", verified=False)
    assert cur.stats["t0"].state == "active"
    cur.record_teacher("t0", verified=False)
    assert cur.stats["t0"].state == "parked"
    assert [p.task_id for p in cur.next(2, version=0)] == ["t1"]
    assert cur.counts() == {"active": 1, "retired": 0, "parked": 1}


def test_older_version_attempts_get_a_bonus():
    cur = _curriculum(n=2, recheck_prob=0.0)
    cur.record_attempt("t0", 0, False)
    cur.record_attempt("t1", 2, False)
    picks = cur.next(1, version=2)
    assert picks[0].task_id == "t0" and "last tried on v0" in picks[0].reason


def test_uniform_policy_covers_all_active_tasks():
    cur = _curriculum(n=5, policy="uniform")
    picks = cur.next(10, version=0)
    assert sorted(p.task_id for p in picks) == [f"t{i}" for i in range(5)]
    assert {p.reason for p in picks} == {"uniform"}


def test_state_roundtrip_continues_identically():
    cur = _curriculum(n=10, seed=7)
    cur.record_attempt("t3", 0, False)
    cur.record_teacher("t3", True)
    state = json.loads(json.dumps(cur.state()))  # must survive JSON (checkpoints are JSON)
    again = Curriculum.from_state(state, cur.config)
    assert [p.task_id for p in again.next(5, 1)] == [p.task_id for p in cur.next(5, 1)]
    assert again.stats == cur.stats


def _refixed(cur, task, fixes, new_labels):
    """`task` failed and fixed `fixes` times; the first `new_labels` fixes gave labels the trainer lacked."""
    for i in range(fixes):
        cur.record_attempt(task, version=i, passed=False)
        cur.record_teacher(task, verified=True, new_label=i < new_labels)


def test_a_teacher_that_repeats_its_label_sends_the_curriculum_to_unlabelled_tasks():
    # The reference oracle: every re-fix of a task is the label the trainer already has, so re-picking a
    # fixed task yields nothing new and a never-labelled task is worth more.
    cur = _curriculum(n=6, recheck_prob=0.0)
    for task in ("t0", "t1"):
        _refixed(cur, task, fixes=4, new_labels=1)
    picks = cur.next(4, version=4)
    assert [p.reason for p in picks] == ["unseen"] * 4
    assert cur.stats["t0"].value(cur._pool_rates())[2] < 0.25


def test_a_teacher_that_refines_each_attempt_keeps_fixed_failures_first():
    # A teacher that refines the student's own attempt gives a new label on every fix: the re-fix rate is
    # ~1 and the old ranking (fixable failures first) holds.
    cur = _curriculum(n=6, recheck_prob=0.0)
    for task in ("t0", "t1"):
        _refixed(cur, task, fixes=4, new_labels=4)
    picks = cur.next(3, version=4)
    assert {p.task_id for p in picks[:2]} == {"t0", "t1"} and "new label 1.00" in picks[0].reason
    assert picks[2].reason == "unseen"


def test_the_first_fix_is_always_a_new_label():
    cur = _curriculum(n=2)
    cur.record_teacher("t0", verified=True, new_label=False)  # e.g. resumed without the label set
    assert cur.stats["t0"].teacher_repeats == 0


def test_the_chance_of_a_fix_and_its_cost_are_per_tier_down_the_cascade():
    from persd_online.curriculum import TierOutcome

    cur = _curriculum(n=3, recheck_prob=0.0)
    for task in ("t0", "t1", "t2"):
        cur.record_attempt(task, 0, passed=False)
    for _ in range(3):  # t0: self-repair fixes it, free; t1: only the paid tier does, at $0.01 a call
        cur.record_teacher("t0", True, tiers=[TierOutcome("self", True)])
        cur.record_teacher("t1", True, tiers=[TierOutcome("self", False), TierOutcome("reference_repair", False),
                                              TierOutcome("openai:m", True, 0.01)])
    cur.record_teacher("t2", False, tiers=[TierOutcome("self", False), TierOutcome("reference_repair", False),
                                           TierOutcome("openai:m", False, 0.01)])
    assert cur.tier_order == ["self", "reference_repair", "openai:m"]
    pool = cur._pool_rates()
    (p0, c0), (p1, c1), (p2, c2) = (cur.stats[t].fix_and_cost(pool) for t in ("t0", "t1", "t2"))
    assert p0 > 0.9 and c0 < 0.002  # fixed at the first, free tier: rarely reaches the paid one
    assert p1 > 0.8 and c1 > 0.008  # as likely fixed, but every fix pays the strong tier
    assert p2 < p1 and c2 > c1  # failed everywhere: less likely, dearer per fix
    picks = cur.next(3, version=0)
    assert [p.task_id for p in picks] == ["t0", "t1", "t2"]  # learning value per teacher dollar
    restored = type(cur).from_state(json.loads(json.dumps(cur.state())), cur.config)
    assert restored.tier_order == cur.tier_order and restored.stats["t1"].tiers == cur.stats["t1"].tiers

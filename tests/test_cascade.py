"""The teacher cascade with scripted tiers: order, first verified wins, per-tier budgets and floors, state."""

import asyncio

import pytest

from persd_online.budget import BudgetExhausted
from persd_online.cascade import Cascade, Tier, TierPolicy, TierStats, should_try
from persd_online.records import Attempt, Verdict
from persd_online.tasks import Task
from persd_online.teacher import refinement_record

TASK = Task(task_id="t", prompt="add", entry_point="add", tests=["assert add(1, 2) == 3"],
            reference="def add(a, b):\n    return a + b\n")
GOOD, BAD = TASK.reference, "def add(a, b):\n    return a - b\n"


class Scripted:
    """A tier that proposes `program` (None: nothing), or raises; counts its calls."""

    def __init__(self, kind, program=GOOD, error=None):
        self.kind, self.program, self.error, self.calls = kind, program, error, 0

    async def propose(self, task, attempt_id, program, feedback, round_no):
        self.calls += 1
        await asyncio.sleep(0)  # a real teacher suspends here: concurrent refinements interleave
        if self.error:
            raise self.error
        if self.program is None or round_no > 1:
            return None
        return refinement_record(task, attempt_id, round_no, self.kind, f"{self.kind}-{self.calls}", self.program,
                                 cost_usd=0.5 if self.kind == "paid" else 0.0)

    def describe(self):
        return {"kind": self.kind, "calls": self.calls}

    def state(self):
        return {}


class Tests:
    async def run(self, task, program, subject_id):
        ok = program == GOOD
        return Verdict(subject_id=subject_id, status="passed" if ok else "failed", passed=ok,
                       feedback="" if ok else "wrong", duration_s=0.0)


def failure(i=0):
    attempt = Attempt(attempt_id=f"a{i}", task_id="t", sample_index=0, adapter_version=0, prompt_format="chat",
                      completion=BAD, program=BAD, prompt_tokens=1, completion_tokens=1)
    return attempt, Verdict(subject_id=attempt.attempt_id, status="failed", passed=False, feedback="wrong",
                            duration_s=0.0)


def refine(cascade, i=0):
    return asyncio.run(cascade.refine(TASK, *failure(i)))


def test_tiers_are_tried_in_order_and_the_first_verified_one_wins():
    self_tier, wrong, paid, last = Scripted("self", None), Scripted("cheap", BAD), Scripted("paid"), Scripted("x")
    cascade = Cascade([Tier("self", self_tier), Tier("cheap", wrong), Tier("paid", paid), Tier("x", last)], Tests())
    outcome = refine(cascade)
    assert [r.refinement.teacher_kind for r in outcome.rounds] == ["cheap", "paid"]
    assert outcome.verified.teacher_kind == "paid" and last.calls == 0
    figures = cascade.describe()
    assert figures["order"] == ["self", "cheap", "paid", "x"] and figures["cost_usd"] == 0.5
    tiers = figures["tiers"]
    assert (tiers["self"]["tried"], tiers["self"]["verified"], tiers["self"]["calls"]) == (1, 0, 0)
    assert (tiers["cheap"]["calls"], tiers["cheap"]["verified"]) == (1, 0)
    assert (tiers["paid"]["verified"], tiers["paid"]["cost_usd"]) == (1, 0.5)
    assert tiers["x"]["offered"] == 0


def test_a_spent_tier_stops_only_itself():
    spent, paid = Scripted("cheap", error=BudgetExhausted("cheap tier spent")), Scripted("paid")
    cascade = Cascade([Tier("cheap", spent), Tier("paid", paid)], Tests())
    assert refine(cascade, 0).verified.teacher_kind == "paid"
    assert refine(cascade, 1).verified.teacher_kind == "paid"
    assert spent.calls == 1  # marked spent on its first refusal, never asked again
    assert cascade.describe()["tiers"]["cheap"]["spent"] is True


def test_the_cascade_is_spent_only_when_every_tier_is():
    cascade = Cascade([Tier("a", Scripted("a", error=BudgetExhausted("a"))),
                       Tier("b", Scripted("b", error=BudgetExhausted("b")))], Tests())
    with pytest.raises(BudgetExhausted, match="every teacher tier"):
        refine(cascade)


def test_a_tier_below_its_floor_is_skipped_but_probed():
    policy = TierPolicy(min_verified_rate=0.5, warmup=3, probe_every=4)
    stats = TierStats(offered=3, tried=3, verified=0)
    assert [should_try(TierStats(offered=n, tried=3, verified=0), policy) for n in range(4, 9)] == [
        True, False, False, False, True]
    assert should_try(TierStats(offered=3, tried=2, verified=0), policy)  # still warming up
    assert should_try(TierStats(offered=9, tried=9, verified=5), policy)  # above the floor
    assert not should_try(TierStats(spent=True), policy)
    assert stats.verified_rate == 0.0 and TierStats().verified_rate == 1.0

    never = Scripted("self", None)
    cascade = Cascade([Tier("self", never, TierPolicy(0.5, warmup=2, probe_every=5)), Tier("paid", Scripted("paid"))],
                      Tests())
    for i in range(12):
        assert refine(cascade, i).verified.teacher_kind == "paid"
    s = cascade.describe()["tiers"]["self"]
    assert (s["offered"], s["tried"], s["skipped"]) == (12, 4, 8) and never.calls == 4  # warm-up 2, probes 5 and 10


def test_tier_names_must_be_distinct():
    with pytest.raises(ValueError, match="twice"):
        Cascade([Tier("a", Scripted("a")), Tier("a", Scripted("a"))], Tests())


def test_a_rebuilt_cascade_continues_from_its_state():
    from persd_online.cascade import build_cascade
    from persd_online.config import OracleTier, SelfRepairTier, TeacherConfig

    config = TeacherConfig(tiers=[OracleTier()])
    first = build_cascade(config, None, Tests())
    refine(first, 0)
    again = build_cascade(config, None, Tests(), state=first.state())
    assert again.describe() == first.describe() and again.describe()["tiers"]["reference_oracle"]["verified"] == 1
    with pytest.raises(Exception, match="needs the student"):
        build_cascade(TeacherConfig(tiers=[SelfRepairTier()]), None, Tests())


def test_the_warmup_holds_when_many_failures_arrive_at_once():
    never = Scripted("self", None)
    cascade = Cascade([Tier("self", never, TierPolicy(0.5, warmup=3, probe_every=100)), Tier("paid", Scripted("paid"))],
                      Tests())

    async def all_at_once():
        return await asyncio.gather(*(cascade.refine(TASK, *failure(i)) for i in range(20)))

    outcomes = asyncio.run(all_at_once())
    assert all(o.verified.teacher_kind == "paid" for o in outcomes)
    assert never.calls == 3  # not 20: tries under way count against the warm-up

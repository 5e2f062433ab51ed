"""The loop's ledger, driven through event sequences without Ray: the four rules end-to-end runs found, the
budget, checkpoints, and a property test over random event orders."""

import json
from collections import deque

from hypothesis import given, settings
from hypothesis import strategies as st

from persd_online.config import BudgetConfig, CurriculumConfig
from persd_online.curriculum import Curriculum
from persd_online.ledger import Ledger, LedgerSettings
from persd_online.records import Attempt, Example, Refinement, Verdict
from persd_online.staleness import is_stale
from persd_online.tasks import Task
from persd_online.verify import RefinementOutcome, VerifiedRound


def _ledger(n_tasks=20, samples=2, per_batch=4, staleness=1, per_version=4, **budget) -> Ledger:
    s = LedgerSettings(samples, per_batch, staleness, per_version, BudgetConfig(max_wall_s=None, **budget))
    return Ledger(s, Curriculum.new([f"t{i}" for i in range(n_tasks)], CurriculumConfig(recheck_prob=0.0)))


def _attempts(ledger: Ledger, picks, passed=False):
    attempts = [Attempt(attempt_id=f"{p.task_id}/{i}/{ledger.counts['attempts'] + i}", task_id=p.task_id,
                        sample_index=i, adapter_version=ledger.student_version, prompt_format="chat",
                        completion="x", program="x", prompt_tokens=1, completion_tokens=1)
                for p in picks for i in range(ledger.settings.samples_per_task)]
    verdicts = [Verdict(subject_id=a.attempt_id, status="passed" if passed else "failed", passed=passed,
                        feedback="", duration_s=0.0) for a in attempts]
    return attempts, verdicts


def _refine(ledger: Ledger, attempt: Attempt, verified=True, label="fix", cached=False):
    ref = Refinement(refinement_id=f"r-{attempt.attempt_id}", attempt_id=attempt.attempt_id, task_id=attempt.task_id,
                     round=1, teacher_kind="stub", teacher_call_id="c", program=label, prompt_tokens=3,
                     completion_tokens=2, cached=cached)
    verdict = Verdict(subject_id=ref.refinement_id, status="passed" if verified else "failed", passed=verified,
                      feedback="", duration_s=0.0)
    outcome = RefinementOutcome(attempt_id=attempt.attempt_id, task_id=attempt.task_id,
                                rounds=[VerifiedRound(refinement=ref, verdict=verdict)])
    examples = [Example(example_id=f"e-{attempt.attempt_id}", method="persd", task_id=attempt.task_id, prompt="p",
                        completion=label, adapter_version=attempt.adapter_version)] if verified else []
    task = Task(task_id=attempt.task_id, prompt="p", entry_point="f", tests=["assert f()"],
                reference="def f():\n    return 1\n")
    return ledger.refined(task, attempt, outcome, examples)


def _stats(trained=0, steps=0, **more):
    """The trainer's report (`TrainerActor.stats`)."""
    return {"examples_trained": trained, "train_steps": steps, "stale_dropped": 0, "stale_replayed": 0,
            "duplicates_dropped": 0} | more


def _cycle(ledger: Ledger, verified=True):
    """Admit, fail every attempt, refine every failure; returns the examples handed to the trainer."""
    attempts, verdicts = _attempts(ledger, ledger.admit())
    return [e for a, _ in ledger.scored(attempts, verdicts) for e in _refine(ledger, a, verified, a.task_id)]


# --- the four rules end-to-end runs found -------------------------------------------------------------------
def test_examples_handed_over_count_in_the_backlog_before_the_trainer_reports():
    # The backlog leak: examples handed to the trainer were in neither term of the gate until its next report,
    # so a whole new batch was admitted behind them and went stale.
    ledger = _ledger(staleness=1, per_version=4)  # room: (1 + 1) * 4 = 8 attempts
    assert len(_cycle(ledger)) == 8 and ledger.in_flight == 0 and ledger.backlog == 8
    assert ledger.admit() == []
    ledger.trainer_reported(_stats(trained=8, steps=2), queued=0)
    assert len(ledger.admit()) == 4  # trained: the room is back


def test_every_admitted_attempt_is_released_once_whatever_its_outcome():
    ledger = _ledger(samples=2, staleness=3, per_version=4)
    attempts, verdicts = _attempts(ledger, ledger.admit())
    verdicts = [v.model_copy(update={"passed": i % 2 == 0}) for i, v in enumerate(verdicts)]
    failures = ledger.scored(attempts, verdicts)
    assert ledger.in_flight == len(failures) == 4
    _refine(ledger, failures[0][0], verified=True)
    _refine(ledger, failures[1][0], verified=False)
    ledger.dropped(failures[2][0].task_id)
    assert ledger.in_flight == 1 and ledger.curriculum.in_flight == {failures[3][0].task_id}
    _refine(ledger, failures[3][0], verified=False)
    assert ledger.idle()


def test_grants_are_whole_tasks():
    ledger = _ledger(samples=3, per_batch=4, staleness=0, per_version=4)  # room 4: one task of 3, not 4 attempts
    assert len(ledger.admit()) == 1 and ledger.in_flight == 3
    assert ledger.admit() == []  # room 1 < a task


def test_a_lagging_student_is_admitted_less_and_past_max_staleness_nothing():
    ledger = _ledger(staleness=1, per_version=4)
    ledger.published(2)
    assert ledger.admit() == []  # v2 - v0 > 1: everything it made would be stale on arrival
    ledger.served(1)
    assert len(ledger.admit()) == 2  # room (1 + 1 - 1) * 4 = 4 attempts = 2 tasks


def test_a_starved_trainer_with_a_cold_replay_buffer_still_gets_a_task():
    # The trainer's first step wants more fresh examples than the room the gate leaves: without the progress
    # rule it waited for examples the gate would never admit.
    ledger = _ledger(samples=4, staleness=0, per_version=2)  # room 2 < one task's 4 attempts
    assert ledger.admit() == []
    ledger.trainer_reported(_stats(ready=False), queued=0)
    assert len(ledger.admit()) == 1 and ledger.in_flight == 4
    assert ledger.admit() == []  # one task at a time: the rule needs nothing in flight


# --- labels, budget, checkpoint --------------------------------------------------------------------------
def test_repeated_labels_count_once_and_turn_the_curriculum_away():
    ledger = _ledger(n_tasks=4, samples=2, per_batch=1, staleness=5, per_version=100)
    attempts, verdicts = _attempts(ledger, ledger.admit())
    for attempt, _ in ledger.scored(attempts, verdicts):
        _refine(ledger, attempt, label="the reference")  # an oracle: the same label for both samples
    assert ledger.counts["examples_distinct"] == 1 and ledger.counts["refinements_verified"] == 2
    assert ledger.counts["teacher_calls"] == 2 and ledger.counts["teacher_tokens"] == 10
    assert ledger.curriculum.stats[attempts[0].task_id].teacher_repeats == 1


def test_each_verified_label_records_its_distance_and_the_references():
    ledger = _ledger(n_tasks=2, samples=1, per_batch=2, staleness=5, per_version=100)
    attempts, verdicts = _attempts(ledger, ledger.admit())
    attempts = [a.model_copy(update={"program": "def f():\n    return 2\n"}) for a in attempts]
    close, far = ledger.scored(attempts, verdicts)
    _refine(ledger, close[0], label="def f():\n    return 1\n")  # one line of two changed: 0.5, as the reference
    _refine(ledger, far[0], verified=False)
    assert [(d.tier, d.label_ratio, d.reference_ratio) for d in ledger.distances] == [("stub", 0.5, 0.5)]
    ledger.likelihoods(close[0].attempt_id, -0.25, -0.75)
    assert (ledger.distances[0].label_logprob, ledger.distances[0].reference_logprob) == (-0.25, -0.75)
    again = Ledger.from_state(ledger.settings, ledger.curriculum.config, json.loads(json.dumps(ledger.state())))
    assert again.distances == ledger.distances


def test_stop_reasons():
    ledger = _ledger(max_distinct_examples=3)
    assert ledger.stop_reason(wall_s=0, reserve_s=0) is None
    _cycle(ledger)
    assert ledger.stop_reason(0, 0) == "budget.max_distinct_examples=3 reached"
    timed = Ledger(ledger.settings.__class__(2, 4, 1, 4, BudgetConfig(max_wall_s=100)), ledger.curriculum)
    assert timed.stop_reason(wall_s=70, reserve_s=20) is None
    assert timed.stop_reason(wall_s=80, reserve_s=20).startswith("budget.max_wall_s=100")


def test_every_task_retired_stops_the_run_once_nothing_is_in_flight():
    ledger = _ledger(n_tasks=1, samples=1, per_batch=1, staleness=5, per_version=10)
    for _ in range(2):
        picks = ledger.admit()
        assert ledger.stop_reason(0, 0) is None
        ledger.scored(*_attempts(ledger, picks, passed=True))
    assert ledger.stop_reason(0, 0) == "every task is retired or parked"


def test_a_restored_ledger_decides_as_the_original():
    ledger = _ledger(staleness=2)
    _cycle(ledger)
    again = Ledger.from_state(ledger.settings, ledger.curriculum.config, json.loads(json.dumps(ledger.state())))
    assert again.counts == ledger.counts and len(again.labels) == len(ledger.labels)
    assert again.trained_tasks == ledger.trained_tasks
    for one in (ledger, again):  # in-flight work and the backlog are not kept: the trainer's report restores it
        one.trainer_reported(_stats(), queued=8)
    assert [p.task_id for p in again.admit()] == [p.task_id for p in ledger.admit()]


def test_releasing_what_is_not_in_flight_raises():
    ledger = _ledger()
    try:
        ledger.dropped("t0")
    except ValueError as exc:
        assert "t0" in str(exc)
    else:
        raise AssertionError("dropped a task with nothing awaiting the teacher")


# --- property: random event orders ------------------------------------------------------------------------
class _Sim:
    """The ledger with a pretend student, teacher and trainer around it; the trainer trains in arrival order,
    publishes every `examples_per_version` fresh examples and drops stale ones, as the real one does."""

    def __init__(self, ledger: Ledger, fifo: bool) -> None:
        self.ledger, self.fifo = ledger, fifo
        self.unscored: list[tuple[list[Attempt], list[Verdict]]] = []
        self.failures: list[Attempt] = []
        self.queue: deque[Example] = deque()
        self.fresh = self.trained = self.stale = self.version = 0
        self.staleness_trained: list[int] = []

    def step(self, action: int, choice: int, flag: bool) -> None:
        s = self.ledger
        if action == 0:
            picks = s.admit()
            if picks:
                attempts, verdicts = _attempts(s, picks)
                self.unscored.append((attempts, [v.model_copy(update={"passed": flag and i == 0})
                                                 for i, v in enumerate(verdicts)]))
        elif action == 1 and self.unscored:
            attempts, verdicts = self.unscored.pop(0 if self.fifo else choice % len(self.unscored))
            self.failures += [a for a, _ in s.scored(attempts, verdicts)]
        elif action == 2 and self.failures:
            attempt = self.failures.pop(0 if self.fifo else choice % len(self.failures))
            self.queue.extend(_refine(s, attempt, verified=flag or choice % 3 > 0, label=attempt.attempt_id))
        elif action == 3 and self.queue:
            self.train_one()
        elif action == 4:
            s.served(self.version)
        elif action == 5 and self.failures and not self.fifo:
            s.dropped(self.failures.pop(choice % len(self.failures)).task_id)

    def train_one(self) -> None:
        example = self.queue.popleft()
        if is_stale(example.adapter_version, self.version, self.ledger.settings.max_staleness):
            self.stale += 1
        else:
            self.staleness_trained.append(self.version - example.adapter_version)
            self.trained += 1
            self.fresh += 1
            if self.fresh == self.ledger.settings.examples_per_version:
                self.fresh, self.version = 0, self.version + 1
        self.ledger.trainer_reported(_stats(self.trained, self.version, stale_dropped=self.stale,
                                            fresh_pending=self.fresh, ready=bool(self.queue)), queued=len(self.queue))
        self.ledger.published(self.version)

    def check(self) -> None:
        s = self.ledger
        in_flight = sum(len(a) for a, _ in self.unscored) + len(self.failures)
        assert s.in_flight == in_flight >= 0
        assert all(n > 0 for n in s.refining.values())
        assert all(lag <= s.settings.max_staleness for lag in self.staleness_trained)
        assert s.counts["examples_trained"] == self.trained and s.counts["stale_dropped"] == self.stale
        if self.fifo:  # examples arrive in admission order: only the surplus of a forced grant can go stale
            assert self.stale <= (s.settings.samples_per_task - 1) * s.gate.forced

    def drain_and_admit(self) -> list:
        """Finish everything under way; then the ledger must admit again (no deadlock)."""
        while self.unscored or self.failures or self.queue:
            self.step(1, 0, False)
            self.step(2, 0, True)
            if self.queue:
                self.train_one()
        self.ledger.served(self.version)
        self.ledger.trainer_reported(_stats(self.trained, self.version, stale_dropped=self.stale,
                                            fresh_pending=self.fresh, ready=False), queued=0)  # it waits for examples
        self.check()
        return self.ledger.admit()


_events = st.lists(st.tuples(st.integers(0, 5), st.integers(0, 50), st.booleans()), max_size=120)
_shape = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(0, 2), st.integers(1, 6))


@settings(max_examples=150, deadline=None)
@given(events=_events, shape=_shape, fifo=st.booleans())
def test_random_event_orders_never_deadlock_go_negative_or_train_stale(events, shape, fifo):
    samples, per_batch, staleness, per_version = shape
    sim = _Sim(_ledger(n_tasks=200, samples=samples, per_batch=per_batch, staleness=staleness,
                       per_version=per_version), fifo)
    for action, choice, flag in events:
        sim.step(action, choice, flag)
        sim.check()
    assert sim.drain_and_admit(), "nothing in flight, a free active task, and the ledger admits nothing"


def test_a_refinement_tells_the_curriculum_what_each_tier_did():
    from persd_online.curriculum import TierOutcome
    from persd_online.ledger import tier_outcomes

    def round_(tier: str, passed: bool, cost: float) -> VerifiedRound:
        ref = Refinement(refinement_id=f"r-{tier}", attempt_id="a", task_id="t0", round=1, teacher_kind=tier,
                         teacher_call_id="c", program="p", prompt_tokens=1, completion_tokens=1, cost_usd=cost)
        return VerifiedRound(refinement=ref, verdict=Verdict(subject_id=ref.refinement_id, passed=passed,
                                                             status="passed" if passed else "failed",
                                                             feedback="", duration_s=0.0))

    outcome = RefinementOutcome(attempt_id="a", task_id="t0", rounds=[
        round_("self", False, 0.0), round_("openai:m", False, 0.01), round_("openai:m", True, 0.02)])
    assert tier_outcomes(outcome) == [TierOutcome("self", False, 0.0), TierOutcome("openai:m", True, 0.03)]

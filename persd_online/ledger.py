"""The online loop's ledger: every decision and count of a run, with no Ray, no asyncio and no I/O.

The async shell (`loop.py`) moves records between the actors and tells the ledger each lifecycle step by a
named event method; the ledger answers what to do next:

    admit() → picks ─(student generates, sandbox scores)→ scored() → the failures to refine
    ─(teacher refines, sandbox verifies)→ refined() → the examples to hand to the trainer
    trainer_reported()  published(v)  served(v)  stop_reason()

Rules:
- Admission is the staleness gate (`staleness.py`): attempts start only while the student is at most
  `max_staleness` versions behind the trainer and the attempts in flight plus the trainer's backlog fit in
  what the trainer consumes before their examples would go stale. Grants are whole tasks (all
  `samples_per_task` attempts of a task, or none).
- A task is in flight from its pick until each of its failed attempts is refined or dropped; the curriculum
  never picks it again meanwhile, and learns every attempt's and every refinement's outcome.
- Examples handed to the trainer count in its backlog at once (the trainer's next report replaces the
  estimate): otherwise, until that report, they would be in neither term of the gate and it would admit a
  batch that goes stale.
- The budget (`budget.*`) and the wall-clock reserve (`wall_budget.py`) give the stop reason.

Invariants:
- In-flight counts never go negative: every admitted attempt is released exactly once (passed when scored,
  refined with or without a label, dropped, or never made); releasing an attempt or task that is not in
  flight raises.
- Nothing is counted twice: an attempt when scored, a teacher call when its refinement returns, a label when
  first handed to the trainer (`labels.py`); trainer figures are the trainer's own totals, not increments.
- Admission makes progress: with nothing in flight, the student within `max_staleness` of the trainer and
  the trainer starved (waiting for examples), `admit()` grants at least one task while an active task is
  free.
- `state()`/`from_state()` round-trip through JSON, and a restored ledger decides as the original would.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from persd_online.config import BudgetConfig, Config, CurriculumConfig
from persd_online.curriculum import Curriculum, Pick, TierOutcome
from persd_online.labels import Labels
from persd_online.metrics import COUNTERS
from persd_online.personalisation import LabelDistance, label_distance
from persd_online.records import Attempt, Example, Verdict
from persd_online.staleness import StalenessGate
from persd_online.tasks import Task
from persd_online.verify import RefinementOutcome
from persd_online.wall_budget import must_stop


@dataclass(frozen=True)
class LedgerSettings:
    """The config figures the ledger decides by."""

    samples_per_task: int
    tasks_per_batch: int
    max_staleness: int
    examples_per_version: int
    budget: BudgetConfig

    @classmethod
    def of(cls, config: Config, examples_per_version: int) -> LedgerSettings:
        return cls(config.student.samples_per_task, config.student.tasks_per_batch, config.max_staleness,
                   examples_per_version, config.budget)


@dataclass
class Ledger:
    """The loop's decisions and counts (see the module docstring)."""

    settings: LedgerSettings
    curriculum: Curriculum
    labels: Labels = field(default_factory=Labels)
    counts: dict[str, float] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0.0))
    trained_tasks: set[str] = field(default_factory=set)
    student_version: int = 0
    trainer_version: int = 0
    backlog: int = 0  # examples waiting at the trainer (its queue and fresh buffer), from its last report
    starved: bool = False  # the trainer waits for examples to fill a step and none are on the way
    gate: StalenessGate = field(init=False)
    refining: Counter[str] = field(default_factory=Counter)  # failed attempts of a task awaiting the teacher
    distances: list[LabelDistance] = field(default_factory=list)  # each verified label's, in arrival order

    def __post_init__(self) -> None:
        self.gate = StalenessGate(self.settings.max_staleness, self.settings.examples_per_version)

    # --- lifecycle events ---------------------------------------------------------------------------------
    def admit(self) -> list[Pick]:
        """Tasks to generate now (each `samples_per_task` attempts); each is in flight until released."""
        n = self.settings.samples_per_task
        granted = self.gate.admit(self.settings.tasks_per_batch * n, self.student_version, self.trainer_version,
                                  self.backlog, unit=n, starved=self.starved)
        picks = self.curriculum.next(granted // n, self.student_version) if granted else []
        self._release(granted - len(picks) * n)  # fewer free tasks than granted: never made
        return picks

    def scored(self, attempts: list[Attempt], verdicts: list[Verdict]) -> list[tuple[Attempt, Verdict]]:
        """The admitted attempts came back scored; returns the failures, each to be refined or dropped."""
        failures = []
        for attempt, verdict in zip(attempts, verdicts, strict=True):
            self.curriculum.record_attempt(attempt.task_id, attempt.adapter_version, verdict.passed)
            self.counts["attempts"] += 1
            self.counts["attempts_passed"] += verdict.passed
            if verdict.passed:
                self._release(1)
            else:
                failures.append((attempt, verdict))
                self.refining[attempt.task_id] += 1
        for task_id in {a.task_id for a in attempts} - {a.task_id for a, _ in failures}:
            self.curriculum.release(task_id)
        return failures

    def refined(self, task: Task, attempt: Attempt, outcome: RefinementOutcome,
                examples: list[Example]) -> list[Example]:
        """A failure's refinement came back with `examples` derived from it; returns those to hand to the
        trainer (all of them: a repeated label is trained again, but counted once)."""
        task_id = task.task_id
        for r in outcome.rounds:
            ref = r.refinement
            self.counts["teacher_calls"] += 1
            self.counts["teacher_cache_hits"] += ref.cached
            self.counts["teacher_tokens"] += ref.prompt_tokens + ref.completion_tokens
            self.counts["teacher_cost_usd"] += ref.cost_usd
        verified = outcome.verified is not None
        if outcome.verified is not None:
            self.distances.append(label_distance(attempt.attempt_id, outcome.verified.teacher_kind,
                                                 outcome.verified.program, attempt.program, task.reference))
        new_labels = self.labels.add(examples)
        self.counts["examples_distinct"] += new_labels
        self.counts["refinements_verified"] += verified
        self.curriculum.record_teacher(task_id, verified, new_label=new_labels > 0, tiers=tier_outcomes(outcome))
        if not outcome.rounds:  # the teacher had nothing to offer: as unfixable as a failed round
            self.curriculum.record_teacher(task_id, False)
        if examples:
            self.trained_tasks.add(task_id)
            self.backlog += len(examples)
            self.starved = False
        self._done_with(task_id)
        return examples

    def likelihoods(self, attempt_id: str, label: float, reference: float) -> None:
        """The mean token log-probs of the attempt's label and of its task's reference, measured under the
        version the student serves when they are measured (the attempt's, or at most max_staleness newer)."""
        for i, d in enumerate(self.distances):
            if d.attempt_id == attempt_id:
                self.distances[i] = dataclasses.replace(d, label_logprob=round(label, 4),
                                                        reference_logprob=round(reference, 4))

    def dropped(self, task_id: str) -> None:
        """A failure left without refinement (the teacher's budget is spent)."""
        self._done_with(task_id)

    def trainer_reported(self, stats: dict[str, Any], queued: int) -> None:
        """The trainer's own totals, and `queued` examples still in the queue to it (read before the stats: an
        example moving meanwhile counts twice, never zero times)."""
        for name in ("examples_trained", "train_steps", "stale_dropped", "stale_replayed", "duplicates_dropped"):
            self.counts[name] = stats[name]
        self.backlog = queued + stats.get("fresh_pending", 0)
        self.starved = queued == 0 and not stats.get("ready", True)

    def published(self, version: int) -> None:
        """The trainer's newest complete adapter version."""
        self.trainer_version = max(self.trainer_version, version)
        self.counts["adapters_published"] = self.trainer_version

    def served(self, version: int) -> None:
        """The student now serves `version` (checked); a change counts as one adapter load."""
        self.counts["adapters_loaded"] += version != self.student_version
        self.student_version = version

    # --- questions ----------------------------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        """Admitted attempts not yet released."""
        return self.gate.in_flight

    def can_admit(self) -> bool:
        """Whether `admit()` would grant a task now (it changes nothing): the staleness gate has room for one
        task's attempts and an active task is free."""
        n = self.settings.samples_per_task
        return self.curriculum.has_free() and self.gate.can_admit(
            self.student_version, self.trainer_version, self.backlog, unit=n, starved=self.starved)

    def idle(self) -> bool:
        """Nothing admitted is still on its way (no attempt in flight, no task picked)."""
        return self.in_flight == 0 and not self.curriculum.in_flight

    def stop_reason(self, wall_s: float, reserve_s: float) -> str | None:
        """Why the run must stop now, if it must."""
        b, c = self.settings.budget, self.counts
        if must_stop(wall_s, b.max_wall_s, reserve_s):
            return f"budget.max_wall_s={b.max_wall_s:g}: {reserve_s:.0f} s kept for the final evaluation and wrap-up"
        for limit, value in (("max_attempts", c["attempts"]), ("max_examples", c["examples_trained"]),
                             ("max_distinct_examples", c["examples_distinct"]),
                             ("max_teacher_calls", c["teacher_calls"]), ("max_versions", self.trainer_version)):
            if getattr(b, limit) is not None and value >= getattr(b, limit):
                return f"budget.{limit}={getattr(b, limit)} reached"
        if self.curriculum.exhausted() and self.idle():
            return "every task is retired or parked"
        return None

    # --- checkpoint ---------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (in-flight work is not kept: a resumed run admits afresh)."""
        return {"curriculum": self.curriculum.state(), "counts": dict(self.counts),
                "trained_tasks": sorted(self.trained_tasks), "labels": self.labels.keys(),
                "distances": [dataclasses.astuple(d) for d in self.distances]}

    @classmethod
    def from_state(cls, settings: LedgerSettings, curriculum_config: CurriculumConfig,
                   state: dict[str, Any]) -> Ledger:
        curriculum = Curriculum.from_state(state["curriculum"], curriculum_config)
        ledger = cls(settings, curriculum, Labels(state["labels"]),
                     dict.fromkeys(COUNTERS, 0.0) | state["counts"], set(state["trained_tasks"]))
        ledger.distances = [LabelDistance(*d) for d in state["distances"]]
        return ledger

    # --- internals ----------------------------------------------------------------------------------------
    def _release(self, attempts: int) -> None:
        if attempts:
            self.gate.finish(attempts)

    def _done_with(self, task_id: str) -> None:
        if self.refining[task_id] <= 0:
            raise ValueError(f"task {task_id} has no failed attempt awaiting the teacher")
        self._release(1)
        self.refining[task_id] -= 1
        if not self.refining[task_id]:
            del self.refining[task_id]
            self.curriculum.release(task_id)


def tier_outcomes(outcome: RefinementOutcome) -> list[TierOutcome]:
    """What each tier a failure reached did with it, in the cascade's order (its rounds, grouped by tier)."""
    tiers: dict[str, TierOutcome] = {}
    for r in outcome.rounds:
        tier = r.refinement.teacher_kind
        seen = tiers.get(tier, TierOutcome(tier, False))
        tiers[tier] = TierOutcome(tier, seen.fixed or r.verdict.passed, seen.cost_usd + r.refinement.cost_usd)
    return list(tiers.values())

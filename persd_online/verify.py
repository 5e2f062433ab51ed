"""The verification seam: what the teacher needs of a sandbox, and what a verified refinement looks like.

PERsD keeps a teacher's refinement only if it passes the task's tests. The teacher runs every refinement
through an `Executor` (the sandbox, behind an adapter) and returns a `RefinementOutcome`: every round with
its verdict, for the event log, and the one refinement that passed, if any, as the label.

Invariants: a round's verdict names its refinement (`verdict.subject_id == refinement.refinement_id`);
only the last round of an outcome can have passed; `verified` is derived, never stored separately.
"""

from __future__ import annotations

from typing import Protocol

from pydantic import BaseModel, ConfigDict, model_validator

from persd_online.records import Refinement, Verdict
from persd_online.tasks import Task


class Executor(Protocol):
    """Runs a program against a task's scoring tests (`task.tests`)."""

    async def run(self, task: Task, program: str, subject_id: str) -> Verdict:
        """The verdict on `program`, named `subject_id`; failures are verdicts, never exceptions."""
        ...


class VerifiedRound(BaseModel):
    """One refinement and the sandbox's verdict on it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    refinement: Refinement
    verdict: Verdict

    @model_validator(mode="after")
    def _verdict_names_refinement(self) -> VerifiedRound:
        if self.verdict.subject_id != self.refinement.refinement_id:
            raise ValueError(f"verdict on {self.verdict.subject_id!r} given for refinement "
                             f"{self.refinement.refinement_id!r}")
        return self


class RefinementOutcome(BaseModel):
    """All refinement rounds for one failed attempt, in order; at most the last one passed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    attempt_id: str
    task_id: str
    rounds: list[VerifiedRound]

    @model_validator(mode="after")
    def _only_last_passes(self) -> RefinementOutcome:
        if any(r.verdict.passed for r in self.rounds[:-1]):
            raise ValueError("a round after a passing refinement")
        return self

    @property
    def verified(self) -> Refinement | None:
        """The refinement that passed its tests (the PERsD label), or None."""
        if self.rounds and self.rounds[-1].verdict.passed:
            return self.rounds[-1].refinement
        return None

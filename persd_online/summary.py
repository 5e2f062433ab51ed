"""A run's summary: the typed form of `summary.json` (the run-directory contract in the README).

The loop builds it at the end of a run; the driver writes it, and the report, `compare`, the experiment, the
benchmarks and the tests read it back with `RunSummary.read`.

Invariants: the JSON keys are the field names below and nothing else (`extra="forbid"`), so a reader never
meets a key the writer did not declare; counts are the run's totals, resumed runs included.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from persd_online import atomic


class RunSummary(BaseModel):
    """What one run did and what it reached."""

    model_config = ConfigDict(extra="forbid")

    stop_reason: str
    method: str
    adapters_published: int
    adapters_loaded_by_student: int
    attempts: int
    attempts_passed: int
    teacher_calls: int
    refinements_verified: int
    examples_trained: int = Field(description="Example uses by optimizer steps (replay included).")
    examples_distinct: int = Field(description="Distinct labels (task, program) sent to the trainer.")
    train_steps: int
    stale_dropped: int
    stale_replayed: int = Field(description="Verified labels past max_staleness kept for replay, not dropped.")
    duplicates_dropped: int = Field(description="Examples the trainer had trained already.")
    examples_pending: int = Field(description="Examples handed to the trainer and not yet trained at the end "
                                  "(kept in its checkpoint). Every example handed over is trained, replayed, "
                                  "pending or dropped (stale or duplicate), and counted once.")
    heldout_pass1: list[tuple[int, float]] = Field(description="(version, pass@1) on the first held-out set.")
    heldout: list[dict[str, Any]] = Field(description="Every evaluation event, per-task outcomes included.")
    heldout_change: dict[str, dict[str, Any]] = Field(
        description="Per held-out set: version 0 against the final version, 95% interval and paired test.")
    trained_tasks: int
    trained_task_pass_before: float | None
    trained_task_pass_after: float | None
    stage_busy_fraction: dict[str, float]
    wall_s: float
    placement: str = Field("disaggregated", description="Where the student and the trainer ran: disaggregated "
                           "(devices of their own, at once) or colocated (the same devices, taking turns).")
    curriculum: dict[str, int]
    teacher: dict[str, Any] = Field(description="The teacher cascade: its order, totals, and per tier: failures "
                                    "offered, tried, skipped, calls, verified labels, tokens, cost.")
    personalisation: dict[str, Any] = Field(
        description="Verified labels per tier, the median edit ratio (changed lines / attempt lines) of the labels "
        "and of the tasks' references from the same attempts, and the share of labels closer than the reference.")

    def write(self, path: Path) -> None:
        atomic.write_text(path, self.model_dump_json(indent=2))

    @classmethod
    def read(cls, path: Path) -> RunSummary:
        return cls.model_validate_json(path.read_text())

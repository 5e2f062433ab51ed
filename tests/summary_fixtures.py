"""A complete `RunSummary` for tests that need a run's summary.json but not a run."""

from __future__ import annotations

from typing import Any

from persd_online.summary import RunSummary


def make_summary(**fields: Any) -> RunSummary:
    """A finished run's summary with plausible figures; `fields` override them."""
    base: dict[str, Any] = {
        "stop_reason": "budget.max_versions=2 reached", "method": "persd", "adapters_published": 2,
        "adapters_loaded_by_student": 2, "attempts": 40, "attempts_passed": 4, "teacher_calls": 36,
        "refinements_verified": 30, "examples_trained": 30, "examples_distinct": 28, "train_steps": 8,
        "stale_dropped": 0, "stale_replayed": 0, "duplicates_dropped": 0, "examples_pending": 0,
        "heldout_pass1": [(0, 0.1), (2, 0.2)], "heldout": [], "heldout_change": {},
        "trained_tasks": 12, "trained_task_pass_before": 0.0, "trained_task_pass_after": 0.5,
        "stage_busy_fraction": {"student": 0.5}, "wall_s": 100.0, "curriculum": {"active": 10},
        "teacher": {"kind": "cascade", "order": ["reference_oracle"]}, "personalisation": {"labels": 0}}
    return RunSummary(**(base | fields))

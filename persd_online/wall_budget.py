"""When the online loop must stop generating so that the whole run ends within `budget.max_wall_s`.

The run's wall clock counts everything: start-up (Ray, the actors, the engine), the loop, and the wrap-up
(the trainer's last steps and publication, the final held-out evaluation, the greedy re-attempts of the
trained tasks, the checkpoint and the report). The wrap-up is estimated from what the run has measured:

    reserve = SAFETY * (eval_s + 2 * trained_tasks * task_s + last_call_s) + WRAP_UP_S

- eval_s: the duration of the last full held-out evaluation (the final one scores the same tasks);
- task_s = eval_s / the tasks it scored: one greedy generation per task; the trained-task check generates
  each trained task twice (version 0 and the final version);
- last_call_s: the longest generation call of the loop so far, which may be running when the stop comes.

The loop stops generating once `wall_s + reserve >= max_wall_s`.

Invariants: the reserve grows with the trained tasks and never depends on the budget itself; with nothing
measured yet (no full evaluation) it is `WRAP_UP_S`; no budget means no stop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

SAFETY = 1.15
WRAP_UP_S = 20.0


def last_full_eval(evals: Sequence[dict[str, Any]]) -> tuple[float, int]:
    """(seconds, tasks) of the last full evaluation, summed over its held-out sets; (0, 0) before any."""
    full = [e for e in evals if e.get("full", True)]
    if not full:
        return 0.0, 0
    version = full[-1]["adapter_version"]
    latest = {e["task_set"]: e for e in full if e["adapter_version"] == version}.values()  # the last per set
    return sum(e["eval_wall_s"] for e in latest), sum(e["n_tasks"] for e in latest)


def reserve_s(eval_s: float, eval_tasks: int, trained_tasks: int, last_call_s: float) -> float:
    """Seconds to keep for the wrap-up (see the module docstring)."""
    task_s = eval_s / eval_tasks if eval_tasks else 0.0
    return SAFETY * (eval_s + 2 * trained_tasks * task_s + last_call_s) + WRAP_UP_S


def must_stop(wall_s: float, max_wall_s: float | None, reserve: float) -> bool:
    """True once generating more would push the run's end past `max_wall_s`."""
    return max_wall_s is not None and wall_s + reserve >= max_wall_s

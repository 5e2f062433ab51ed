"""Scoring one adapter on held-out task sets in this process: per-task outcomes, pass@1 and its interval.

The experiment's arms, the `eval` command and the evaluation-cost benchmark score adapters the same way:
the adapter merged into the base weights and served without LoRA by an engine in this process (`scoring_student`,
`student.serving: merged`: ~3x the tokens/s of LoRA serving on CPU), every task of a set in one engine
call, the evaluation's limits (stop sequences of the prompt format, the repetition stop, per-task token caps
from `eval.cap_factor`), scored on the hidden tests by the sandbox. Greedy decoding (`eval.temperature` 0)
gives each task a rate of 0 or 1; at T > 0 a task's rate is its passing share of `eval.n_samples` samples, an
unbiased estimate of its pass@1.

Invariants: every set is scored under limits that depend only on the tasks and the config, never on the
adapter, so two adapters scored here are comparable task by task; outcomes are keyed by task id in the
set's order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel

from persd_online.config import Config
from persd_online.stats import pass1_interval
from persd_online.tasks import Task, load_tasks

if TYPE_CHECKING:
    from persd_online.student import Student

log = logging.getLogger(__name__)


class SetScore(BaseModel):
    """One adapter on one held-out set."""

    task_set: str
    n_tasks: int
    n_samples: int
    temperature: float
    pass1: float
    ci_low: float
    ci_high: float
    wall_s: float
    generated_tokens: int
    outcomes: dict[str, float]  # task id -> pass rate (0/1 when greedy)


def heldout_sets(config: Config) -> dict[str, list[Task]]:
    """The config's held-out sets (`eval.tasks`, first `eval.limit` tasks of each)."""
    return {spec: load_tasks(spec)[: config.eval.limit] for spec in config.eval.tasks}


def scoring_student(config: Config, model_path: str | Path, adapter: str | Path | None,
                    work_dir: str | Path, merged: bool = True) -> tuple[Student, int]:
    """(student, version to ask for): a student in this process serving `adapter` (None: the base model) merged
    into its weights (`student.serving: merged`), or, with `merged` false, through LoRA. Refuses a path holding
    no published adapter before anything starts."""
    from persd_online import offline

    if adapter is not None:
        offline.resolve_adapter(adapter)
    served = config.student.model_copy(update={"serving": "merged" if merged else "lora"})
    student = offline.local_student(served, model_path, Path(work_dir) / "student")
    try:
        return student, offline.load_adapter(student, adapter)
    except BaseException:
        student.shutdown()
        raise


def score_adapter(config: Config, model_path: str | Path, adapter: str | Path | None, sets: dict[str, list[Task]],
                  work_dir: str | Path, on_set: Callable[[str, int], None] | None = None,
                  merged: bool = True) -> list[SetScore]:
    """Score `adapter` (None: the base student) on every set; `on_set(name, n_tasks)` is called before each.
    `merged` false: served through LoRA as the loop serves it (the benchmark's baseline)."""
    from persd_online import offline
    from persd_online.multistep import evaluate

    student, version = scoring_student(config, model_path, adapter, work_dir, merged)
    scores = []
    try:
        c = config.eval
        sampling = dataclasses.replace(student.default_sampling(), temperature=c.temperature,
                                       max_tokens=c.max_new_tokens)
        if sampling.temperature > 0:
            sampling = dataclasses.replace(sampling, seed=config.seed)
        n = c.n_samples if c.temperature > 0 else 1
        with offline.open_pool(config) as pool:
            executor = offline.PoolExecutor(pool)
            for name, tasks in sets.items():
                if on_set:
                    on_set(name, len(tasks))
                caps = dict(zip([t.task_id for t in tasks],
                                student.token_caps(tasks, c.cap_factor, c.cap_margin, c.max_new_tokens), strict=True))
                tokens_before = student.engine_metrics().get("vllm:generation_tokens", 0.0)
                start = time.monotonic()
                result = asyncio.run(evaluate(student, executor, tasks, n=n, refine_steps=0,
                                              sampling=dataclasses.replace(sampling, progress=f"scoring {name}"),
                                              fmt=config.student.prompt_format, version=version, task_set=name,
                                              caps=caps))
                wall = time.monotonic() - start
                tokens = student.engine_metrics().get("vllm:generation_tokens", 0.0) - tokens_before
                outcomes = {t: sum(row["steps"][0]) / len(row["steps"][0]) for t, row in result.per_task.items()}
                scores.append(_set_score(name, n, sampling.temperature, outcomes, wall, int(tokens)))
                log.info("%s: pass@1 %.3f on %d tasks in %.0f s", name, scores[-1].pass1, len(tasks), wall)
    finally:
        student.shutdown()
    return scores


def _set_score(name: str, n: int, temperature: float, outcomes: dict[str, float], wall_s: float,
               tokens: int) -> SetScore:
    interval = pass1_interval(list(outcomes.values()))
    return SetScore(task_set=name, n_tasks=len(outcomes), n_samples=n, temperature=temperature, pass1=interval.value,
                    ci_low=interval.low, ci_high=interval.high, wall_s=round(wall_s, 2), generated_tokens=tokens,
                    outcomes=outcomes)


def paired_rates(a: SetScore, b: SetScore) -> tuple[list[float], list[float]]:
    """The two scores' per-task rates over the same tasks, in `a`'s order (refuses different task sets)."""
    if set(a.outcomes) != set(b.outcomes):
        raise ValueError(f"{a.task_set}: the two scores cover different tasks ({len(a.outcomes)} and "
                         f"{len(b.outcomes)}); score both on the same set")
    order: Sequence[str] = list(a.outcomes)
    return [a.outcomes[t] for t in order], [b.outcomes[t] for t in order]

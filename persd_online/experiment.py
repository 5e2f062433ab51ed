"""`persd-online experiment`: ways of training the student on one pool, scored on the same held-out tasks.

Arms (`experiment.arms`):
- `base`: no training;
- `stand`: every pool task's reference (StanD);
- `inpd`: the references of the pool tasks the base student fails (InpD);
- `persd`: offline PERsD: the base student's attempts, failures refined by the configured teacher, verified;
- `online`, `online_uniform`: the online loop (`persd-online run`) with the learning-value or the uniform
  curriculum.

Budget matching: every training arm gets the same `experiment.budget` of what `experiment.match` names,
distinct verified examples or teacher calls (a reference label counts as one call); the other figure is
reported. An offline arm takes its labels in one seeded order of the pool's tasks (`take_within`); an online
arm stops at `budget.max_distinct_examples` or `budget.max_teacher_calls`. An arm whose method cannot reach the budget
(fewer failures than examples asked for) trains on what it has and says so (`short_of_budget`).

Each arm runs in a fresh process (its own engine, trainer or Ray cluster), writes `OUT/arms/<arm>.json`
(no weights: per-task outcomes, pass@1, teacher spend, examples, steps, wall time) and is not run again while
that file exists with the same settings fingerprint; weights and collected data live under
`RUNS_DIR/NAME/experiment/`. The arms share the teacher cache and the student model.

Invariants: every arm is scored by `heldout.score_adapter` on the same tasks under the same limits; held-out
tasks never appear in the pool (`evaluator.check_disjoint`); a finished arm is never recomputed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, Field

from persd_online import adapters, atomic
from persd_online.config import ARMS, Config, ConfigError
from persd_online.heldout import SetScore
from persd_online.records import Example
from persd_online.tasks import Task

log = logging.getLogger(__name__)
T = TypeVar("T")
OFFLINE_ARMS = ("stand", "inpd", "persd")
SCORING_KEYS = {"model", "dtype", "max_model_len", "prompt_format", "stop_at_program_end", "stop_repetition"}
ATTEMPT_KEYS = {"max_new_tokens", "temperature", "top_p", "samples_per_task", "tasks_per_batch", "max_loras"}
ONLINE_ARMS = ("online", "online_uniform")
TEACHER_ARMS = ("persd", *ONLINE_ARMS)


class ArmResult(BaseModel):
    """One arm's outcome: what `OUT/arms/<arm>.json` holds."""

    arm: str
    fingerprint: str
    teacher: str
    teacher_calls: int = 0
    teacher_tokens: int = 0
    teacher_cost_usd: float = 0.0
    examples: int = Field(0, description="Distinct labels (task, program) trained on: what the budget counts.")
    examples_trained: int = Field(0, description="Example uses by optimizer steps (epochs and replay included).")
    tasks: int = Field(0, description="Distinct pool tasks the examples came from.")
    train_steps: int = 0
    short_of_budget: bool = False
    data_wall_s: float = 0.0
    train_wall_s: float = 0.0
    score_wall_s: float = 0.0
    wall_s: float = 0.0
    scores: list[SetScore]


def offline_config(config: Config) -> Config:
    """The config the in-process stages run with: the engine and the trainer each get every core in turn."""
    return config.model_copy(update={
        "student": config.student.model_copy(update={"cpu_cores": list(range(os.cpu_count() or 1))}),
        "trainer": config.trainer.model_copy(update={"cpu_cores": None}),
        "eval": config.eval.model_copy(update={"tasks": config.experiment.heldout,
                                               "limit": config.experiment.heldout_limit}),
    })


def fingerprint(config: Config, arm: str) -> str:
    """The settings an arm's result depends on; a result with another fingerprint is not reused."""
    c = config
    keys: dict[str, Any] = {"arm": arm, "pool": c.tasks.pool, "limit": c.tasks.limit, "seed": c.seed,
                            "student": c.student.model_dump(include=SCORING_KEYS | (
                                set() if arm == "base" else ATTEMPT_KEYS)),
                            "eval": c.eval.model_dump(exclude={"tasks", "limit", "every_versions", "resources"}),
                            "heldout": [c.experiment.heldout, c.experiment.heldout_limit]}
    if arm != "base":
        keys |= {"match": c.experiment.match, "budget": c.experiment.budget, "method": c.method,
                 "trainer": c.trainer.model_dump(exclude={"cpu_cores", "resources"})}
    if arm in TEACHER_ARMS:  # what makes a label: the tiers, not their names, floors or concurrency
        keys["teacher"] = [t.model_dump(exclude={"name", "max_concurrency", "timeout_s", "max_retries", "cache",
                                                 "backoff_initial_s", "backoff_max_s", "api_key_env"})
                           for t in c.teacher.tiers]
    if arm in OFFLINE_ARMS:
        keys["epochs"] = c.experiment.epochs
    if arm in ONLINE_ARMS:
        keys |= {"counts": "distinct labels", "online_max_wall_s": c.experiment.online_max_wall_s,
                 "max_staleness": c.max_staleness, "curriculum": c.curriculum.model_dump(exclude={"policy"})}
    return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_plan(config: Config, pool_size: int) -> None:
    """Refuse an experiment that cannot run as asked (before anything starts)."""
    e = config.experiment
    if not e.arms:
        raise ConfigError("experiment.arms is empty: name at least one of " + ", ".join(ARMS))
    if len(set(e.arms)) != len(e.arms):
        raise ConfigError(f"experiment.arms names an arm twice: {e.arms}")
    most = pool_size * (1 if e.match == "examples" and "stand" in e.arms else config.student.samples_per_task)
    if e.match == "examples" and any(a != "base" for a in e.arms) and e.budget > most:
        raise ConfigError(
            f"experiment.budget={e.budget} examples is more than the pool ({config.tasks.pool}, {pool_size} tasks) "
            f"can give every training arm (at most {most}: stand labels each task once); lower the budget or "
            "raise tasks.limit")


def take_within(items: Sequence[T], budget: int, cost: Callable[[T], int]) -> list[T]:
    """The longest prefix of `items` whose summed `cost` stays within `budget` (the arms' budget matching)."""
    taken, spent = [], 0
    for item in items:
        if spent + cost(item) > budget:
            break
        taken.append(item)
        spent += cost(item)
    return taken


def seeded_order(tasks: Sequence[Task], seed: int) -> list[Task]:
    """The pool in the order every arm takes its labels in (one shuffle, by the run's seed)."""
    order = list(tasks)
    random.Random(seed).shuffle(order)
    return order


class _Stage:
    """Writes the running arm's stage to a file the parent's progress display reads."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, text: str) -> None:
        log.info("experiment: %s", text)
        atomic.write_text(self.path, text)


def _teacher_label(config: Config, arm: str) -> str:
    if arm == "base":
        return "none"
    if arm in ("stand", "inpd"):
        return "reference solutions"
    if config.teacher.oracle_only:
        return "reference_oracle (InpD in all but name)"
    return " > ".join(t.label for t in config.teacher.tiers)


def run_arm(config: Config, arm: str, work: Path, stage_file: Path) -> ArmResult:
    """Run one arm in this process and return its result (called in a fresh process by `run_experiment`)."""
    from persd_online.heldout import heldout_sets, score_adapter
    from persd_online.models import resolve_model

    stage = _Stage(stage_file)
    loop_config, config = config, offline_config(config)
    model_path = resolve_model(config.student.model, config.cache_dir)
    work.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    adapter: Path | None = None
    figures: dict[str, Any] = {}
    if arm in OFFLINE_ARMS:
        figures, adapter = _offline_arm(config, arm, model_path, work, stage)
    elif arm in ONLINE_ARMS:
        figures, adapter = _online_arm(loop_config, arm, work, stage)
    scored = time.monotonic()
    scores = score_adapter(config, model_path, adapter, heldout_sets(config), work / "score",
                           on_set=lambda name, n: stage(f"scoring on {name} ({n} tasks)"))
    return ArmResult(arm=arm, fingerprint=fingerprint(config, arm), teacher=_teacher_label(config, arm),
                     scores=scores, score_wall_s=round(time.monotonic() - scored, 1),
                     wall_s=round(time.monotonic() - start, 1), **figures)


def _offline_arm(config: Config, arm: str, model_path: Path, work: Path,
                 stage: Callable[[str], None]) -> tuple[dict[str, Any], Path]:
    from persd_online.offline import train_offline

    start = time.monotonic()
    examples, calls, teacher = _labels(config, arm, model_path, work, stage)
    data_wall = time.monotonic() - start
    stage(f"training on {len(examples)} examples for {config.experiment.epochs} epochs")
    out = work / "adapter"
    versions = train_offline(config, model_path, examples, out, epochs=config.experiment.epochs,
                             info={"method": arm, "experiment": True})
    info = json.loads((out / "offline.json").read_text())
    trained = adapters.version_dir(out / "adapters", versions[-1])
    return {"examples": len(examples), "examples_trained": len(examples) * config.experiment.epochs,
            "tasks": len({x.task_id for x in examples}), "teacher_calls": calls, "train_steps": info["train_steps"],
            "short_of_budget": _short(config, len(examples), calls),
            "teacher_tokens": teacher.get("prompt_tokens", 0) + teacher.get("completion_tokens", 0),
            "teacher_cost_usd": teacher.get("cost_usd", 0.0), "data_wall_s": round(data_wall, 1),
            "train_wall_s": round(time.monotonic() - start - data_wall, 1)}, trained


def _short(config: Config, examples: int, calls: int) -> bool:
    e = config.experiment
    return (examples if e.match == "examples" else calls) < e.budget


def _labels(config: Config, arm: str, model_path: Path, work: Path,
            stage: Callable[[str], None]) -> tuple[list[Example], int, dict[str, Any]]:
    """The arm's examples within the budget, the teacher calls they cost, and the teacher's spend."""
    from transformers import AutoTokenizer

    from persd_online.collect import pool_tasks
    from persd_online.formats import stand_examples

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    fmt = config.student.prompt_format
    order = seeded_order(pool_tasks(config), config.seed)
    e = config.experiment
    if arm == "stand":  # one reference label (one call) per task, in the seeded order
        examples = stand_examples(order, tokenizer, fmt)
        return examples[:e.budget], min(len(examples), e.budget), {}
    per_task = _attempt_labels(config, arm, model_path, work, order, tokenizer, stage)
    cost = (lambda row: len(row[0])) if e.match == "examples" else (lambda row: row[1])
    taken = take_within(per_task, e.budget, cost)
    examples = [x for row in taken for x in row[0]]
    return examples, sum(row[1] for row in taken), taken[-1][2] if taken else {}


def _attempt_labels(config: Config, arm: str, model_path: Path, work: Path, order: list[Task], tokenizer: Any,
                    stage: Callable[[str], None]) -> list[tuple[list[Example], int, dict[str, Any]]]:
    """Per failed task, in the seeded order: (its examples, the teacher calls spent on it, the teacher's
    cumulative spend). The base student's attempts are made once and shared by `inpd` and `persd`."""
    from persd_online import offline
    from persd_online.cascade import build_cascade, local_generate
    from persd_online.collect import attempt_pool, build_examples, refine_failures
    from persd_online.records import Attempt, Verdict

    shared = work.parent / "base_attempts.json"
    self_repair = arm != "inpd" and "self" in config.teacher.kinds  # the base student repairs its own attempts
    with offline.open_pool(config) as pool, _base_student(config, model_path, work,
                                                          self_repair or not shared.is_file()) as student:
        executor = offline.PoolExecutor(pool)
        if shared.is_file():
            data = json.loads(shared.read_text())
            attempts = [Attempt.model_validate(a) for a in data["attempts"]]
            verdicts = [Verdict.model_validate(v) for v in data["verdicts"]]
        else:
            stage(f"base student attempts {len(order)} pool tasks")
            attempts, verdicts = attempt_pool(student, executor, order, config.student.samples_per_task,
                                              student.default_sampling())
            atomic.write_text(shared, json.dumps({"attempts": [a.model_dump() for a in attempts],
                                                  "verdicts": [v.model_dump() for v in verdicts]}))
        generate = local_generate(student, config.teacher, None) if self_repair else None
        teacher = None if arm == "inpd" else build_cascade(
            config.teacher, Path(config.runs_dir) / config.name / "teacher_cache", executor, generate,
            config.student.prompt_format)
        rows = []
        for task in order:
            mine = [(a, v) for a, v in zip(attempts, verdicts, strict=True) if a.task_id == task.task_id]
            if all(v.passed for _, v in mine):
                continue
            outcomes: dict[str, Any] = {}
            if teacher is not None:
                stage(f"teacher refines failed attempts ({len(rows)} tasks labelled)")
                before = teacher.describe().get("calls", 0)
                outcomes, _ = asyncio.run(refine_failures(teacher, [task], [a for a, _ in mine],
                                                          [v for _, v in mine]))
                calls = teacher.describe().get("calls", 0) - before
            else:
                calls = 1  # one reference label
            examples = build_examples(arm, [task], [a for a, _ in mine], [v for _, v in mine], outcomes,
                                      tokenizer, config.student.prompt_format)
            rows.append((examples, calls, teacher.describe() if teacher else {}))
            done = sum(len(r[0]) for r in rows) if config.experiment.match == "examples" else sum(r[1] for r in rows)
            if done >= config.experiment.budget:
                break
    return rows


@contextmanager
def _base_student(config: Config, model_path: Path, work: Path, wanted: bool) -> Iterator[Any]:
    """The base student (version 0: the plain base weights) while it is `wanted`, else None."""
    from persd_online.heldout import scoring_student

    if not wanted:
        yield None
        return
    student, _ = scoring_student(config, model_path, None, work)
    try:
        yield student
    finally:
        student.shutdown()


def _online_arm(config: Config, arm: str, work: Path, stage: Callable[[str], None]) -> tuple[dict[str, Any], Path]:
    from persd_online import driver

    e = config.experiment
    limit = "max_distinct_examples" if e.match == "examples" else "max_teacher_calls"
    loop_config = config.model_copy(update={
        "name": f"{config.name}-{arm}", "runs_dir": work,
        "curriculum": config.curriculum.model_copy(update={"policy": "uniform" if arm == "online_uniform"
                                                           else "learning_value"}),
        "budget": config.budget.model_copy(update={"max_wall_s": e.online_max_wall_s, limit: e.budget}),
        # the loop's own evaluations: a small validation set at the start and the end only (the arm is scored
        # on the held-out sets below, like every other arm)
        "eval": config.eval.model_copy(update={"tasks": ["mbpp:validation"], "limit": 10, "every_versions": 10**6}),
    })
    stage(f"online loop ({loop_config.curriculum.policy} curriculum) until {e.budget} {e.match.replace('_', ' ')}")
    root, summary = driver.run(loop_config)
    teacher = summary.teacher
    return {"examples": summary.examples_distinct, "examples_trained": summary.examples_trained,
            "tasks": summary.trained_tasks, "teacher_calls": summary.teacher_calls,
            "train_steps": summary.train_steps,
            "short_of_budget": _short(config, summary.examples_distinct, summary.teacher_calls),
            "teacher_tokens": teacher.get("prompt_tokens", 0) + teacher.get("completion_tokens", 0),
            "teacher_cost_usd": teacher.get("cost_usd", 0.0), "train_wall_s": summary.wall_s}, root


def _arm_in_process(config_json: str, arm: str, work: str, stage_file: str) -> str:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_arm(Config.model_validate_json(config_json), arm, Path(work), Path(stage_file)).model_dump_json()


def load_finished(out: Path, config: Config) -> dict[str, ArmResult]:
    """Arms already finished under `out` with the current settings (others are run again)."""
    finished = {}
    for arm in config.experiment.arms:
        path = out / "arms" / f"{arm}.json"
        if path.is_file():
            result = ArmResult.model_validate_json(path.read_text())
            if result.fingerprint == fingerprint(offline_config(config), arm):
                finished[arm] = result
            else:
                log.warning("%s was made with other settings: arm %s runs again", path, arm)
    return finished


def run_experiment(config: Config, out: Path) -> dict[str, ArmResult]:
    """Run every arm not finished yet (each in a fresh process), then write the JSON, table and plot."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from persd_online.collect import pool_tasks
    from persd_online.evaluator import check_disjoint
    from persd_online.experiment_report import write_report
    from persd_online.heldout import heldout_sets

    pool = pool_tasks(config)
    check_plan(config, len(pool))
    check_disjoint(pool, heldout_sets(offline_config(config)))
    work_root = Path(config.runs_dir) / config.name / "experiment"
    (out / "arms").mkdir(parents=True, exist_ok=True)
    results = load_finished(out, config)
    todo = [a for a in config.experiment.arms if a not in results]
    log.info("experiment: %d arm(s) finished already (%s), %d to run", len(results), ", ".join(results) or "none",
             len(todo))
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn()) as progress:
        for index, arm in enumerate(todo, 1):
            stage_file = work_root / arm / "stage.txt"
            stage_file.parent.mkdir(parents=True, exist_ok=True)
            line = progress.add_task(f"arm {index}/{len(todo)} {arm}: starting")
            with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool_exec:
                future = pool_exec.submit(_arm_in_process, config.model_dump_json(), arm, str(work_root / arm),
                                          str(stage_file))
                while not future.done():
                    stage = stage_file.read_text() if stage_file.is_file() else "starting"
                    progress.update(line, description=f"arm {index}/{len(todo)} {arm}: {stage}")
                    time.sleep(1.0)
                result = ArmResult.model_validate_json(future.result())
            atomic.write_text(out / "arms" / f"{arm}.json", result.model_dump_json(indent=1))
            progress.update(line, description=f"arm {index}/{len(todo)} {arm}: done in {result.wall_s:.0f} s")
            results[arm] = result
    ordered = {a: results[a] for a in config.experiment.arms}
    write_report(ordered, config, out)
    return ordered

"""The paper's one-shot data collection (`persd-online collect`): one training set per method.

The base student (or a given adapter) attempts every task of the pool; each attempt runs in the sandbox;
for the PERsD methods, failed attempts go down the configured teacher tiers (`cascade.py`; the `self` tier
asks the same student, while it is up), whose refinements are verified in the sandbox; examples are built by
`formats` exactly as the online loop builds them. The teacher's cache is the online run's
(`<runs_dir>/<name>/teacher_cache` unless `cache_dir` is given), so a baseline and an online run of the same
config and tasks do not pay twice; each tier's token/cost budget is the config's.

Stages are separate functions so several methods can share one set of attempts (`attempt_pool`,
`refine_failures`, `build_examples`); `collect` runs them for one method and writes the JSONL file plus
`<out>.stats.json` (counts and the teacher's spend).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from persd_online.budget import BudgetExhausted
from persd_online.cascade import Cascade, build_cascade, local_generate
from persd_online.config import Config
from persd_online.engine import Sampling
from persd_online.evaluator import score
from persd_online.formats import attempt_examples, stand_examples
from persd_online.prompts import ChatTemplate
from persd_online.records import Attempt, Example, Method, PromptFormat, Verdict
from persd_online.tasks import Task, load_tasks
from persd_online.verify import Executor, RefinementOutcome

log = logging.getLogger(__name__)

METHODS: tuple[Method, ...] = ("stand", "inpd", "persd", "persd_refine", "persd_combine")


def pool_tasks(config: Config) -> list[Task]:
    """The config's task pool (`tasks.pool`, first `tasks.limit`)."""
    return load_tasks(config.tasks.pool)[: config.tasks.limit]


def attempt_pool(student: Any, executor: Executor, tasks: Sequence[Task], n: int, sampling: Sampling,
                 version: int = 0) -> tuple[list[Attempt], list[Verdict]]:
    """`n` attempts per task by the student at `version`, and the sandbox's verdict on each."""
    if sampling.temperature == 0:
        n = 1  # greedy decoding has one answer per prompt (and vLLM refuses n > 1 for it)
    attempts = student.generate(list(tasks), n, sampling, version)
    return attempts, asyncio.run(score(executor, tasks, attempts))


async def refine_failures(teacher: Cascade, tasks: Sequence[Task], attempts: Sequence[Attempt],
                          verdicts: Sequence[Verdict]) -> tuple[dict[str, RefinementOutcome], str | None]:
    """Verified refinements of every failed attempt (by attempt id), and why refinement stopped early, if it
    did (the budget ran out: the attempts refined so far keep their outcomes)."""
    by_id = {t.task_id: t for t in tasks}
    failed = [(a, v) for a, v in zip(attempts, verdicts, strict=True) if not v.passed]
    outcomes: dict[str, RefinementOutcome] = {}
    stop: str | None = None

    async def one(attempt: Attempt, verdict: Verdict) -> None:
        nonlocal stop
        if stop:
            return
        try:
            outcomes[attempt.attempt_id] = await teacher.refine(by_id[attempt.task_id], attempt, verdict)
        except BudgetExhausted as exc:
            stop = f"teacher budget exhausted: {exc}"

    await asyncio.gather(*(one(a, v) for a, v in failed))
    if stop:
        log.warning("%s; %d of %d failed attempts refined", stop, len(outcomes), len(failed))
    return outcomes, stop


def build_examples(method: Method, tasks: Sequence[Task], attempts: Sequence[Attempt], verdicts: Sequence[Verdict],
                   outcomes: dict[str, RefinementOutcome], tokenizer: ChatTemplate,
                   fmt: PromptFormat) -> list[Example]:
    """The method's examples: `stand` from the tasks alone, the others from each scored attempt (identical
    prompt and completion kept once)."""
    if method == "stand":
        return stand_examples(tasks, tokenizer, fmt)
    by_id = {t.task_id: t for t in tasks}
    examples: list[Example] = []
    seen: set[tuple[str, str, str]] = set()
    for attempt, verdict in zip(attempts, verdicts, strict=True):
        for example in attempt_examples(method, by_id[attempt.task_id], attempt, verdict,
                                        outcomes.get(attempt.attempt_id), tokenizer, fmt):
            # Same text from another sample (inpd: every failed sample of a task gives the reference) is kept
            # once, with the first sample's lineage: a duplicate would only weigh the task more.
            key = (example.method, example.prompt, example.completion)
            if key not in seen:
                seen.add(key)
                examples.append(example)
    return examples


def collect(config: Config, model_path: str | Path, method: Method, out: str | Path, *,
            adapter: str | Path | None = None, cache_dir: str | Path | None = None,
            work_dir: str | Path | None = None, n: int | None = None) -> dict[str, Any]:
    """Collect `method`'s training set for the config's pool into `out` (JSONL); returns the stats written to
    `<out>.stats.json`."""
    from transformers import AutoTokenizer

    from persd_online import atomic, offline

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; one of {', '.join(METHODS)}")
    fmt = config.student.prompt_format
    tasks = pool_tasks(config)
    run_root = Path(config.runs_dir) / config.name
    work_dir = Path(work_dir) if work_dir else run_root / "offline"
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    attempts: list[Attempt] = []
    verdicts: list[Verdict] = []
    outcomes: dict[str, RefinementOutcome] = {}
    stop = None
    teacher: Cascade | None = None
    if method != "stand":  # stand needs no student: every task's reference is its label
        student = offline.local_student(config.student, model_path, work_dir / "student")
        with offline.open_pool(config) as pool:
            executor = offline.PoolExecutor(pool)
            try:
                version = offline.load_adapter(student, adapter)
                attempts, verdicts = attempt_pool(student, executor, tasks, n or config.student.samples_per_task,
                                                  student.default_sampling(), version)
                if method != "inpd":  # while the student is up: the `self` tier asks it
                    cache = Path(cache_dir) if cache_dir else run_root / "teacher_cache"
                    teacher = build_cascade(config.teacher, cache, executor,
                                            local_generate(student, config.teacher, version), fmt)
                    outcomes, stop = asyncio.run(refine_failures(teacher, tasks, attempts, verdicts))
            finally:
                student.shutdown()
    examples = build_examples(method, tasks, attempts, verdicts, outcomes, tokenizer, fmt)
    offline.write_examples(out, examples)
    stats = {
        "method": method, "pool": config.tasks.pool, "tasks": len(tasks), "attempts": len(attempts),
        "attempts_passed": sum(v.passed for v in verdicts),
        "teacher_calls": sum(len(o.rounds) for o in outcomes.values()),
        "refinements_verified": sum(o.verified is not None for o in outcomes.values()), "examples": len(examples),
        "adapter": str(adapter) if adapter else None, "stopped": stop,
        "teacher": teacher.describe() if teacher else None,
    }
    atomic.write_text(Path(str(out) + ".stats.json"), json.dumps(stats, indent=1))
    return stats

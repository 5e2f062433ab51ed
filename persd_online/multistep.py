"""Evaluation with PERsD's multi-step inference, and the equal-budget resampling baseline.

One-step: `n` samples per task, scored on the hidden tests (`task.tests`), pass@k by the unbiased estimator.

Multi-step (PERsD's two-step mode, generalised to K refine steps): each sample is run on the task's *seen*
tests only (`task.seen_tests`, e.g. the example shown in the prompt). A sample that fails them is given back
to the student itself in the refine format (`prompts.refine_prompt`: the task, its own code and the error)
and the answer replaces it; up to K times. A sample that passes its seen tests, or a task without seen tests,
is kept as it is. Every step's programs are scored on the hidden tests; pass@1 is reported per step
(step 0 is the one-step pass@1 of the same samples). The hidden tests never reach the student.

Equal budget: refinement spends up to K+1 generations per sample, so it is compared with K+1 independent
samples per original sample (n*(K+1) per task): their pass@(K+1) (the chance that one of K+1 samples passes
the hidden tests — an upper bound a refiner must approach) and the pass rate when the first of K+1 samples
that passes the seen tests is chosen (the same information the refiner gets). Refinement counts only if it
beats resampling.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, Field

from persd_online.engine import Generation, Sampling
from persd_online.evaluator import score, summarise
from persd_online.offline import seen_task
from persd_online.passk import mean_pass_at_k
from persd_online.prompts import Messages, extract_program, refine_prompt
from persd_online.records import Attempt, PromptFormat, Verdict
from persd_online.tasks import Task
from persd_online.verify import Executor


class Generator(Protocol):
    """What evaluation needs of a student (`student.Student` in this process)."""

    def generate(self, tasks: Sequence[Task], n: int | None = None, sampling: Sampling | None = None,
                 version: int | None = None) -> list[Attempt]: ...

    def generate_prompts(self, prompts: Sequence[Messages | str], sampling: Sampling, n: int = 1,
                         version: int | None = None) -> list[list[Generation]]: ...


class MultiStepResult(BaseModel):
    """One evaluation: one-step pass@k, pass@1 after each refine step, and the equal-budget baseline; the typed
    form of an `eval --out` file (`to_json` / `read`)."""

    kind: Literal["eval"] = "eval"
    task_set: str
    adapter_version: int
    n_samples: int
    refine_steps: int
    temperature: float
    n_tasks: int
    tasks_with_seen_tests: int
    pass_at_k: dict[int, float]
    pass1_by_step: list[float]
    refined_by_step: list[int]
    baseline_samples_per_task: int
    baseline_pass_at_k: float | None
    baseline_seen_select_pass1: float | None
    wall_s: float
    per_task: dict[str, dict[str, Any]] = Field(repr=False)
    extra: dict[str, Any] = Field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def read(cls, path: Path) -> MultiStepResult:
        return cls.model_validate_json(path.read_text())


def _rate(rows: list[list[bool]]) -> float:
    return mean_pass_at_k([(len(r), sum(r)) for r in rows], 1)


async def _seen_verdicts(executor: Executor, tasks: dict[str, Task], programs: list[tuple[str, str, str]]
                         ) -> dict[str, Verdict | None]:
    """Verdict on the seen tests of each (subject id, task id, program); None for tasks without seen tests."""
    async def one(subject: str, task_id: str, program: str) -> Verdict | None:
        seen = seen_task(tasks[task_id])
        return None if seen is None else await executor.run(seen, program, subject)

    verdicts = await asyncio.gather(*(one(*p) for p in programs))
    return {p[0]: v for p, v in zip(programs, verdicts, strict=True)}


def capped(sampling: Sampling, task_ids: Sequence[str], caps: Mapping[str, int] | None) -> Sampling:
    """`sampling` with each prompt's token cap (prompts in `task_ids` order); unchanged without caps."""
    if caps is None:
        return sampling
    return dataclasses.replace(sampling, max_tokens_each=tuple(caps[t] for t in task_ids))


def _sample(student: Generator, tasks: Sequence[Task], n: int, sampling: Sampling, version: int) -> list[Attempt]:
    """`n` samples per task, task-major. Greedy decoding has one answer (vLLM refuses n > 1 for it): it is
    generated once and repeated, so every figure below reads the same for any temperature."""
    if sampling.temperature > 0 or n == 1:
        return student.generate(list(tasks), n, sampling, version)
    once = student.generate(list(tasks), 1, sampling, version)
    return [a.model_copy(update={"attempt_id": f"{a.attempt_id}~{i}", "sample_index": i})
            for a in once for i in range(n)]


async def evaluate(student: Generator, executor: Executor, tasks: Sequence[Task], *, n: int, sampling: Sampling,
                   refine_steps: int, fmt: PromptFormat, version: int = 0, task_set: str = "tasks",
                   caps: Mapping[str, int] | None = None) -> MultiStepResult:
    """One-step pass@k, multi-step pass@1 per step, and the equal-budget baseline (see the module docstring).

    `caps`: each task's token cap by task id (`token_caps`), for first samples and refinements alike. The
    student is called directly (its engine blocks; nothing else runs meanwhile); sandbox calls run
    concurrently.
    """
    start = time.monotonic()
    by_id = {t.task_id: t for t in tasks}
    budget = n * (refine_steps + 1)
    samples = _sample(student, tasks, budget, capped(sampling, [t.task_id for t in tasks], caps), version)
    first = [a for a in samples if a.sample_index < n]  # the samples refinement starts from
    hidden = await score(executor, tasks, samples)
    hidden_of = {a.attempt_id: v for a, v in zip(samples, hidden, strict=True)}
    one_step = summarise(task_set, version, n, first, [hidden_of[a.attempt_id] for a in first], 0.0)
    seen = await _seen_verdicts(executor, by_id, [(a.attempt_id, a.task_id, a.program) for a in samples])

    # state per original sample: (task, current program, seen verdict, hidden passed at each step)
    current = {a.attempt_id: (a.task_id, a.program, seen[a.attempt_id]) for a in first}
    history = {a.attempt_id: [hidden_of[a.attempt_id].passed] for a in first}
    refined_by_step = []
    for step in range(1, refine_steps + 1):
        todo = [(sid, task_id, program, verdict) for sid, (task_id, program, verdict) in current.items()
                if verdict is not None and not verdict.passed]
        refined_by_step.append(len(todo))
        for sid in current:
            history[sid].append(history[sid][-1])  # unchanged unless refined below
        if not todo:
            continue
        prompts = [refine_prompt(by_id[task_id], program, verdict.feedback, fmt)
                   for _, task_id, program, verdict in todo]
        outputs = student.generate_prompts(prompts, capped(sampling, [t for _, t, _, _ in todo], caps), 1, version)
        programs = [(f"{sid}#r{step}", task_id, extract_program(by_id[task_id], out[0].text, fmt))
                    for (sid, task_id, _, _), out in zip(todo, outputs, strict=True)]
        new_seen = await _seen_verdicts(executor, by_id, programs)
        new_hidden = await asyncio.gather(*(executor.run(by_id[task_id], program, rid)
                                            for rid, task_id, program in programs))
        for (sid, *_), (rid, task_id, program), verdict in zip(todo, programs, new_hidden, strict=True):
            current[sid] = (task_id, program, new_seen[rid])
            history[sid][-1] = verdict.passed

    per_task: dict[str, dict[str, Any]] = {}
    for a in first:
        row = per_task.setdefault(a.task_id, {"steps": [[] for _ in range(refine_steps + 1)]})
        for step, passed in enumerate(history[a.attempt_id]):
            row["steps"][step].append(passed)
    pass1_by_step = [_rate([per_task[t]["steps"][s] for t in per_task]) for s in range(refine_steps + 1)]

    baseline_pass = baseline_select = None
    if refine_steps:
        groups: dict[str, list[Attempt]] = {}
        for a in samples:
            groups.setdefault(a.task_id, []).append(a)
        counts = [(len(g), sum(hidden_of[a.attempt_id].passed for a in g)) for g in groups.values()]
        baseline_pass = mean_pass_at_k(counts, refine_steps + 1)
        select_rows = []
        for task_id, group in groups.items():
            group.sort(key=lambda a: a.sample_index)
            chunks = [group[i:i + refine_steps + 1] for i in range(0, len(group), refine_steps + 1)]
            row = []
            for chunk in chunks:  # the first sample that passes the seen tests (else the last one) is the answer
                chosen = next((a for a in chunk if (seen[a.attempt_id] is None or seen[a.attempt_id].passed)),
                              chunk[-1])
                row.append(hidden_of[chosen.attempt_id].passed)
            select_rows.append(row)
            per_task[task_id]["baseline_hidden_passes"] = sum(hidden_of[a.attempt_id].passed for a in group)
        baseline_select = _rate(select_rows)

    return MultiStepResult(
        task_set=task_set, adapter_version=version, n_samples=n, refine_steps=refine_steps,
        temperature=sampling.temperature, n_tasks=len(tasks),
        tasks_with_seen_tests=sum(t.seen_tests is not None for t in tasks), pass_at_k=one_step.pass_at_k,
        pass1_by_step=pass1_by_step, refined_by_step=refined_by_step, baseline_samples_per_task=budget,
        baseline_pass_at_k=baseline_pass, baseline_seen_select_pass1=baseline_select,
        wall_s=time.monotonic() - start, per_task=per_task)


def table(result: MultiStepResult, title: str | None = None) -> Any:
    """The result as a rich table."""
    from rich.table import Table

    t = Table(title=title or f"{result.task_set}: {result.n_tasks} tasks, n={result.n_samples}, "
                             f"T={result.temperature}, adapter v{result.adapter_version}")
    t.add_column("measure")
    t.add_column("value", justify="right")
    for k, v in result.pass_at_k.items():
        t.add_row(f"pass@{k} (one-step)", f"{v:.3f}")
    for step, v in enumerate(result.pass1_by_step):
        if step:
            t.add_row(f"pass@1 after refine step {step} ({result.refined_by_step[step - 1]} refined)", f"{v:.3f}")
    if result.baseline_pass_at_k is not None:
        k = result.refine_steps + 1
        t.add_row(f"resampling pass@{k} ({result.baseline_samples_per_task} samples/task)",
                  f"{result.baseline_pass_at_k:.3f}")
        t.add_row(f"resampling, first of {k} passing the seen tests: pass@1",
                  f"{result.baseline_seen_select_pass1:.3f}")
    t.add_row("tasks with seen tests", f"{result.tasks_with_seen_tests}/{result.n_tasks}")
    t.add_row("wall time (s)", f"{result.wall_s:.1f}")
    return t

"""Training examples for each method of the PERsD paper, as pure functions over records.

- `stand`: every task -> its reference solution (standard distillation, no student involved);
- `inpd`: the task of a failed attempt -> the reference (input-personalised: only what the student fails);
- `persd`: the task of a failed attempt -> the teacher's verified refinement of that very attempt;
- `persd_refine`: the task + the student's wrong code + its execution feedback -> the verified refinement
  (`prompts.refine_prompt`, the shape of PERsD's two-step inference);
- `persd_combine`: both the `persd` and the `persd_refine` example.

The online loop and the offline `collect` command build examples with these same functions.

Invariants: a prompt is rendered exactly as the student sees it (`prompts.render` with the student's chat
template and prompt format) and a completion is `prompts.target_text(...)`, the loss being on the
completion only; an attempt that passed, a refinement that did not pass, and a task without a reference
(for stand/inpd) yield no example; an example's `method` names its shape (`persd` or `persd_refine`, also
under persd_combine); `example_id` is a content address of method, lineage, prompt and completion, so the
same example derived again (e.g. on resume) has the same id.
"""

from __future__ import annotations

from collections.abc import Iterable

from persd_online.prompts import ChatTemplate, Messages, attempt_prompt, refine_prompt, render, target_text
from persd_online.records import Attempt, Example, Method, PromptFormat, Verdict
from persd_online.tasks import Task
from persd_online.teacher_cache import content_address
from persd_online.verify import RefinementOutcome

_SHAPES: dict[str, tuple[Method, ...]] = {
    "inpd": ("inpd",),
    "persd": ("persd",),
    "persd_refine": ("persd_refine",),
    "persd_combine": ("persd", "persd_refine"),
}


def stand_examples(tasks: Iterable[Task], tokenizer: ChatTemplate, fmt: PromptFormat) -> list[Example]:
    """One `stand` example per task that has a reference solution."""
    return [_example("stand", task, attempt_prompt(task, fmt), task.reference, tokenizer, fmt)
            for task in tasks if task.reference is not None]


def attempt_examples(method: Method, task: Task, attempt: Attempt, verdict: Verdict,
                     outcome: RefinementOutcome | None, tokenizer: ChatTemplate,
                     fmt: PromptFormat) -> list[Example]:
    """The examples one scored attempt yields under `method` (`outcome`: its refinement, if any).

    inpd needs no outcome; the persd methods label only `outcome.verified`, the refinement that passed.
    """
    if method not in _SHAPES:
        raise ValueError(f"{method!r} examples come from tasks, not attempts: use stand_examples")
    if not (attempt.task_id == task.task_id and verdict.subject_id == attempt.attempt_id
            and (outcome is None or outcome.attempt_id == attempt.attempt_id)):
        raise ValueError(f"task, verdict and outcome do not all belong to attempt {attempt.attempt_id!r}")
    if verdict.passed:
        return []
    if method == "inpd":
        if task.reference is None:
            return []
        return [_example("inpd", task, attempt_prompt(task, fmt), task.reference, tokenizer, fmt, attempt)]
    label = outcome.verified if outcome is not None else None
    if label is None:
        return []
    prompts = {"persd": attempt_prompt(task, fmt),
               "persd_refine": refine_prompt(task, attempt.program, verdict.feedback, fmt)}
    return [_example(shape, task, prompts[shape], label.program, tokenizer, fmt, attempt,
                     label.teacher_call_id) for shape in _SHAPES[method]]


def _example(method: Method, task: Task, prompt: Messages | str, program: str, tokenizer: ChatTemplate,
             fmt: PromptFormat, attempt: Attempt | None = None,
             teacher_call_id: str | None = None) -> Example:
    """An example with its lineage and a content-addressed id."""
    fields = {
        "method": method,
        "task_id": task.task_id,
        "prompt": render(prompt, tokenizer),
        "completion": target_text(task, program, fmt),
        "source_attempt_id": attempt.attempt_id if attempt else None,
        "adapter_version": attempt.adapter_version if attempt else None,
        "teacher_call_id": teacher_call_id,
    }
    return Example(example_id=content_address(fields)[:32], **fields)

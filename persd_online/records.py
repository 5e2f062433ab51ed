"""The records that flow between actors, each carrying its lineage.

An `Attempt` says which task, sample, adapter version and prompt format produced it; a `Verdict` names the
program it scored; a `Refinement` names its attempt, teacher call and round; an `Example` names its method,
task, source attempt, the adapter version behind that attempt and the teacher call. Lineage is what makes
staleness bounds, resume without double-training, and honest reports possible.

Records are immutable pydantic models: they cross Ray's object store by pickling and land in
`events.jsonl` through `model_dump_json()`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Method = Literal["stand", "inpd", "persd", "persd_refine", "persd_combine"]
PromptFormat = Literal["chat", "completion"]
Status = Literal["passed", "failed", "error", "timeout", "memory", "crashed", "sandbox_error"]


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Attempt(_Record):
    """One sample of the student on one task."""

    attempt_id: str
    task_id: str
    sample_index: int
    adapter_version: int = Field(description="Adapter version that generated it (0: the zero-effect adapter).")
    prompt_format: PromptFormat
    completion: str = Field(description="The raw generated text.")
    program: str = Field(description="The extracted program that is executed.")
    prompt_tokens: int
    completion_tokens: int


class Verdict(_Record):
    """The sandbox's judgement of one program (an attempt's or a refinement's)."""

    subject_id: str = Field(description="The attempt_id or refinement_id that was executed.")
    status: Status
    passed: bool
    feedback: str = Field(description="PERsD feedback for the first failing test, empty on a pass.")
    duration_s: float


class Refinement(_Record):
    """A teacher's correction of a failed attempt."""

    refinement_id: str
    attempt_id: str
    task_id: str
    round: int = Field(description="1 for the first refinement, 2+ for retries with new feedback.")
    teacher_kind: str
    teacher_call_id: str = Field(description="Content address of the request (also the cache key).")
    program: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    cached: bool = False
    personalised: bool | None = Field(None, description="None: unknown (an LLM teacher); True: a verified "
                                      "edit of the student's own attempt; False: the reference as a fallback.")


class Example(_Record):
    """One training example: a prompt and a completion, loss on the completion only."""

    example_id: str
    method: Method
    task_id: str
    prompt: str = Field(description="Rendered prompt text, as the student sees it.")
    completion: str = Field(description="Target text the loss is taken on.")
    source_attempt_id: str | None = None
    adapter_version: int | None = Field(None, description="Version behind the source attempt (staleness).")
    teacher_call_id: str | None = None


class AdapterVersion(_Record):
    """A published LoRA adapter version."""

    version: int
    path: str
    step: int
    examples_seen: int
    loss: float | None = None
    example_ids: list[str] = Field(default_factory=list)

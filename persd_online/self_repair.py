"""The `self` teacher tier: the student repairs its own failed attempt.

The student gets its own failing code and the execution feedback in the refine format
(`prompts.refine_prompt`, the prompt of PERsD-refine inference) and samples `samples` repairs with its
current adapter. Each distinct repair runs in the sandbox, all in one batch; the first that passes is the
label: verified and fully personalised (the student's own distribution made it), at no teacher cost. Its
price is student generation time, the loop's scarcest resource on CPU, so the cascade measures this tier's
verified rate and skips it while the rate stays below its floor (`cascade.should_try`).

Invariants: a proposal passed its tests in the sandbox before it is returned (the cascade verifies it once
more); one round only; it charges no tokens or dollars (the student's tokens are counted here, apart).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

from persd_online.engine import Generation
from persd_online.prompts import Messages, extract_program, refine_prompt
from persd_online.records import PromptFormat, Refinement
from persd_online.tasks import Task
from persd_online.teacher import refinement_record
from persd_online.teacher_cache import content_address
from persd_online.verify import Executor

Generate = Callable[[Messages | str, int], Awaitable[list[Generation]]]
"""`n` samples of one prompt from the student's current adapter, at the tier's temperature."""


@dataclass
class SelfRepairCounts:
    calls: int = 0
    samples: int = 0
    repaired: int = 0
    student_prompt_tokens: int = 0
    student_completion_tokens: int = 0


class SelfRepair:
    """A `Teacher` that asks the student itself (see the module docstring)."""

    kind = "self"

    def __init__(self, generate: Generate, executor: Executor, prompt_format: PromptFormat, samples: int,
                 state: dict[str, Any] | None = None) -> None:
        self.generate = generate
        self.executor = executor
        self.prompt_format = prompt_format
        self.samples = samples
        self.counts = SelfRepairCounts(**(state or {}))

    async def propose(self, task: Task, attempt_id: str, program: str, feedback: str,
                      round_no: int) -> Refinement | None:
        """The first of `samples` repairs that passes its tests, or None (round 1 only)."""
        if round_no > 1:
            return None
        generations = await self.generate(refine_prompt(task, program, feedback, self.prompt_format), self.samples)
        self._count(generations)
        repairs = list(dict.fromkeys(extract_program(task, g.text, self.prompt_format) for g in generations))
        call_id = content_address({"tier": self.kind, "attempt_id": attempt_id, "repairs": repairs})
        verdicts = await asyncio.gather(*(self.executor.run(task, r, f"{call_id[:24]}-{i}")
                                          for i, r in enumerate(repairs)))
        passing = [r for r, v in zip(repairs, verdicts, strict=True) if v.passed]
        if not passing:
            return None
        self.counts.repaired += 1
        return refinement_record(task, attempt_id, round_no, self.kind, call_id, passing[0], personalised=True)

    def _count(self, generations: list[Generation]) -> None:
        self.counts.calls += 1
        self.counts.samples += len(generations)
        self.counts.student_prompt_tokens += generations[0].prompt_tokens if generations else 0  # one prompt
        self.counts.student_completion_tokens += sum(g.completion_tokens for g in generations)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "model": "the student itself (its current adapter)", **asdict(self.counts)}

    def state(self) -> dict[str, Any]:
        return asdict(self.counts)

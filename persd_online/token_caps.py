"""Per-task caps on generated tokens, from the length of each task's reference solution.

A held-out evaluation on a CPU engine ends when its slowest generation does, and the slowest ones are those
that never stop: a cap bounds them. The cap of a task is `factor` times its reference's length in the prompt
format's target shape (`prompts.target_text`, tokenised by the student's tokenizer) plus `margin` tokens,
and never more than the configured `max_new_tokens`. A task without a reference gets `max_new_tokens`.

Invariants: caps depend only on the tasks, the tokenizer and the settings (never on the adapter being
evaluated), so every version of every arm is scored under the same limits; `max_new_tokens` is an upper bound.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from persd_online.prompts import target_text
from persd_online.records import PromptFormat
from persd_online.tasks import Task


def token_caps(tasks: Sequence[Task], tokenizer: Any, fmt: PromptFormat, *, factor: float | None,
               margin: int, max_new_tokens: int) -> list[int]:
    """Each task's generation cap (see the module docstring); `factor` None: `max_new_tokens` for all."""
    caps = []
    for task in tasks:
        if factor is None or task.reference is None:
            caps.append(max_new_tokens)
            continue
        length = len(tokenizer(target_text(task, task.reference, fmt), add_special_tokens=False).input_ids)
        caps.append(min(max_new_tokens, math.ceil(factor * length) + margin))
    return caps

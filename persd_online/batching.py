"""Training examples as token ids with completion-only labels, and micro-batches planned by a token budget.

An example is encoded as the student sees it (`Student._encode`): a rendered chat prompt already holds its
special tokens, a plain completion prompt gets the tokenizer's usual ones. The completion is followed by
the end-of-turn token in the chat format, so the student learns to stop. Labels are `IGNORE` on every
prompt token: the loss is taken on the completion only.

Micro-batches are planned so that (rows x longest row) stays within `max_batch_tokens`: examples are sorted
by length, so each micro-batch pads little, and a step's examples are spread over as many micro-batches as
the budget needs (their gradients accumulate into one optimizer step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from persd_online.records import Example, PromptFormat

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    """One example as token ids; `labels[i]` is `IGNORE` where no loss is taken."""

    example: Example
    input_ids: list[int]
    labels: list[int]
    truncated: bool

    @property
    def completion_tokens(self) -> int:
        return sum(label != IGNORE for label in self.labels)


def encode(example: Example, tokenizer: Any, fmt: PromptFormat, max_seq_len: int) -> Encoded:
    """Token ids and completion-only labels of `example`, cut to `max_seq_len` from the prompt's start."""
    prompt = tokenizer(example.prompt, add_special_tokens=fmt == "completion").input_ids
    completion = tokenizer(example.completion, add_special_tokens=False).input_ids
    if fmt == "chat" and tokenizer.eos_token_id is not None:
        completion = [*completion, tokenizer.eos_token_id]
    ids = prompt + completion
    labels = [IGNORE] * len(prompt) + completion
    truncated = len(ids) > max_seq_len
    if truncated:  # keep the completion whole where it fits: the prompt's start matters least
        ids, labels = ids[-max_seq_len:], labels[-max_seq_len:]
    return Encoded(example, ids, labels, truncated)


def plan_micro_batches(items: Sequence[Encoded], max_batch_tokens: int) -> list[list[Encoded]]:
    """Groups of `items`, sorted by length, each within `max_batch_tokens` once padded (a longer single
    example forms a group of its own)."""
    groups: list[list[Encoded]] = []
    for item in sorted(items, key=lambda e: len(e.input_ids)):
        group = groups[-1] if groups else None
        if group is not None and (len(group) + 1) * len(item.input_ids) <= max_batch_tokens:
            group.append(item)
        else:
            groups.append([item])
    return groups


def collate(group: Sequence[Encoded], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `labels` tensors of one micro-batch."""
    width = max(len(e.input_ids) for e in group)
    ids = torch.full((len(group), width), pad_id, dtype=torch.long)
    labels = torch.full((len(group), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(group), width), dtype=torch.long)
    for row, item in enumerate(group):
        n = len(item.input_ids)
        ids[row, :n] = torch.tensor(item.input_ids)
        labels[row, :n] = torch.tensor(item.labels)
        mask[row, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}

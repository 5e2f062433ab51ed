"""Stopping a generation that repeats itself: the rule, and the vLLM logits processor that applies it.

A small student sometimes falls into a loop (the same line, the same few tokens) and runs to
`max_new_tokens`; on a CPU engine one such generation is the tail of a whole evaluation. The rule: a
generation is degenerate when its last tokens are one block of `period` tokens repeated `repeats` times in a
row, for some period in 1..`MAX_PERIOD`, covering at least `MIN_SPAN` tokens. Such a generation is ended with
its end-of-sequence token (finish reason "stop"): the program extracted from it is what it had written.

Invariants: the rule looks only at the generated tokens (never the prompt); a generation that does not
repeat is never touched, so greedy outputs that end normally are bit-identical with and without it; the check
runs every `CHECK_EVERY` tokens and costs at most `MAX_PERIOD` list-slice comparisons per request.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

MAX_PERIOD = 48  # tokens in the longest repeated block looked for (about two lines of code)
MIN_REPEATS = 4  # a block seen this many times in a row...
MIN_SPAN = 64  # ...covering at least this many tokens
CHECK_EVERY = 8  # tokens between checks of one request

if TYPE_CHECKING:
    import torch


def repeats_itself(tokens: Sequence[int], max_period: int = MAX_PERIOD, min_repeats: int = MIN_REPEATS,
                   min_span: int = MIN_SPAN) -> bool:
    """True when the tail of `tokens` is one block repeated `min_repeats` times covering `min_span` tokens."""
    tokens = list(tokens)
    for period in range(1, max_period + 1):
        repeats = max(min_repeats, -(-min_span // period))
        span = period * repeats
        if span > len(tokens):
            break
        tail = tokens[-span:]
        if tail[period:] == tail[:-period]:  # shifting by one period leaves it unchanged: periodic
            return True
    return False


def make_processor() -> type:
    """The vLLM v1 logits processor class (built on first use: importing vLLM is the engine process's job)."""
    import torch
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

    class RepetitionStop(LogitsProcessor):
        """Forces the end-of-sequence token for requests whose output `repeats_itself`."""

        def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
            self.requests: dict[int, tuple[list[int], int]] = {}  # batch index -> (output ids, eos id)
            self.ended: set[int] = set()

        def is_argmax_invariant(self) -> bool:
            return False  # it forces a token

        def update_state(self, batch_update: BatchUpdate | None) -> None:
            if batch_update:
                for index in batch_update.removed:
                    self.requests.pop(index, None)
                for index, params, _, output in batch_update.added:
                    stops = sorted(params.all_stop_token_ids or ())
                    if stops:
                        self.requests[index] = (output, stops[0])
                    else:
                        self.requests.pop(index, None)
                for a, b, direction in batch_update.moved:
                    entry_a, entry_b = self.requests.pop(a, None), self.requests.pop(b, None)
                    if entry_a is not None:
                        self.requests[b] = entry_a
                    if entry_b is not None and direction.name == "SWAP":
                        self.requests[a] = entry_b
            self.ended = {index for index, (output, _) in self.requests.items()
                          if len(output) >= MIN_SPAN and len(output) % CHECK_EVERY == 0 and repeats_itself(output)}

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            for index in self.ended:
                if index < logits.shape[0]:
                    eos = self.requests[index][1]
                    kept = logits[index, eos].clone()
                    logits[index].fill_(float("-inf"))
                    logits[index, eos] = kept if torch.isfinite(kept) else 0.0
            return logits

    return RepetitionStop

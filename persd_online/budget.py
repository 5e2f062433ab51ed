"""Accounting of one teacher tier's calls: tokens, cost, cache hits, and the hard budget that stops paid calls.

Invariants:
- `check()` runs before every paid call, after the call has its concurrency slot, so calls that overshoot
  the budget are at most the ones already in flight when it was reached;
- a cache hit costs nothing: it is counted in `cache_hits` and never charged or refused;
- `state()` holds only counters, never limits or prices: a resumed run restores what was spent and applies
  the limits of its own (possibly raised) configuration.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from persd_online.config import OpenAITier


class BudgetExhausted(RuntimeError):
    """A tier's token or cost budget is spent; it makes no further paid calls."""


@dataclass
class Spend:
    """What the teacher has used so far (the checkpointable part of a ledger)."""

    calls: int = 0
    cache_hits: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0


class TeacherBudget:
    """Counts a tier's usage against its prices and limits (none: free and unlimited, e.g. the oracle)."""

    def __init__(self, config: OpenAITier | None = None, state: dict[str, Any] | None = None) -> None:
        self._config = config
        self.spend = Spend()
        if state is not None:
            self.restore(state)

    def exhausted(self) -> str | None:
        """Why the budget is spent, or None while calls may still be paid for."""
        if self._config is None:
            return None
        used_tokens = self.spend.prompt_tokens + self.spend.completion_tokens
        if self._config.budget_tokens is not None and used_tokens >= self._config.budget_tokens:
            return f"{used_tokens} tokens used of budget_tokens={self._config.budget_tokens}"
        if self._config.budget_usd is not None and self.spend.cost_usd >= self._config.budget_usd:
            return f"${self.spend.cost_usd:.4f} spent of budget_usd={self._config.budget_usd}"
        return None

    def check(self) -> None:
        """Raise `BudgetExhausted` if no further paid call may start."""
        reason = self.exhausted()
        if reason is not None:
            raise BudgetExhausted(f"teacher budget exhausted: {reason}")

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """The price in USD of a call with this usage."""
        if self._config is None:
            return 0.0
        return (prompt_tokens * self._config.price_per_prompt_token
                + completion_tokens * self._config.price_per_completion_token)

    def charge(self, prompt_tokens: int, completion_tokens: int) -> float:
        """Record one paid call and return its cost in USD."""
        cost = self.cost(prompt_tokens, completion_tokens)
        self.spend.calls += 1
        self.spend.prompt_tokens += prompt_tokens
        self.spend.completion_tokens += completion_tokens
        self.spend.cost_usd += cost
        return cost

    def count_hit(self) -> None:
        """Record one request answered without a paid call."""
        self.spend.cache_hits += 1

    def count_retry(self) -> None:
        """Record one retried request (a transient failure that was tried again)."""
        self.spend.retries += 1

    def state(self) -> dict[str, Any]:
        """The counters, for a checkpoint."""
        return asdict(self.spend)

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's counters; unknown or missing keys are an error, not a silent reset."""
        expected = {f.name for f in fields(Spend)}
        if set(state) != expected:
            raise ValueError(f"teacher budget state has keys {sorted(state)}, expected {sorted(expected)}")
        self.spend = Spend(**state)

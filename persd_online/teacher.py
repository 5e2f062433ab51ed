"""The teacher: PERsD refinements of the student's own failed attempts, kept only if they pass the tests.

A teacher tier implements `Teacher` (`cascade.py` tries the configured tiers in order). Here are the two
that need no student: `OpenAITeacher` sends the task, the student's wrong code and its execution feedback to
any OpenAI-compatible endpoint and asks for the corrected code closest to the student's
(`prompts.teacher_refinement_messages`); `ReferenceOracle` (`kind: reference_oracle`) answers with the task's
reference solution: an oracle baseline (InpD), not PERsD. `refine_and_verify` runs up to 1 + `refine_rounds`
rounds of one teacher through an `Executor`.

Failures are distinct so the loop can react to each:
- `TeacherConfigError`: the endpoint rejects the configuration (bad key, unknown model, bad request): stop;
- `TeacherUnavailable`: transient failures (429, 5xx, timeouts, dropped connections) outlasted
  `max_retries`: pause refinement and retry later;
- `budget.BudgetExhausted`: the tier's token or cost budget is spent: the cascade stops using that tier.

Invariants: the API key is read from the environment variable named by the tier's `api_key_env` and is
never logged or stored; the openai client makes no retries of its own (ours are the only ones); at most
`max_concurrency` requests are in flight; with a cache, an identical request is paid for at most once,
also when identical requests arrive concurrently.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from typing import Any, Protocol

from openai import APIConnectionError, APIStatusError, AsyncOpenAI
from openai.types.chat import ChatCompletion

from persd_online.budget import TeacherBudget
from persd_online.config import OpenAITier, OracleTier
from persd_online.prompts import extract_program, teacher_refinement_messages
from persd_online.records import Attempt, Refinement, Verdict
from persd_online.tasks import Task
from persd_online.teacher_cache import Json, TeacherCache, content_address
from persd_online.verify import Executor, RefinementOutcome, VerifiedRound

log = logging.getLogger(__name__)

PLACEHOLDER_KEY = "EMPTY"
_RETRYABLE_STATUS = frozenset({408, 409, 429})  # plus every 5xx
_HINTS = {
    401: "set ${env} to a key this endpoint accepts (it is read from the environment, never from config)",
    403: "the key is valid but lacks access to this model: check the account's permissions",
    404: "check the tier's model against the models the server serves (GET <base_url>/models) and that "
         "its base_url ends in /v1",
}
_DEFAULT_HINT = ("the server rejected the request: check teacher.max_tokens and teacher.temperature "
                 "against the model's limits")


class TeacherConfigError(RuntimeError):
    """The endpoint rejects the teacher's configuration; retrying cannot help, the run should stop."""


class TeacherUnavailable(RuntimeError):
    """Transient failures outlasted the retries; refinement should pause and resume later."""


class Teacher(Protocol):
    """Proposes a refinement of a failed program; counts what it spends."""

    kind: str

    async def propose(self, task: Task, attempt_id: str, program: str, feedback: str,
                      round_no: int) -> Refinement | None:
        """A refinement of `program` (which failed with `feedback`), or None if this teacher has none."""
        ...

    def describe(self) -> dict[str, Any]:
        """Kind, model and spend, for run summaries."""
        ...

    def state(self) -> dict[str, Any]:
        """The spend counters, for a checkpoint (restore by passing it to the constructor)."""
        ...


def refinement_record(task: Task, attempt_id: str, round_no: int, kind: str, call_id: str, program: str,
                      **usage: Any) -> Refinement:
    """A refinement record whose id is derived from its lineage (the same call for the same round)."""
    refinement_id = content_address({"attempt_id": attempt_id, "round": round_no, "teacher_call_id": call_id})
    return Refinement(refinement_id=refinement_id[:32], attempt_id=attempt_id, task_id=task.task_id,
                      round=round_no, teacher_kind=kind, teacher_call_id=call_id, program=program, **usage)


class OpenAITeacher:
    """A teacher behind any OpenAI-compatible chat completions endpoint."""

    kind = "openai"

    def __init__(self, config: OpenAITier, cache: TeacherCache | None,
                 state: dict[str, Any] | None = None) -> None:
        self._config = config
        self._cache = cache
        self._ledger = TeacherBudget(config, state)
        api_key = os.environ.get(config.api_key_env)
        self._key_set = bool(api_key)
        if not self._key_set:
            log.info("$%s is not set: sending the placeholder key %r (enough for local servers)",
                     config.api_key_env, PLACEHOLDER_KEY)
        self._client = AsyncOpenAI(base_url=config.base_url, api_key=api_key or PLACEHOLDER_KEY,
                                   timeout=config.timeout_s, max_retries=0)
        self._slots = asyncio.Semaphore(config.max_concurrency)
        self._in_flight: dict[str, asyncio.Future[Json]] = {}
        self._rng = random.Random()
        self._usage_missing_logged = False

    async def propose(self, task: Task, attempt_id: str, program: str, feedback: str,
                      round_no: int) -> Refinement:
        """The endpoint's correction of `program`.

        Raises TeacherConfigError, TeacherUnavailable or BudgetExhausted (see the module docstring).
        """
        reference = task.reference if self._config.include_reference else None
        request = {
            "model": self._config.model,
            "messages": teacher_refinement_messages(task, program, feedback, reference),
            "temperature": self._config.temperature,
            "max_tokens": self._config.max_tokens,
        }
        call_id, response, cached = await self._complete(request)
        usage = {"prompt_tokens": 0, "completion_tokens": 0} if cached else response["usage"]
        prompt_tokens, completion_tokens = usage["prompt_tokens"], usage["completion_tokens"]
        return refinement_record(task, attempt_id, round_no, self.kind, call_id,
                           extract_program(task, response["content"], "chat"),
                           prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                           cost_usd=self._ledger.cost(prompt_tokens, completion_tokens), cached=cached)

    def describe(self) -> dict[str, Any]:
        """Kind, model, endpoint, limits and spend (never the key)."""
        return {"kind": self.kind, "model": self._config.model, "base_url": self._config.base_url,
                "budget_tokens": self._config.budget_tokens, "budget_usd": self._config.budget_usd,
                **self._ledger.state()}

    def state(self) -> dict[str, Any]:
        """The spend counters, for a checkpoint."""
        return self._ledger.state()

    async def _complete(self, request: Json) -> tuple[str, Json, bool]:
        """(call id, response, cached): from the cache, from an identical request in flight, or paid for."""
        call_id = content_address(request)
        if self._cache is None:
            return call_id, await self._fetch(request), False
        response = self._cache.get(call_id, request)
        if response is None and call_id in self._in_flight:
            response = await asyncio.shield(self._in_flight[call_id])
        if response is not None:
            self._ledger.count_hit()
            return call_id, response, True
        fetch = asyncio.ensure_future(self._fetch(request))
        self._in_flight[call_id] = fetch
        try:
            response = await asyncio.shield(fetch)
        finally:
            del self._in_flight[call_id]
        self._cache.put(call_id, request, response)
        return call_id, response, False

    async def _fetch(self, request: Json) -> Json:
        """One paid request: waits for a slot, checks the budget, sends with retries, charges the usage.

        The slot is held through retries, so a rate-limited endpoint never sees more than max_concurrency
        requests at once.
        """
        async with self._slots:
            self._ledger.check()
            completion = await self._send(request)
            usage = completion.usage
            if usage is None and not self._usage_missing_logged:
                self._usage_missing_logged = True
                log.warning("the teacher endpoint reports no token usage: tokens and cost count as 0, "
                            "so the tier's budget_tokens/budget_usd cannot stop calls")
            tokens = {"prompt_tokens": usage.prompt_tokens if usage else 0,
                      "completion_tokens": usage.completion_tokens if usage else 0}
            self._ledger.charge(**tokens)
        choice = completion.choices[0] if completion.choices else None
        return {
            "content": (choice.message.content if choice else None) or "",
            "finish_reason": choice.finish_reason if choice else None,
            "usage": tokens,
        }

    async def _send(self, request: Json) -> ChatCompletion:
        """The completion, retrying transient failures with exponential backoff and jitter."""
        attempts = self._config.max_retries + 1
        for attempt in range(attempts):
            try:
                return await self._client.chat.completions.create(**request)
            except APIStatusError as exc:
                if exc.status_code not in _RETRYABLE_STATUS and exc.status_code < 500:
                    raise TeacherConfigError(self._rejection(exc)) from None
                failure, retry_after = f"HTTP {exc.status_code}: {_server_message(exc)}", _retry_after(exc)
            except APIConnectionError as exc:  # also APITimeoutError
                cause = f" ({exc.__cause__})" if exc.__cause__ else ""
                failure, retry_after = f"{type(exc).__name__}: {exc}{cause}", None
            if attempt + 1 < attempts:
                delay = self._backoff(attempt, retry_after)
                self._ledger.count_retry()
                log.warning("teacher request failed (%s); retry %d/%d in %.2f s",
                            failure, attempt + 1, self._config.max_retries, delay)
                await asyncio.sleep(delay)
        raise TeacherUnavailable(
            f"teacher endpoint {self._config.base_url} (model {self._config.model!r}) failed {attempts} "
            f"time(s); last failure: {failure}. Pause refinement and try again later."
        )

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with equal jitter, at least the server's Retry-After, at most backoff_max_s."""
        ceiling = min(self._config.backoff_max_s, self._config.backoff_initial_s * 2**attempt)
        delay = ceiling / 2 + self._rng.uniform(0, ceiling / 2)
        return min(max(delay, retry_after or 0.0), self._config.backoff_max_s)

    def _rejection(self, exc: APIStatusError) -> str:
        """The message of a TeacherConfigError: endpoint, model, the server's words and how to fix it."""
        hint = _HINTS.get(exc.status_code, _DEFAULT_HINT).format(env=self._config.api_key_env)
        if exc.status_code == 401 and not self._key_set:
            hint = f"${self._config.api_key_env} is not set; " + hint
        return (f"teacher endpoint {self._config.base_url} rejected model {self._config.model!r} with "
                f"HTTP {exc.status_code}: {_server_message(exc)}. Fix: {hint}.")


def _server_message(exc: APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return body["message"]
    return str(body) if body else exc.message


def _retry_after(exc: APIStatusError) -> float | None:
    """The server's Retry-After in seconds, if it sent one as a number."""
    try:
        return float(exc.response.headers.get("retry-after", ""))
    except ValueError:
        return None


class ReferenceOracle:
    """An offline teacher that returns the task's reference solution: an oracle, not PERsD."""

    kind = "reference_oracle"

    def __init__(self, config: OracleTier, state: dict[str, Any] | None = None) -> None:
        self._ledger = TeacherBudget(None, state)
        log.warning("teacher tier reference_oracle: refinements are the tasks' reference solutions, not "
                    "corrections of the student's own code. This is an ORACLE baseline, NOT PERsD.")

    async def propose(self, task: Task, attempt_id: str, program: str, feedback: str,
                      round_no: int) -> Refinement | None:
        """The reference solution in round 1; None without one, and in later rounds (it has one answer)."""
        if task.reference is None or round_no > 1:
            return None
        self._ledger.check()
        self._ledger.charge(0, 0)
        answer = {"teacher": self.kind, "task_id": task.task_id, "reference": task.reference}
        call_id = content_address(answer)
        return refinement_record(task, attempt_id, round_no, self.kind, call_id, task.reference)

    def describe(self) -> dict[str, Any]:
        """Kind, what it returns, and its call count."""
        return {"kind": self.kind, "model": "task reference solutions (oracle, not PERsD)",
                **self._ledger.state()}

    def state(self) -> dict[str, Any]:
        """The call counters, for a checkpoint."""
        return self._ledger.state()


async def refine_and_verify(teacher: Teacher, executor: Executor, task: Task, attempt: Attempt,
                            verdict: Verdict, extra_rounds: int) -> RefinementOutcome:
    """Refine a failed attempt, verifying each refinement; a failing one gets up to `extra_rounds` more
    rounds, each refining the previous refinement with its new feedback.

    Teacher errors propagate and discard this attempt's earlier failing rounds (they hold no label); with
    a cache, refining the attempt again replays the paid rounds for free.
    """
    if verdict.passed or verdict.subject_id != attempt.attempt_id:
        raise ValueError(f"refine_and_verify needs the failing verdict of attempt {attempt.attempt_id!r}")
    rounds: list[VerifiedRound] = []
    program, feedback = attempt.program, verdict.feedback
    for round_no in range(1, extra_rounds + 2):
        refinement = await teacher.propose(task, attempt.attempt_id, program, feedback, round_no)
        if refinement is None:
            break
        check = await executor.run(task, refinement.program, refinement.refinement_id)
        rounds.append(VerifiedRound(refinement=refinement, verdict=check))
        if check.passed:
            break
        program, feedback = refinement.program, check.feedback
    return RefinementOutcome(attempt_id=attempt.attempt_id, task_id=task.task_id, rounds=rounds)

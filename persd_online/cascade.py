"""The teacher cascade: each failed attempt goes down `teacher.tiers` until one tier's refinement passes.

Tiers are tried in their configured order, cheapest first: `self` (the student repairs its own attempt),
`reference_repair` (the smallest verified edit of the attempt toward the reference), any number of `openai`
tiers (a cheap model, then a strong one), `reference_oracle` (the reference itself: the InpD baseline). Each
tier refines through `teacher.refine_and_verify`, so a label is kept only if it passes the tests.

Each tier keeps its own figures (`TierStats`: failures offered, refinement calls, verified labels, tokens,
cost). A tier whose verified rate stays below its `min_verified_rate` is skipped (`should_try`): after
`warmup` tries, only every `probe_every`-th failure that reaches it is still tried, since training changes
the rate. A tier's budget stops only that tier (`BudgetExhausted` marks it spent and the failure goes on
down); the cascade raises `BudgetExhausted` only when every tier that could be tried is spent.

A try counts when it starts, so the floor holds under concurrency: with many failures refined at once, a
tier still gets only `warmup` tries before its rate decides (a try under way counts as not verified yet).

Invariants: tiers are tried in order and the cascade stops at the first verified refinement; the outcome's
rounds are every tried tier's rounds in order, so at most the last passes; a skipped or spent tier makes no
call; a tier's figures count only its own calls.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.actor import ActorHandle

from persd_online.budget import BudgetExhausted
from persd_online.config import ConfigError, OracleTier, ReferenceRepairTier, SelfRepairTier, TeacherConfig
from persd_online.config import Tier as TierConfig
from persd_online.engine import Generation, Sampling
from persd_online.phase_gate import passing
from persd_online.prompts import Messages
from persd_online.records import Attempt, PromptFormat, Verdict
from persd_online.self_repair import Generate, SelfRepair
from persd_online.tasks import Task
from persd_online.teacher import OpenAITeacher, ReferenceOracle, Teacher, refine_and_verify
from persd_online.teacher_cache import TeacherCache
from persd_online.verify import Executor, RefinementOutcome, VerifiedRound

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TierPolicy:
    """When a tier is worth trying, and how many extra rounds it gets."""

    min_verified_rate: float = 0.0
    warmup: int = 20
    probe_every: int = 10
    extra_rounds: int = 0


@dataclass
class TierStats:
    """One tier's figures (checkpointed)."""

    offered: int = 0  # failures that reached the tier
    tried: int = 0  # ... and were refined by it
    skipped: int = 0  # ... and were passed on below its floor
    calls: int = 0  # refinement rounds
    verified: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    spent: bool = False

    @property
    def verified_rate(self) -> float:
        return self.verified / self.tried if self.tried else 1.0


def should_try(stats: TierStats, policy: TierPolicy) -> bool:
    """Whether the next failure that reaches this tier is refined by it (see the module docstring)."""
    if stats.spent:
        return False
    if stats.tried < policy.warmup or stats.verified_rate >= policy.min_verified_rate:
        return True
    return stats.offered % policy.probe_every == 0


@dataclass
class Tier:
    """A named teacher with its policy and figures."""

    name: str
    teacher: Teacher
    policy: TierPolicy = field(default_factory=TierPolicy)
    stats: TierStats = field(default_factory=TierStats)

    def record(self, rounds: list[VerifiedRound]) -> None:
        s = self.stats
        s.calls += len(rounds)
        s.verified += any(r.verdict.passed for r in rounds)
        for r in rounds:
            s.prompt_tokens += r.refinement.prompt_tokens
            s.completion_tokens += r.refinement.completion_tokens
            s.cost_usd += r.refinement.cost_usd


class Cascade:
    """Tiers tried in order for each failed attempt (see the module docstring)."""

    def __init__(self, tiers: list[Tier], executor: Executor) -> None:
        if not tiers:
            raise ValueError("teacher.tiers is empty: name at least one tier")
        names = [t.name for t in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"teacher.tiers names a tier twice: {names}; give openai tiers distinct names")
        self.tiers = tiers
        self.executor = executor

    async def refine(self, task: Task, attempt: Attempt, verdict: Verdict) -> RefinementOutcome:
        """Refine one failed attempt down the tiers; raises `BudgetExhausted` only when every tier is spent."""
        rounds: list[VerifiedRound] = []
        for tier in self.tiers:
            tier.stats.offered += 1
            if not should_try(tier.stats, tier.policy):
                tier.stats.skipped += not tier.stats.spent
                continue
            tier.stats.tried += 1  # counted when it starts: concurrent failures see the tries under way
            try:
                outcome = await refine_and_verify(tier.teacher, self.executor, task, attempt, verdict,
                                                  tier.policy.extra_rounds)
            except BudgetExhausted:
                tier.stats.tried -= 1
                tier.stats.spent = True
                continue
            tier.record(outcome.rounds)
            rounds += outcome.rounds
            if outcome.verified is not None:
                break
        if not rounds and all(t.stats.spent for t in self.tiers):
            raise BudgetExhausted("every teacher tier's budget is spent")
        return RefinementOutcome(attempt_id=attempt.attempt_id, task_id=task.task_id, rounds=rounds)

    def describe(self) -> dict[str, Any]:
        """Totals over the tiers (calls, tokens, cost), and each tier's figures and own description."""
        tiers = {t.name: asdict(t.stats) | {"verified_rate": round(t.stats.verified_rate, 4),
                                            "teacher": t.teacher.describe()} for t in self.tiers}
        total = {k: sum(t.stats.__dict__[k] for t in self.tiers)
                 for k in ("calls", "verified", "prompt_tokens", "completion_tokens", "cost_usd")}
        return {"kind": "cascade", "order": [t.name for t in self.tiers], **total, "tiers": tiers}

    def state(self) -> dict[str, Any]:
        """Each tier's figures and its teacher's own state, for a checkpoint."""
        return {t.name: {"stats": asdict(t.stats), "teacher": t.teacher.state()} for t in self.tiers}


def build_tier(tier: TierConfig, cache_dir: str | Path | None = None, executor: Executor | None = None,
               generate: Generate | None = None, prompt_format: PromptFormat = "chat",
               state: dict[str, Any] | None = None) -> Teacher:
    """The teacher of one configured tier (`state`: its own, from a checkpoint); `self` and `reference_repair`
    verify their candidates, so they need the `executor`."""
    if isinstance(tier, SelfRepairTier):
        if generate is None:
            raise ConfigError("teacher.tiers names `self`, which needs the student's engine: the online loop runs "
                              "it; for offline collection, configure tiers without `self`")
        return SelfRepair(generate, _needs(executor, tier), prompt_format, tier.samples, state)
    if isinstance(tier, ReferenceRepairTier):
        from persd_online.reference_repair import ReferenceRepair

        return ReferenceRepair(tier, _needs(executor, tier), state)
    if isinstance(tier, OracleTier):
        return ReferenceOracle(tier, state)
    if tier.cache and cache_dir is None:
        raise ValueError(f"tier {tier.label}: its cache is on: pass the cache directory (<run_dir>/teacher_cache)")
    return OpenAITeacher(tier, TeacherCache(cache_dir) if tier.cache and cache_dir else None, state)


def _needs(executor: Executor | None, tier: TierConfig) -> Executor:
    if executor is None:
        raise ValueError(f"tier {tier.label} verifies its candidates: pass the sandbox executor")
    return executor


def build_cascade(config: TeacherConfig, cache_dir: str | Path | None, executor: Executor,
                  generate: Generate | None = None, prompt_format: PromptFormat = "chat",
                  state: dict[str, Any] | None = None) -> Cascade:
    """The configured tiers, each restored from `state` (a `Cascade.state()`) where it has one."""
    state = state or {}
    tiers = []
    for tier in config.tiers:
        saved = state.get(tier.label, {})
        teacher = build_tier(tier, cache_dir, executor, generate, prompt_format, saved.get("teacher"))
        policy = TierPolicy(tier.min_verified_rate, tier.warmup, tier.probe_every,
                            getattr(tier, "refine_rounds", 0))
        tiers.append(Tier(tier.label, teacher, policy, TierStats(**saved["stats"]) if saved else TierStats()))
    return Cascade(tiers, executor)


class TeacherActor:
    """The cascade and its executor in one Ray actor; start it with `start_teacher_actor`."""

    def __init__(self, config: TeacherConfig, cache_dir: str | Path | None, executor: Executor,
                 student: ActorHandle | None = None, prompt_format: PromptFormat = "chat",
                 state: dict[str, Any] | None = None, gate: ActorHandle | None = None) -> None:
        generate = None
        if student is not None:
            temperature = next((t.temperature for t in config.tiers if isinstance(t, SelfRepairTier)), 0.0)
            generate = _student_generate(student, temperature, gate)
        self._cascade = build_cascade(config, cache_dir, executor, generate, prompt_format, state)

    async def refine(self, task: Task, attempt: Attempt, verdict: Verdict) -> RefinementOutcome:
        """Every tier's verified refinement rounds for one failed attempt (see `Cascade.refine`)."""
        return await self._cascade.refine(task, attempt, verdict)

    def describe(self) -> dict[str, Any]:
        """The tiers' figures and totals."""
        return self._cascade.describe()

    def state(self) -> dict[str, Any]:
        """The tiers' figures and teachers' counters, for a checkpoint."""
        return self._cascade.state()


def _student_generate(student: ActorHandle, temperature: float, gate: ActorHandle | None) -> Generate:
    """Samples of one prompt from the student actor's current adapter, at `temperature`; none while the student
    is down (the loop restarts it; the failure goes on to the next tier). With a `gate` (colocated placement,
    `phase_gate.py`), the call waits for a generation phase."""
    sampling: list[Sampling] = []

    async def generate(prompt: Messages | str, n: int) -> list[Generation]:
        try:
            if not sampling:
                base: Sampling = await student.default_sampling.remote()
                sampling.append(dataclasses.replace(base, temperature=temperature))
            async with passing(gate):
                [samples] = await student.generate_prompts.remote([prompt], sampling[0], n, None)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
            log.warning("self-repair: the student is unavailable (%s); passing the failure on", type(exc).__name__)
            return []
        return samples

    return generate


def local_generate(student: Any, config: TeacherConfig, version: int | None) -> Generate:
    """`Generate` over a student in this process (`student.Student`): its `version`, the self tier's
    temperature; one engine call at a time (the engine is not thread-safe), each in a thread so the sandbox
    batches keep flowing."""
    temperature = next((t.temperature for t in config.tiers if isinstance(t, SelfRepairTier)), 0.0)
    sampling = dataclasses.replace(student.default_sampling(), temperature=temperature)
    engine = asyncio.Lock()

    async def generate(prompt: Messages | str, n: int) -> list[Generation]:
        async with engine:
            [samples] = await asyncio.to_thread(student.generate_prompts, [prompt], sampling, n, version)
        return samples

    return generate


def start_teacher_actor(config: TeacherConfig, cache_dir: str | Path | None, executor: Executor,
                        student: ActorHandle | None = None, prompt_format: PromptFormat = "chat",
                        state: dict[str, Any] | None = None, gate: ActorHandle | None = None) -> ActorHandle:
    """A `TeacherActor` on the current Ray cluster; `executor` must be picklable (e.g. hold actor handles);
    `gate`: the colocated placement's phase gate for self-repairs."""
    actor = ray.remote(TeacherActor).options(**config.resources.ray_options())
    return actor.remote(config, cache_dir, executor, student, prompt_format, state, gate)

"""The online PERsD loop: Ray actors wired by bounded queues, every stage running at once.

    curriculum ─picks→ student.generate ─attempts→ sandbox ─verdicts→ curriculum
                                                      └ failed → refine queue → teacher (verifies in sandbox)
                                                                   └ verified → formats → example queue → trainer
    trainer ─publishes adapters/vNNNN→ version watcher → student.load_adapter (checked) → evaluator every K

Four kinds of coroutine run in the driver: one generator (pick, generate, score), `teacher.max_concurrency`
refiners draining the refine queue, a version watcher, and a reporter (metrics, display, checkpoints).
The trainer runs in its own actor, pulling from the example queue. No stage waits for a whole batch of
another: the refine queue and the example queue are bounded (backpressure), and the staleness gate bounds
the attempts in flight (`staleness.py`).

Failure handling: a teacher outage (`TeacherUnavailable`) pauses refinement with exponential backoff and
resumes by itself; a spent budget stops refinement; a misconfigured teacher stops the run. A restarted
student actor is given the latest adapter again before it generates. SIGINT/SIGTERM stop the stages,
checkpoint and exit cleanly; `--resume` continues from `checkpoints/loop.json` and the trainer's checkpoint.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import ray
from ray.util.queue import Queue

from persd_online import atomic
from persd_online.budget import BudgetExhausted
from persd_online.config import Config
from persd_online.curriculum import Curriculum
from persd_online.engine import Sampling
from persd_online.evaluator import EvalResult, heldout_change, score
from persd_online.formats import attempt_examples
from persd_online.labels import Labels
from persd_online.metrics import LoopMetrics, ProgressDisplay
from persd_online.records import Attempt, Verdict
from persd_online.run_dir import RunDir
from persd_online.staleness import StalenessGate
from persd_online.student import VersionNotLoadedError
from persd_online.tasks import Task
from persd_online.teacher import TeacherUnavailable
from persd_online.trainer import fresh_per_version, published_versions
from persd_online.verify import Executor, RefinementOutcome
from persd_online.wall_budget import last_full_eval, must_stop, reserve_s

log = logging.getLogger(__name__)
T = TypeVar("T")

REPORT_EVERY_S = 5.0
WATCH_EVERY_S = 1.0
OUTAGE_BACKOFF_S = (2.0, 60.0)
STUDENT_RESTART_TIMEOUT_S = 600.0


@dataclass
class Actors:
    """Handles of a run's actors and queues (built by `persd_online.driver`)."""

    student: ray.actor.ActorHandle
    teacher: ray.actor.ActorHandle
    trainer: ray.actor.ActorHandle
    evaluator: ray.actor.ActorHandle
    executor: Executor
    examples: Queue
    tokenizer: Any


@dataclass
class LoopState:
    """What `checkpoints/loop.json` holds besides the trainer's own checkpoint."""

    curriculum: dict[str, Any]
    counters: dict[str, float]
    teacher: dict[str, Any]
    evals: list[dict[str, Any]] = field(default_factory=list)
    trained_tasks: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    labels: list[str] = field(default_factory=list)


class OnlineLoop:
    """One run of the online loop over a task pool (see the module docstring)."""

    def __init__(self, config: Config, run: RunDir, pool: list[Task], actors: Actors,
                 state: LoopState | None = None, startup_s: float = 0.0) -> None:
        self.config = config
        self.run_dir = run
        self.tasks = {t.task_id: t for t in pool}
        self.actors = actors
        self.curriculum = (Curriculum.from_state(state.curriculum, config.curriculum) if state
                           else Curriculum.new(list(self.tasks), config.curriculum))
        self.metrics = LoopMetrics(counters=state.counters if state else None)
        self.evals: list[dict[str, Any]] = state.evals if state else []
        self.trained_tasks: set[str] = set(state.trained_tasks) if state else set()
        self.labels = Labels(state.labels if state else ())
        self.wall_offset = (state.wall_s if state else 0.0) + startup_s  # the run's clock includes its start-up
        self._last_call_s = 0.0  # the longest generation call so far (the wall budget's reserve)
        self.gate = StalenessGate(config.max_staleness, fresh_per_version(config.trainer))
        self.refine_queue: asyncio.Queue[tuple[Task, Attempt, Verdict]] = asyncio.Queue(self.gate.capacity)
        self.student_version = 0
        self.trainer_version = 0
        self._trainer_backlog = 0  # examples waiting at the trainer, from its last stats (the gate's backlog)
        self._trainer_starved = False  # it waits for examples to fill a step, none on the way (its last stats)
        self.stop = asyncio.Event()
        self.stop_reason = ""
        self._reload_lock = asyncio.Lock()
        self.refining = asyncio.Event()
        self.refining.set()

    # --- stages -------------------------------------------------------------------------------------------
    async def _generate(self) -> None:
        per_call = self.config.student.tasks_per_batch
        n = self.config.student.samples_per_task
        while not self.stop.is_set():
            granted = self.gate.admit(per_call * n, self.student_version, self.trainer_version,
                                      self._trainer_backlog, unit=n, starved=self._trainer_starved)
            picks = self.curriculum.next(granted // n, self.student_version) if granted else []
            if len(picks) * n < granted:
                self.gate.finish(granted - len(picks) * n)
            if not picks:
                if self.curriculum.exhausted() and not self.curriculum.in_flight:
                    self._finish("every task is retired or parked")
                await asyncio.sleep(0.5)
                continue
            for pick in picks:
                self.run_dir.event("pick", task_id=pick.task_id, reason=pick.reason, value=pick.value)
            tasks = [self.tasks[p.task_id] for p in picks]
            called = time.monotonic()
            with self.metrics.busy("student"):
                attempts = await self._student_call(tasks, n)
            self._last_call_s = max(self._last_call_s, time.monotonic() - called)
            with self.metrics.busy("sandbox"):
                verdicts = await score(self.actors.executor, tasks, attempts)
            await self._record_attempts(attempts, verdicts)
            self._check_budget()

    async def _student_call(self, tasks: list[Task], n: int) -> list[Attempt]:
        # pinned to the version the loop believes is served: a student that restarted unnoticed (killed
        # while idle, the call queued for its new incarnation) holds only version 0 and refuses the call
        return await self._with_student(
            lambda: self.actors.student.generate.remote(tasks, n, None, self.student_version))

    async def _with_student(self, call: Callable[[], Awaitable[T]]) -> T:
        """Make a call that reaches the student; if the student died (the call failed with it, or a restarted
        student does not hold the version the call asks for), wait for Ray's restart, give it back the version
        it served, and make the call once more."""
        try:
            return await call()
        except (ray.exceptions.RayActorError, VersionNotLoadedError) as exc:
            log.warning("the student actor died or restarted (%s); re-sending adapter v%d",
                        str(getattr(exc, "cause", exc)).splitlines()[0], self.student_version)
            self.run_dir.event("student_restart", version=self.student_version)
            await self._reload_student()
            return await call()

    async def _reload_student(self) -> None:
        """A restarted student serves version 0 only; give it the version it served before (once)."""
        async with self._reload_lock:
            deadline = time.monotonic() + STUDENT_RESTART_TIMEOUT_S
            while True:
                try:
                    served = await self.actors.student.latest_version.remote()
                    break
                except ray.exceptions.ActorUnavailableError:  # still restarting (its engine takes a while)
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(2.0)
            if served < self.student_version:
                version = self.student_version
                await self.actors.student.load_adapter.remote(version, str(self._adapter_dir(version)))

    async def _record_attempts(self, attempts: list[Attempt], verdicts: list[Verdict]) -> None:
        pending: dict[str, int] = {}
        for attempt, verdict in zip(attempts, verdicts, strict=True):
            self.curriculum.record_attempt(attempt.task_id, attempt.adapter_version, verdict.passed)
            self.metrics.inc("attempts")
            self.metrics.inc("attempts_passed", verdict.passed)
            self.run_dir.event("attempt", attempt_id=attempt.attempt_id, task_id=attempt.task_id,
                               version=attempt.adapter_version, status=verdict.status, passed=verdict.passed,
                               feedback=verdict.feedback[:300], completion_tokens=attempt.completion_tokens)
            if verdict.passed:
                self.gate.finish()
            else:
                pending[attempt.task_id] = pending.get(attempt.task_id, 0) + 1
                await self.refine_queue.put((self.tasks[attempt.task_id], attempt, verdict))
        for task_id in {a.task_id for a in attempts} - set(pending):
            self.curriculum.release(task_id)
        self._pending_refinements.update({k: self._pending_refinements.get(k, 0) + v for k, v in pending.items()})
        self.metrics.set("queue_depth", self.refine_queue.qsize(), queue="refine")

    async def _refine(self) -> None:
        backoff = OUTAGE_BACKOFF_S[0]
        while True:
            task, attempt, verdict = await self.refine_queue.get()
            await self.refining.wait()
            try:
                with self.metrics.busy("teacher"):
                    outcome: RefinementOutcome = await self.actors.teacher.refine.remote(task, attempt, verdict)
                backoff = OUTAGE_BACKOFF_S[0]
            except TeacherUnavailable as exc:
                await self.refine_queue.put((task, attempt, verdict))
                await self._pause_refinement(str(getattr(exc, "cause", exc)), backoff)  # Ray's wrapper: the message
                backoff = min(backoff * 2, OUTAGE_BACKOFF_S[1])
                continue
            except BudgetExhausted as exc:
                self._finish(f"teacher budget spent: {exc}")
                self._done_with(task.task_id)
                return
            finally:
                self.refine_queue.task_done()
            await self._record_outcome(task, attempt, verdict, outcome)

    async def _pause_refinement(self, why: str, seconds: float) -> None:
        log.warning("teacher unavailable (%s); pausing refinement for %.0f s", why, seconds)
        self.run_dir.event("teacher_outage", error=why, pause_s=seconds)
        self.refining.clear()
        await asyncio.sleep(seconds)
        self.refining.set()

    async def _record_outcome(self, task: Task, attempt: Attempt, verdict: Verdict,
                              outcome: RefinementOutcome) -> None:
        for r in outcome.rounds:
            ref = r.refinement
            self.metrics.inc("teacher_calls")
            self.metrics.inc("teacher_cache_hits", ref.cached)
            self.metrics.inc("teacher_tokens", ref.prompt_tokens + ref.completion_tokens)
            self.metrics.inc("teacher_cost_usd", ref.cost_usd)
            self.run_dir.event("refinement", attempt_id=attempt.attempt_id, task_id=task.task_id, round=ref.round,
                               teacher_call_id=ref.teacher_call_id, cached=ref.cached, status=r.verdict.status,
                               passed=r.verdict.passed)
        verified = outcome.verified is not None
        examples = attempt_examples(self.config.method, task, attempt, verdict, outcome, self.actors.tokenizer,
                                    self.config.student.prompt_format)
        new_labels = self.labels.add(examples)
        self.metrics.inc("examples_distinct", new_labels)
        self.curriculum.record_teacher(task.task_id, verified, new_label=new_labels > 0)
        if not outcome.rounds:
            self.curriculum.record_teacher(task.task_id, False)
        if verified:
            self.metrics.inc("refinements_verified")
        for example in examples:
            await self.actors.examples.put_async(example, timeout=None)
            self.run_dir.event("example", example_id=example.example_id, task_id=task.task_id,
                               method=example.method, version=example.adapter_version)
            self.trained_tasks.add(task.task_id)
        # Counted as backlog at once: otherwise, until the next pull of the trainer's figures replaces this
        # estimate, they would be in neither term of the gate, and it would admit a batch that goes stale.
        self._trainer_backlog += len(examples)
        self._trainer_starved = self._trainer_starved and not examples
        self.gate.finish()
        self._done_with(task.task_id)

    def _done_with(self, task_id: str) -> None:
        self._pending_refinements[task_id] -= 1
        if self._pending_refinements[task_id] == 0:
            del self._pending_refinements[task_id]
            self.curriculum.release(task_id)

    async def _watch_versions(self) -> None:
        while not self.stop.is_set():
            published = self._latest_published()
            self._note_published(published)
            if published > self.student_version:
                await self._swap(published)
            await asyncio.sleep(WATCH_EVERY_S)

    async def _swap(self, version: int) -> None:
        report = await self._with_student(
            lambda: self.actors.student.load_adapter.remote(version, str(self._adapter_dir(version))))
        self.student_version = version
        self.metrics.inc("adapters_loaded")
        self.metrics.set("adapter_version", version)
        self.run_dir.event("swap", version=version, load_s=report.load_s, probe_s=report.probe_s,
                           logprob_delta=report.logprob_delta)
        self._check_budget()
        every = self.config.eval.every_versions
        if every and version % every == 0 and not self.stop.is_set():
            await self._evaluate(version, full=False)  # once stopped, the wrap-up evaluates the final version

    async def _evaluate(self, version: int, full: bool = True) -> list[EvalResult]:
        """Score `version` on the held-out sets: all their tasks, or (progress) the first eval.progress_limit."""
        limit = None if full else self.config.eval.progress_limit
        with self.metrics.busy("evaluator"):
            results: list[EvalResult] = await self._with_student(
                lambda: self.actors.evaluator.evaluate.remote(version, limit))
        for result in results:
            event = result.to_event(full) | {"teacher_calls": self.metrics.counters["teacher_calls"],
                                             "wall_s": round(self._wall(), 1)}
            self.evals.append(event)
            self.run_dir.event("eval", **event)
            self.metrics.set("heldout_pass1", result.pass1, task_set=result.task_set)
            log.info("held-out pass@1 of v%d on %s: %.3f", version, result.task_set, result.pass1)
        return results

    async def _report(self, display: ProgressDisplay) -> None:
        last_checkpoint = time.monotonic()
        while not self.stop.is_set():
            if time.monotonic() - last_checkpoint >= self.config.checkpoint_every_s:
                await self.checkpoint()
                last_checkpoint = time.monotonic()
            await self._pull_trainer_stats()
            self.run_dir.metrics(self.metrics.snapshot() | {"wall_s": round(self._wall(), 1)})
            display.refresh()
            self._check_budget()
            await asyncio.sleep(REPORT_EVERY_S)

    async def _pull_trainer_stats(self) -> None:
        queued = self.actors.examples.qsize()  # before the stats: an example moving meanwhile counts twice, not 0
        stats = await self.actors.trainer.stats.remote()
        for name in ("examples_trained", "train_steps", "stale_dropped"):
            self.metrics.counters[name] = stats[name]
        for name in ("loss", "train_tokens_per_s"):
            if stats.get(name) is not None:
                self.metrics.set(name, stats[name])
        self._trainer_backlog = queued + stats.get("fresh_pending", 0)  # the staleness gate's backlog term
        self._trainer_starved = queued == 0 and not stats.get("ready", True)
        self.metrics.set("queue_depth", queued, queue="examples")
        self.metrics.add_busy("trainer", stats.get("busy_s", 0.0) - self._trainer_busy)
        self._trainer_busy = stats.get("busy_s", 0.0)

    # --- control ------------------------------------------------------------------------------------------
    async def _guard(self, stage: str, work: Coroutine[Any, Any, None]) -> None:
        """Run one stage; if it fails, stop the whole run (a loop missing a stage must not run on)."""
        try:
            await work
        except Exception as exc:
            self._finish(f"the {stage} stage failed: {exc}")
            raise

    def _wall(self) -> float:
        return self.wall_offset + time.monotonic() - self.metrics.started

    def _finish(self, reason: str) -> None:
        if not self.stop.is_set():
            self.stop_reason = reason
            log.info("stopping: %s", reason)
            self.stop.set()

    def _check_budget(self) -> None:
        b, c = self.config.budget, self.metrics.counters
        reserve = reserve_s(*last_full_eval(self.evals), len(self.trained_tasks), self._last_call_s)
        if must_stop(self._wall(), b.max_wall_s, reserve):
            self._finish(f"budget.max_wall_s={b.max_wall_s:g}: {reserve:.0f} s kept for the final evaluation "
                         "and wrap-up")
        elif b.max_attempts is not None and c["attempts"] >= b.max_attempts:
            self._finish(f"budget.max_attempts={b.max_attempts} reached")
        elif b.max_examples is not None and c["examples_trained"] >= b.max_examples:
            self._finish(f"budget.max_examples={b.max_examples} reached")
        elif b.max_distinct_examples is not None and c["examples_distinct"] >= b.max_distinct_examples:
            self._finish(f"budget.max_distinct_examples={b.max_distinct_examples} reached")
        elif b.max_teacher_calls is not None and c["teacher_calls"] >= b.max_teacher_calls:
            self._finish(f"budget.max_teacher_calls={b.max_teacher_calls} reached")
        elif b.max_versions is not None and self.trainer_version >= b.max_versions:
            self._finish(f"budget.max_versions={b.max_versions} reached")

    def _adapter_dir(self, version: int) -> Path:
        return self.run_dir.adapters / f"v{version:04d}"

    def _note_published(self, version: int) -> None:
        if version > self.trainer_version:
            self.metrics.inc("adapters_published", version - self.trainer_version)
            self.trainer_version = version

    def _latest_published(self) -> int:
        return max(published_versions(self.run_dir.adapters), default=0)

    async def checkpoint(self) -> None:
        """Persist the loop's state (the trainer checkpoints itself on the same call)."""
        await self.actors.trainer.checkpoint.remote()
        teacher = await self.actors.teacher.state.remote()
        state = LoopState(self.curriculum.state(), dict(self.metrics.counters), teacher, self.evals,
                          sorted(self.trained_tasks), self._wall(), self.labels.keys())
        atomic.write_text(self.run_dir.checkpoints / "loop.json", json.dumps(dataclasses.asdict(state)))
        self.run_dir.event("checkpoint", wall_s=round(self._wall(), 1), version=self.trainer_version)

    async def run(self) -> dict[str, Any]:
        """Run until a budget or signal stops it; returns the summary."""
        self._pending_refinements: dict[str, int] = {}
        self._trainer_busy = 0.0
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._finish, f"signal {sig.name}")
        self.student_version = await self.actors.student.latest_version.remote()
        self.trainer_version = self._latest_published()
        if self.student_version < self.trainer_version:
            await self._swap(self.trainer_version)
        if not self.evals:
            await self._evaluate(self.student_version)
        self.actors.trainer.run.remote()
        with ProgressDisplay(self.metrics, f"persd-online {self.run_dir.root.name}") as display:
            refiners = [asyncio.create_task(self._guard("teacher", self._refine()))
                        for _ in range(self.config.teacher.max_concurrency)]
            stages = [asyncio.create_task(self._guard(name, c)) for name, c in (
                ("student", self._generate()), ("adapter swap", self._watch_versions()),
                ("reporter", self._report(display)))]
            await self.stop.wait()
            failures = [r for r in await asyncio.gather(*stages, return_exceptions=True)
                        if isinstance(r, BaseException)]
            for task in refiners:
                task.cancel()
            failures += [r for r in await asyncio.gather(*refiners, return_exceptions=True)
                         if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)]
        for failure in failures:
            log.error("a loop stage failed: %r", failure, exc_info=failure)
            self.run_dir.event("stage_failed", error=repr(failure))
        if failures:
            await self.checkpoint()
            raise failures[0]
        return await self._wrap_up()

    async def _wrap_up(self) -> dict[str, Any]:
        await self.actors.trainer.stop.remote()
        await self._pull_trainer_stats()
        final = self._latest_published()
        self._note_published(final)
        if final > self.student_version:
            await self._swap(final)
        full = [e for e in self.evals if e.get("full", True)]
        if not full or full[-1]["adapter_version"] != self.student_version:
            await self._evaluate(self.student_version)
        before, after = await self._trained_task_pass()
        await self.checkpoint()
        return self._summary(before, after, await self.actors.teacher.describe.remote())

    async def _trained_task_pass(self) -> tuple[float | None, float | None]:
        """Greedy re-attempts of the trained tasks by version 0 and by the final version."""
        tasks = [self.tasks[t] for t in sorted(self.trained_tasks)]
        if not tasks or self.student_version == 0:
            return None, None
        base: Sampling = await self.actors.student.default_sampling.remote()
        greedy = dataclasses.replace(base, temperature=0.0)
        rates = []
        for version in (0, self.student_version):
            attempts = await self._with_student(
                lambda v=version: self.actors.student.generate.remote(tasks, 1, greedy, v))
            verdicts = await score(self.actors.executor, tasks, attempts)
            rates.append(sum(v.passed for v in verdicts) / len(verdicts))
        self.run_dir.event("trained_task_pass", tasks=len(tasks), before=rates[0], after=rates[1])
        return rates[0], rates[1]

    def _summary(self, before: float | None, after: float | None, teacher: dict[str, Any]) -> dict[str, Any]:
        c = self.metrics.counters
        return {
            "stop_reason": self.stop_reason,
            "method": self.config.method,
            "adapters_published": self.trainer_version,
            "adapters_loaded_by_student": int(c["adapters_loaded"]),
            "attempts": int(c["attempts"]),
            "attempts_passed": int(c["attempts_passed"]),
            "teacher_calls": int(c["teacher_calls"]),
            "refinements_verified": int(c["refinements_verified"]),
            "examples_trained": int(c["examples_trained"]),
            "examples_distinct": int(c["examples_distinct"]),
            "train_steps": int(c["train_steps"]),
            "stale_dropped": int(c["stale_dropped"]),
            "heldout_pass1": [[e["adapter_version"], e["pass1"]] for e in self.evals
                              if e["task_set"] == self.config.eval.tasks[0]],
            "heldout": self.evals,
            "heldout_change": heldout_change(self.evals),
            "trained_tasks": len(self.trained_tasks),
            "trained_task_pass_before": before,
            "trained_task_pass_after": after,
            "stage_busy_fraction": self.metrics.busy_fractions(),
            "wall_s": round(self._wall(), 1),
            "curriculum": self.curriculum.counts(),
            "teacher": teacher,
        }

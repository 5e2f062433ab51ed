"""The online PERsD loop's async shell: it moves records between the Ray actors and the ledger.

    ledger.admit ─picks→ student.generate ─attempts→ sandbox ─→ ledger.scored ─failures→ refine queue
    refine queue → teacher (verifies in the sandbox) → ledger.refined ─examples→ example queue → trainer
    example queue → trainer turns ─publish adapters/vNNNN→ version watcher → student.load_adapter (checked)
    → evaluator (optional)

Every decision and count lives in the ledger (`ledger.py`, pure and unit-tested): what to admit, what is in
flight, the curriculum, labels, the budget. This module only runs the roles, each a short coroutine: one
generator, `teacher.max_concurrency` refiners, a trainer role that gives the trainer actor its turns (it pulls
the example queue itself), a version watcher and a reporter (metrics, display, checkpoints). When a stage's work
may run is the scheduler's call (`scheduler.py`: one placement, one scheduler; the trainer's turns come when the
scheduler says training is due). Backpressure is one rule: the ledger admits attempts only while they fit the
staleness gate; every queue behind it holds at most the attempts in flight.

Failure handling: a teacher outage (`TeacherUnavailable`) pauses refinement with exponential backoff and
resumes by itself; a spent teacher budget stops the run; a restarted student is given back the version it
served before it generates again. SIGINT/SIGTERM stop the roles, checkpoint and exit cleanly; `--resume`
continues from `checkpoints/loop.json` and the trainer's checkpoint.
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
from typing import Any, TypeVar

import ray
from ray.util.queue import Queue

from persd_online import adapters, atomic
from persd_online.budget import BudgetExhausted
from persd_online.config import Config
from persd_online.curriculum import Curriculum
from persd_online.engine import Sampling
from persd_online.evaluator import EvalResult, heldout_change, score
from persd_online.formats import attempt_examples
from persd_online.ledger import Ledger, LedgerSettings
from persd_online.metrics import LoopMetrics, ProgressDisplay
from persd_online.personalisation import summarise
from persd_online.records import Attempt, Example, Verdict
from persd_online.run_dir import RunDir
from persd_online.scheduler import ConcurrentScheduler, Scheduler
from persd_online.student import VersionNotLoadedError
from persd_online.summary import RunSummary
from persd_online.tasks import Task
from persd_online.teacher import TeacherUnavailable
from persd_online.trainer import fresh_per_version
from persd_online.verify import Executor
from persd_online.wall_budget import last_full_eval, reserve_s

log = logging.getLogger(__name__)
T = TypeVar("T")

REPORT_EVERY_S = 5.0
WATCH_EVERY_S = 1.0
TRAIN_POLL_S = 0.2
IDLE_WAIT_S = 0.5
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

    ledger: dict[str, Any]
    teacher: dict[str, Any]
    evals: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0


class OnlineLoop:
    """One run of the online loop over a task pool (see the module docstring)."""

    def __init__(self, config: Config, run: RunDir, pool: list[Task], actors: Actors,
                 state: LoopState | None = None, startup_s: float = 0.0,
                 scheduler: Callable[[LoopMetrics], Scheduler] = ConcurrentScheduler) -> None:
        self.config = config
        self.run_dir = run
        self.tasks = {t.task_id: t for t in pool}
        self.actors = actors
        settings = LedgerSettings.of(config, fresh_per_version(config.trainer))
        self.ledger = (Ledger.from_state(settings, config.curriculum, state.ledger) if state
                       else Ledger(settings, Curriculum.new(list(self.tasks), config.curriculum)))
        self.metrics = LoopMetrics(counters=dict(self.ledger.counts))
        self.scheduler = scheduler(self.metrics)
        self.evals: list[dict[str, Any]] = state.evals if state else []
        self.wall_offset = (state.wall_s if state else 0.0) + startup_s  # the run's clock includes its start-up
        # unbounded on purpose: the ledger's admission bounds it (no more failures than attempts in flight)
        self.refine_queue: asyncio.Queue[tuple[Attempt, Verdict]] = asyncio.Queue()
        # verified labels (attempt id, [label, reference] examples) whose likelihoods are not measured yet
        self.to_measure: asyncio.Queue[tuple[str, list[Example]]] = asyncio.Queue()
        self.fmt = config.student.prompt_format
        self.refining = asyncio.Event()  # cleared while the teacher is out
        self.refining.set()
        self.stop = asyncio.Event()
        self.stop_reason = ""
        self._reload_lock = asyncio.Lock()
        self._swap_lock = asyncio.Lock()
        self._new_version = asyncio.Event()  # set by a training turn that published: the watcher swaps at once
        self._last_call_s = 0.0  # the longest generation call so far (the wall budget's reserve)
        self._trainer_busy_s = 0.0  # the trainer's busy seconds at its last report
        self._trainer_seen = 0.0  # the start of the last trainer step put on the timeline

    # --- roles --------------------------------------------------------------------------------------------
    async def _generate(self) -> None:
        n = self.config.student.samples_per_task
        while not self.stop.is_set():
            await self._serve_latest()  # a version published meanwhile first (colocated: between the phases)
            picks = self.ledger.admit()
            if not picks:
                self._check_stop()
                await asyncio.sleep(IDLE_WAIT_S)
                continue
            for pick in picks:
                self.run_dir.event("pick", task_id=pick.task_id, reason=pick.reason, value=pick.value)
            tasks = [self.tasks[p.task_id] for p in picks]
            async with self.scheduler.turn("student"):
                called = time.monotonic()
                # pinned to the version the loop believes is served when the call is made (a retry after a
                # restart asks for the version given back): a student that restarted unnoticed holds only
                # version 0 and refuses the call, so `_with_student` gives it its version back
                attempts = await self._with_student(
                    lambda t=tasks: self.actors.student.generate.remote(t, n, None, self.ledger.student_version))
                self._last_call_s = max(self._last_call_s, time.monotonic() - called)
            async with self.scheduler.turn("sandbox"):
                verdicts = await score(self.actors.executor, tasks, attempts)
            for attempt, verdict in zip(attempts, verdicts, strict=True):
                self.run_dir.event("attempt", attempt_id=attempt.attempt_id, task_id=attempt.task_id,
                                   version=attempt.adapter_version, status=verdict.status, passed=verdict.passed,
                                   feedback=verdict.feedback[:300], completion_tokens=attempt.completion_tokens)
            for failure in self.ledger.scored(attempts, verdicts):
                self.refine_queue.put_nowait(failure)
            self._check_stop()

    async def _refine(self) -> None:
        backoff = OUTAGE_BACKOFF_S[0]
        while (failure := await self._until_stopped(self.refine_queue.get())) is not None:
            attempt, verdict = failure
            task = self.tasks[attempt.task_id]
            if await self._until_stopped(self.refining.wait()) is None:
                return
            try:
                async with self.scheduler.turn("teacher"):
                    outcome = await self.actors.teacher.refine.remote(task, attempt, verdict)
                backoff = OUTAGE_BACKOFF_S[0]
            except TeacherUnavailable as exc:
                self.refine_queue.put_nowait((attempt, verdict))
                await self._pause_refinement(str(getattr(exc, "cause", exc)), backoff)  # Ray's wrapper: the message
                backoff = min(backoff * 2, OUTAGE_BACKOFF_S[1])
                continue
            except BudgetExhausted as exc:
                self.ledger.dropped(task.task_id)
                self._finish(f"teacher budget spent: {exc}")
                return
            for r in outcome.rounds:
                self.run_dir.event("refinement", attempt_id=attempt.attempt_id, task_id=task.task_id,
                                   round=r.refinement.round, tier=r.refinement.teacher_kind,
                                   teacher_call_id=r.refinement.teacher_call_id, cached=r.refinement.cached,
                                   personalised=r.refinement.personalised, status=r.verdict.status,
                                   passed=r.verdict.passed)
            examples = attempt_examples(self.config.method, task, attempt, verdict, outcome, self.actors.tokenizer,
                                        self.fmt)
            for example in self.ledger.refined(task, attempt, outcome, examples):
                await self.actors.examples.put_async(example, timeout=None)
                self.run_dir.event("example", example_id=example.example_id, task_id=task.task_id,
                                   method=example.method, version=example.adapter_version)
            if outcome.verified is not None and task.reference is not None:  # the label's and the reference's
                self.to_measure.put_nowait((attempt.attempt_id, [
                    *attempt_examples("persd", task, attempt, verdict, outcome, self.actors.tokenizer, self.fmt),
                    *attempt_examples("inpd", task, attempt, verdict, None, self.actors.tokenizer, self.fmt)]))

    async def _train(self) -> None:
        turn = self.scheduler.training
        while not self.stop.is_set():
            if not self.scheduler.training_due(self.ledger):
                await asyncio.sleep(TRAIN_POLL_S)
                continue
            async with self.scheduler.turn("trainer"):
                stats = await self.actors.trainer.train.remote(turn.wait_s, turn.until_publish)
            self._take_trainer_stats(stats, self.actors.examples.qsize())
            if stats["version"] > self.ledger.trainer_version:
                self._new_version.set()

    async def _watch_versions(self) -> None:
        while not self.stop.is_set():
            await self._serve_latest()
            try:
                await asyncio.wait_for(self._new_version.wait(), WATCH_EVERY_S)
            except TimeoutError:
                pass
            self._new_version.clear()

    async def _serve_latest(self) -> None:
        """Swap the student to the trainer's newest published version, if it serves an older one (the watcher and
        the generator both ask; one swap at a time)."""
        async with self._swap_lock:
            self.ledger.published(adapters.latest(self.run_dir.adapters))
            if self.ledger.trainer_version > self.ledger.student_version and not self.stop.is_set():
                await self._swap(self.ledger.trainer_version)

    async def _report(self, display: ProgressDisplay) -> None:
        last_checkpoint = time.monotonic()
        while not self.stop.is_set():
            if time.monotonic() - last_checkpoint >= self.config.checkpoint_every_s:
                await self.checkpoint()
                last_checkpoint = time.monotonic()
            await self._pull_trainer_stats()
            self.metrics.set("queue_depth", self.refine_queue.qsize(), queue="refine")
            self.run_dir.metrics(self.metrics.snapshot() | {"wall_s": round(self._wall(), 1)})
            display.refresh()
            self._check_stop()
            await asyncio.sleep(REPORT_EVERY_S)

    # --- student, teacher and trainer calls ---------------------------------------------------------------
    async def _with_student(self, call: Callable[[], Awaitable[T]]) -> T:
        """Make a call that reaches the student; if the student died (the call failed with it, or a restarted
        student does not hold the version the call asks for), wait for Ray's restart, give it back the version
        it served, and make the call once more."""
        try:
            return await call()
        except (ray.exceptions.RayActorError, VersionNotLoadedError) as exc:
            version = self.ledger.student_version
            log.warning("the student actor died or restarted (%s); re-sending adapter v%d",
                        str(getattr(exc, "cause", exc)).splitlines()[0], version)
            self.run_dir.event("student_restart", version=version)
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
            version = self.ledger.student_version
            if served < version:
                await self.actors.student.load_adapter.remote(version, str(adapters.version_dir(
                    self.run_dir.adapters, version)))

    async def _swap(self, version: int) -> None:
        path = str(adapters.version_dir(self.run_dir.adapters, version))
        async with self.scheduler.turn("student"):
            report = await self._with_student(lambda: self.actors.student.load_adapter.remote(version, path))
        self.ledger.served(version)
        self.metrics.set("adapter_version", version)
        self.run_dir.event("swap", version=version, load_s=report.load_s, probe_s=report.probe_s,
                           logprob_delta=report.logprob_delta)
        self._check_stop()
        every = self.config.eval.every_versions
        if every and version % every == 0 and not self.stop.is_set():
            await self._evaluate(version, full=False)  # once stopped, the wrap-up evaluates the final version

    async def _measure(self) -> None:
        while (first := await self._until_stopped(self.to_measure.get())) is not None:
            await self._measure_likelihoods([first, *self._drain(self.to_measure)])

    async def _measure_likelihoods(self, batch: list[tuple[str, list[Example]]]) -> None:
        """How likely the student finds each label and its task's reference (personalisation): all that arrived
        since the last measurement in one student call, under the version it serves then (the attempt's, or at
        most max_staleness newer: asking for each attempt's own version would reload a merged student's weights
        twice per label); skipped while the student is restarting."""
        try:
            async with self.scheduler.turn("student"):
                means = await self.actors.student.completion_logprobs.remote(
                    [e for _, pair in batch for e in pair], self.ledger.student_version)
        except (VersionNotLoadedError, ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            return
        for i, (attempt_id, _) in enumerate(batch):
            self.ledger.likelihoods(attempt_id, means[2 * i], means[2 * i + 1])

    @staticmethod
    def _drain(queue: asyncio.Queue[T]) -> list[T]:
        items = []
        while not queue.empty():
            items.append(queue.get_nowait())
        return items

    async def _pause_refinement(self, why: str, seconds: float) -> None:
        log.warning("teacher unavailable (%s); pausing refinement for %.0f s", why, seconds)
        self.run_dir.event("teacher_outage", error=why, pause_s=seconds)
        self.refining.clear()
        await self._until_stopped(asyncio.sleep(seconds))
        self.refining.set()

    async def _until_stopped(self, work: Awaitable[T]) -> T | None:
        """`work`'s result, or None once the run stops first (`work` is then cancelled). Refiners wait on this
        for their next failure, never on a teacher call: a call under way when the run stops is finished and
        its labels recorded (the teacher's tiers count it either way)."""
        job = asyncio.ensure_future(work)
        if self.stop.is_set():
            job.cancel()
            return None
        stopped = asyncio.ensure_future(self.stop.wait())
        done, _ = await asyncio.wait({job, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if job in done:
            return job.result()
        job.cancel()
        return None

    async def _evaluate(self, version: int, full: bool = True) -> list[EvalResult]:
        """Score `version` on the held-out sets: all their tasks, or (progress) the first eval.progress_limit."""
        limit = None if full else self.config.eval.progress_limit
        async with self.scheduler.turn("evaluator"):
            results: list[EvalResult] = await self._with_student(
                lambda: self.actors.evaluator.evaluate.remote(version, limit, progress=full))
        for result in results:
            event = result.to_event(full) | {"teacher_calls": self.ledger.counts["teacher_calls"],
                                             "wall_s": round(self._wall(), 1)}
            self.evals.append(event)
            self.run_dir.event("eval", **event)
            self.metrics.set("heldout_pass1", result.pass1, task_set=result.task_set)
            log.info("held-out pass@1 of v%d on %s: %.3f", version, result.task_set, result.pass1)
        return results

    async def _pull_trainer_stats(self) -> None:
        queued = self.actors.examples.qsize()  # before the stats: an example moving meanwhile counts twice, not 0
        self._take_trainer_stats(await self.actors.trainer.stats.remote(), queued)

    def _take_trainer_stats(self, stats: dict[str, Any], queued: int) -> None:
        self.ledger.trainer_reported(stats, queued)
        self.metrics.sync(self.ledger.counts)
        for name in ("loss", "train_tokens_per_s"):
            if stats.get(name) is not None:
                self.metrics.set(name, stats[name])
        self.metrics.set("queue_depth", queued, queue="examples")
        self.metrics.add_busy("trainer", stats.get("busy_s", 0.0) - self._trainer_busy_s)
        self._trainer_busy_s = stats.get("busy_s", 0.0)
        for start, end in stats.get("recent_steps", []):
            if start > self._trainer_seen:
                self.metrics.interval("trainer", start, end)
                self._trainer_seen = start
        self.run_dir.timeline(self.metrics.take_intervals())

    # --- control ------------------------------------------------------------------------------------------
    async def _guard(self, role: str, work: Coroutine[Any, Any, None]) -> None:
        """Run one role; if it fails, stop the whole run (a loop missing a role must not run on)."""
        try:
            await work
        except Exception as exc:
            self._finish(f"the {role} stage failed: {exc}")
            raise

    def _wall(self) -> float:
        return self.wall_offset + time.monotonic() - self.metrics.started

    def _check_stop(self) -> None:
        reserve = reserve_s(*last_full_eval(self.evals), len(self.ledger.trained_tasks), self._last_call_s)
        reason = self.ledger.stop_reason(self._wall(), reserve)
        if reason:
            self._finish(reason)

    def _finish(self, reason: str) -> None:
        if not self.stop.is_set():
            self.stop_reason = reason
            log.info("stopping: %s", reason)
            self.stop.set()

    async def checkpoint(self) -> None:
        """Persist the loop's state (the trainer checkpoints itself on the same call)."""
        await self.actors.trainer.checkpoint.remote()
        teacher = await self.actors.teacher.state.remote()
        state = LoopState(self.ledger.state(), teacher, self.evals, self._wall())
        atomic.write_text(self.run_dir.checkpoints / "loop.json", json.dumps(dataclasses.asdict(state)))
        self.run_dir.event("checkpoint", wall_s=round(self._wall(), 1), version=self.ledger.trainer_version)

    async def run(self) -> RunSummary:
        """Run until a budget or signal stops it; returns the summary."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._finish, f"signal {sig.name}")
        self.ledger.served(await self.actors.student.latest_version.remote())
        self.ledger.published(adapters.latest(self.run_dir.adapters))
        if self.ledger.student_version < self.ledger.trainer_version:
            await self._swap(self.ledger.trainer_version)
        with ProgressDisplay(self.metrics, f"persd-online {self.run_dir.root.name}") as display:
            display.refresh()  # from the first second: the baseline evaluation draws its own bar below the table
            if not self.evals:
                await self._evaluate(self.ledger.student_version)
            refiners = [asyncio.create_task(self._guard("teacher", self._refine()))
                        for _ in range(self.config.teacher.max_concurrency)]
            roles = [asyncio.create_task(self._guard(name, c)) for name, c in (
                ("student", self._generate()), ("trainer", self._train()), ("adapter swap", self._watch_versions()),
                ("likelihoods", self._measure()), ("reporter", self._report(display)))]
            await self.stop.wait()
            # the refiners finish the calls under way (see `_until_stopped`)
            failures = [r for r in await asyncio.gather(*roles, *refiners, return_exceptions=True)
                        if isinstance(r, BaseException)]
        for failure in failures:
            log.error("a loop stage failed: %r", failure, exc_info=failure)
            self.run_dir.event("stage_failed", error=repr(failure))
        if failures:
            await self.checkpoint()
            raise failures[0]
        return await self._wrap_up()

    async def _wrap_up(self) -> RunSummary:
        async with self.scheduler.turn("trainer"):
            stats = await self.actors.trainer.finish.remote()  # a last step, the last version, a checkpoint
        self._take_trainer_stats(stats, self.actors.examples.qsize())
        if pending := self._drain(self.to_measure):  # labels of the refinements finished at the stop
            await self._measure_likelihoods(pending)
        self.ledger.published(adapters.latest(self.run_dir.adapters))
        if self.ledger.trainer_version > self.ledger.student_version:
            await self._swap(self.ledger.trainer_version)
        full = [e for e in self.evals if e.get("full", True)]
        if not full or full[-1]["adapter_version"] != self.ledger.student_version:
            await self._evaluate(self.ledger.student_version)
        before, after = await self._trained_task_pass()
        self.run_dir.timeline(self.metrics.take_intervals())
        await self.checkpoint()
        self.metrics.sync(self.ledger.counts)
        return self._summary(before, after, await self.actors.teacher.describe.remote())

    async def _trained_task_pass(self) -> tuple[float | None, float | None]:
        """Greedy re-attempts of the trained tasks by version 0 and by the final version."""
        tasks = [self.tasks[t] for t in sorted(self.ledger.trained_tasks)]
        if not tasks or self.ledger.student_version == 0:
            return None, None
        base: Sampling = await self.actors.student.default_sampling.remote()
        greedy = dataclasses.replace(base, temperature=0.0)
        rates = []
        for version in (0, self.ledger.student_version):
            async with self.scheduler.turn("evaluator"):  # an evaluation of the student, on the timeline as one
                attempts = await self._with_student(
                    lambda v=version: self.actors.student.generate.remote(tasks, 1, greedy, v))
                verdicts = await score(self.actors.executor, tasks, attempts)
            rates.append(sum(v.passed for v in verdicts) / len(verdicts))
        self.run_dir.event("trained_task_pass", tasks=len(tasks), before=rates[0], after=rates[1])
        return rates[0], rates[1]

    def _summary(self, before: float | None, after: float | None, teacher: dict[str, Any]) -> RunSummary:
        c = {k: int(v) for k, v in self.ledger.counts.items() if k != "teacher_cost_usd"}
        return RunSummary(
            stop_reason=self.stop_reason, method=self.config.method,
            adapters_published=self.ledger.trainer_version, adapters_loaded_by_student=c["adapters_loaded"],
            attempts=c["attempts"], attempts_passed=c["attempts_passed"], teacher_calls=c["teacher_calls"],
            refinements_verified=c["refinements_verified"], examples_trained=c["examples_trained"],
            examples_distinct=c["examples_distinct"], train_steps=c["train_steps"], stale_dropped=c["stale_dropped"],
            stale_replayed=c["stale_replayed"], duplicates_dropped=c["duplicates_dropped"],
            examples_pending=self.ledger.backlog,
            heldout_pass1=[(e["adapter_version"], e["pass1"]) for e in self.evals
                           if e["task_set"] == self.config.eval.tasks[0]],
            heldout=self.evals, heldout_change=heldout_change(self.evals),
            trained_tasks=len(self.ledger.trained_tasks), trained_task_pass_before=before,
            trained_task_pass_after=after, stage_busy_fraction=self.metrics.busy_fractions(),
            wall_s=round(self._wall(), 1), placement=self.scheduler.placement,
            curriculum=self.ledger.curriculum.counts(), teacher=teacher,
            personalisation=summarise(self.ledger.distances))

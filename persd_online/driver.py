"""Starting a run: connect to Ray, load tasks, create the actors with their configured resources, run the loop.

`run(config)` starts a fresh run directory; `resume(run_dir)` reopens one and continues from its
checkpoints. Under `ray job submit` the driver joins the cluster it was submitted to (`address: auto`);
on one machine it starts a local Ray sized so the configured actor shares fit (the shares are planned
fractions of the machine's cores, e.g. student 1 + trainer 1 on two cores).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.util.queue import Queue

from persd_online.cascade import start_teacher_actor
from persd_online.config import Config
from persd_online.evaluator import EvaluatorActor, check_disjoint, describe_change
from persd_online.executor import SandboxExecutor
from persd_online.loop import Actors, LoopState, OnlineLoop
from persd_online.metrics import LoopMetrics
from persd_online.models import resolve_model
from persd_online.phase_gate import start_phase_gate
from persd_online.placement import place, resolve
from persd_online.report import base_vs_final, build_report
from persd_online.run_dir import RunDir
from persd_online.scheduler import ColocatedScheduler, ConcurrentScheduler, Scheduler
from persd_online.student import start_student, stop_student
from persd_online.summary import RunSummary
from persd_online.tasks import Task, load_tasks
from persd_online.trainer import start_trainer
from sandbox.ray_pool import SandboxActor

log = logging.getLogger(__name__)


def connect(config: Config) -> bool:
    """Join the configured cluster, a running one, or start a local Ray; True if Ray runs on this machine only
    (started here, or already initialised in this process)."""
    if ray.is_initialized():
        return len(ray.nodes()) == 1
    # Never let a nested Ray start write an auth token that `ray job submit` would then demand.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = config.ray.address
    if address is None:
        try:
            context = ray.init(address="auto", namespace=config.ray.namespace, log_to_driver=True)
            log.info("joined the running Ray cluster; dashboard: %s", dashboard_url(context))
            return len(ray.nodes()) == 1
        except ConnectionError:
            address = "local"
    if address == "local":
        needed = _cpus_needed(config)
        cpus = config.ray.num_cpus or max(os.cpu_count() or 1, needed)
        context = ray.init(num_cpus=cpus, namespace=config.ray.namespace, include_dashboard=True,
                           log_to_driver=True)
        log.info("started a local Ray with %d CPUs (actors ask for %.1f); dashboard: %s", cpus, needed,
                 dashboard_url(context))
        return True
    context = ray.init(address=address, namespace=config.ray.namespace)
    log.info("joined the Ray cluster at %s; dashboard: %s", address, dashboard_url(context))
    return len(ray.nodes()) == 1


def dashboard_url(context: Any) -> str:
    """The Ray dashboard's URL from `ray.init`'s context (not the GCS address), or a note that there is none."""
    url = getattr(context, "dashboard_url", None)
    if not url:
        return "not running (install ray[default] for the dashboard)"
    return url if url.startswith("http") else f"http://{url}"


def _cpus_needed(config: Config) -> int:
    shares = (config.student.resources.num_cpus * config.student.num_actors + config.trainer.resources.num_cpus
              + config.sandbox.resources.num_cpus * config.sandbox.num_actors + config.teacher.resources.num_cpus
              + config.eval.resources.num_cpus)
    return int(-(-shares // 1))


def _tasks(config: Config) -> tuple[list[Task], dict[str, list[Task]]]:
    pool = load_tasks(config.tasks.pool)[: config.tasks.limit]
    heldout = {spec: load_tasks(spec)[: config.eval.limit] for spec in config.eval.tasks}
    check_disjoint(pool, heldout)
    return pool, heldout


def _start_actors(config: Config, run: RunDir, heldout: dict[str, list[Task]],
                  state: LoopState | None, gate: ray.actor.ActorHandle | None) -> Actors:
    from transformers import AutoTokenizer

    model_path = resolve_model(config.student.model, config.cache_dir)
    sandbox_actor = ray.remote(SandboxActor).options(**config.sandbox.resources.ray_options())
    sandbox = [sandbox_actor.remote(
        config.sandbox.workers, config.sandbox.timeout_s, config.sandbox.memory_mb, config.sandbox.pin_cpus)
        for _ in range(config.sandbox.num_actors)]
    executor = SandboxExecutor(sandbox, config.sandbox.timeout_s)
    student = start_student(config.student, model_path, run.root / "student")
    teacher = start_teacher_actor(config.teacher, run.teacher_cache, executor, student, config.student.prompt_format,
                                  state.teacher if state else None, gate)
    examples = Queue(maxsize=2 * config.trainer.batch_examples * config.trainer.publish_every_steps)
    trainer = start_trainer(config, model_path, run.root, examples)
    evaluator = EvaluatorActor.options(**config.eval.resources.ray_options()).remote(
        student, executor, heldout, config.eval)
    return Actors(student=student, teacher=teacher, trainer=trainer, evaluator=evaluator, executor=executor,
                  examples=examples, tokenizer=AutoTokenizer.from_pretrained(model_path))


def _scheduler(actors: Actors, gate: ray.actor.ActorHandle | None,
               sleep_mode: bool) -> Callable[[LoopMetrics], Scheduler]:
    """The loop's scheduler: colocated where there is a phase gate (the colocated placement starts one),
    else concurrent."""
    if gate is None:
        return ConcurrentScheduler
    handover = Handover(gate, actors.student, sleep_mode)
    return lambda metrics: ColocatedScheduler(metrics, handover)


@dataclass
class Handover:
    """The colocated scheduler's `Engine`: at a training phase, close the phase gate (self-repairs wait, those
    under way finish) and, on a GPU, put the engine to sleep; at a generation phase, the reverse."""

    gate: ray.actor.ActorHandle
    student: ray.actor.ActorHandle
    sleep_mode: bool

    async def sleep(self) -> None:
        await self.gate.close.remote()
        if self.sleep_mode:
            await self.student.sleep.remote()

    async def wake_up(self) -> None:
        if self.sleep_mode:
            await self.student.wake_up.remote()
        await self.gate.open.remote()


def _execute(config: Config, run: RunDir, state: LoopState | None) -> RunSummary:
    started = time.monotonic()
    local = connect(config)
    placement = resolve(config, ray.cluster_resources().get("GPU", 0.0), local)
    config = place(config, placement)
    log.info("placement: %s (config: %s; persd_online/placement.py)", placement, config.placement)
    pool, heldout = _tasks(config)
    run.event("start", pool=config.tasks.pool, tasks=len(pool), heldout={k: len(v) for k, v in heldout.items()},
              teacher=config.teacher.kinds, resumed=state is not None, placement=placement)
    if "reference_oracle" in config.teacher.kinds:
        log.warning("teacher.tiers includes reference_oracle: its refinements are the tasks' reference solutions, "
                    "an ORACLE baseline (InpD), not PERsD; the default tiers [self, reference_repair] personalise.")
    gate = start_phase_gate() if placement == "colocated" else None
    actors = _start_actors(config, run, heldout, state, gate)
    try:
        loop = OnlineLoop(config, run, pool, actors, state, startup_s=time.monotonic() - started,
                          scheduler=_scheduler(actors, gate, config.student.sleep_mode))
        summary = asyncio.run(loop.run())
    finally:
        stop_student(actors.student)
    run.write_summary(summary)
    run.event("end", stop_reason=summary.stop_reason)
    for path in build_report(run.root):
        log.info("report: %s", path)
    return summary


def describe(root: Path, s: RunSummary) -> str:
    """A few lines for the terminal: what the run did and where its results are."""
    change = s.heldout_change
    curve = "\n    ".join(describe_change(name, c) for name, c in sorted(change.items())) or "; ".join(
        f"{name} v{a['adapter_version']} {a['pass1']:.3f} -> v{b['adapter_version']} {b['pass1']:.3f}"
        for name, (a, b) in sorted(base_vs_final(s.heldout).items()))
    before, after = s.trained_task_pass_before, s.trained_task_pass_after
    trained = "n/a" if before is None else f"{before:.3f} -> {after:.3f}"
    return (f"run {root} stopped: {s.stop_reason}\n"
            f"  {s.attempts} attempts ({s.attempts_passed} passed), "
            f"{s.teacher_calls} teacher calls ({', '.join(s.teacher.get('order', [s.teacher.get('kind')]))}), "
            f"{s.refinements_verified} verified refinements ({s.examples_distinct} distinct labels), "
            f"{s.examples_trained} examples trained in {s.train_steps} steps\n"
            f"  adapters: {s.adapters_published} published, {s.adapters_loaded_by_student} "
            f"loaded by the student\n"
            f"  held-out pass@1, base student -> trained adapter:\n    {curve}\n"
            f"  greedy pass rate on the {s.trained_tasks} trained tasks, v0 -> final: {trained}\n"
            f"  summary: {root / 'summary.json'}; report: {root / 'report'}")


def run(config: Config) -> tuple[Path, RunSummary]:
    """A fresh run of `config`; returns its directory and summary."""
    run_dir = RunDir.create(config)
    log.info("run directory: %s", run_dir.root)
    try:
        return run_dir.root, _execute(config, run_dir, None)
    finally:
        run_dir.close()


def resume(root: str | Path, overrides: list[str] | None = None) -> tuple[Path, RunSummary]:
    """Continue the run in `root` from its last checkpoint (`overrides`: e.g. `budget.max_wall_s=2000`;
    budgets count the whole run, so a resumed run needs a larger one to go on)."""
    run_dir, config = RunDir.resume(root, overrides)
    checkpoint = run_dir.checkpoints / "loop.json"
    state = LoopState(**json.loads(checkpoint.read_text())) if checkpoint.exists() else None
    log.info("resuming %s from %s", run_dir.root, "its checkpoint" if state else "the start (no checkpoint yet)")
    try:
        return run_dir.root, _execute(config, run_dir, state)
    finally:
        run_dir.close()

"""Is the idle side of the colocated placement really idle? The student's engine and the trainer, each a Ray
actor bound to every core as the colocated placement binds them, do their work, then wait; this measures the
CPU their processes burn while they wait (process CPU seconds over the wait, in cores), and what each OpenMP
wait policy costs the work itself.

OpenMP threads spin at barriers before they sleep: how long is the wait policy's business (`OMP_WAIT_POLICY`:
unset = the runtime's default, PASSIVE = sleep at once, ACTIVE = spin). ACTIVE is the control that shows what
spinning looks like in this measure. What it found decided `placement.py`: the default already idles, and
PASSIVE slowed the trainer, so the colocated placement sets no wait policy.

For each policy, in one run: the student actor (vLLM, both cores, merged serving) generates the loop's first
attempts for `--tasks` MBPP train tasks (2 samples each; tokens/s), then waits `--idle-s`; the trainer actor
(peft LoRA, both cores) takes optimizer steps on `--steps` steps' worth of MBPP reference examples (mean s/step,
after a warm-up step), then waits `--idle-s`.

Writes `benchmarks/results/idle_cores.json` (per policy: idle cores used by each side, tokens/s, s/step; the
baseline is the unset policy). Run: `python benchmarks/idle_cores.py` (about 3 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import ray
from ray.util.queue import Queue

from persd_online.atomic import write_text
from persd_online.config import Resources, load_config
from persd_online.formats import stand_examples
from persd_online.models import prepare_model
from persd_online.student import start_student, stop_student
from persd_online.tasks import load_mbpp
from persd_online.trainer import start_trainer

log = logging.getLogger("benchmarks.idle_cores")
RESULT = Path(__file__).parent / "results" / "idle_cores.json"
POLICIES = {"unset": {}, "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"}, "ACTIVE": {"OMP_WAIT_POLICY": "ACTIVE"}}


def idle_cores(actor: ray.actor.ActorHandle, seconds: float) -> float:
    """CPU seconds the actor's process (all its threads) used over `seconds` of waiting, per second: cores busy."""
    from ray.util.state import get_actor

    process = psutil.Process(get_actor(actor._actor_id.hex()).pid)
    before = sum(process.cpu_times()[:2])
    time.sleep(seconds)
    return (sum(process.cpu_times()[:2]) - before) / seconds


def measure(policy: dict[str, str], model: Path, args: argparse.Namespace) -> dict[str, Any]:
    cores = list(range(os.cpu_count() or 1))
    config = load_config(None, ["trainer.warmup_steps=0", "trainer.publish_every_steps=1000"])
    student_config = config.student.model_copy(update={"cpu_cores": cores, "cpu_kvcache_gib": 1,
                                                       "resources": Resources(num_cpus=1, env=policy)})
    tasks = load_mbpp("train")[:args.tasks]
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="persd-idle-") as work:
        student = start_student(student_config, model, work)
        try:
            ray.get(student.generate.remote(tasks[:2], 1))  # warm-up
            start = time.perf_counter()
            attempts = ray.get(student.generate.remote(tasks, 2))
            seconds = time.perf_counter() - start
            out["student_tokens_per_s"] = sum(a.completion_tokens for a in attempts) / seconds
            out["student_idle_cores"] = idle_cores(student, args.idle_s)
        finally:
            stop_student(student)
        trainer_config = config.model_copy(update={"trainer": config.trainer.model_copy(update={
            "cpu_cores": cores, "resources": Resources(num_cpus=1, env=policy)})})
        queue = Queue()
        trainer = start_trainer(trainer_config, model, work, queue)
        try:
            from transformers import AutoTokenizer

            made = stand_examples(load_mbpp("train")[:200], AutoTokenizer.from_pretrained(model), "chat")
            per_step = trainer_config.trainer.batch_examples
            for example in made[:per_step]:
                queue.put(example.model_copy(update={"adapter_version": 0}))
            before = ray.get(trainer.train.remote(5.0))  # warm-up: the first steps
            for example in made[per_step:per_step * (args.steps + 1)]:
                queue.put(example.model_copy(update={"adapter_version": 0}))
            stats = ray.get(trainer.train.remote(5.0))
            out["trainer_steps_timed"] = stats["train_steps"] - before["train_steps"]
            out["trainer_s_per_step"] = (stats["busy_s"] - before["busy_s"]) / out["trainer_steps_timed"]
            out["trainer_idle_cores"] = idle_cores(trainer, args.idle_s)
        finally:
            ray.kill(trainer)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=12)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--idle-s", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    model = prepare_model()
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=os.cpu_count(), include_dashboard=True, log_to_driver=False)
    try:
        runs = {name: measure(env, model, args) for name, env in POLICIES.items()}
    finally:
        ray.shutdown()
    for name, r in runs.items():
        log.info("%s: %s", name, {k: round(v, 3) for k, v in r.items()})
    base = runs["unset"]
    result = {
        "baseline": "OMP_WAIT_POLICY unset (the OpenMP runtime's default)",
        "passive_over_unset": {key: runs["PASSIVE"][key] / base[key] if base[key] else None
                               for key in ("student_tokens_per_s", "trainer_s_per_step")},
        "runs": runs,
        "settings": {"tasks": f"mbpp:train[:{args.tasks}]", "samples": 2, "steps": args.steps,
                     "idle_s": args.idle_s, "cores": os.cpu_count()},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "date": time.strftime("%Y-%m-%d"),
    }
    write_text(args.out, json.dumps(result, indent=2) + "\n")
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()

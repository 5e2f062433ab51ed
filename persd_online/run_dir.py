"""The run directory: the one place a run writes, and the contract users and `--resume` read.

    runs/<name>/
      config.yaml        the resolved config (every default spelled out)
      events.jsonl       one line per thing that happened: {"t": unix time, "kind": ..., ...fields}
      metrics.jsonl      periodic metric snapshots: {"t": ..., name: value, ...}
      summary.json       end-of-run figures (`summary.RunSummary`, written atomically)
      adapters/vNNNN/    published LoRA versions, each complete only with its marker (`adapters.py`)
      checkpoints/       trainer, curriculum and loop state for --resume
      teacher_cache/     content-addressed teacher responses
      report/            PNG plots and a markdown summary

Invariants: JSONL files are append-only and flushed per line, so a crash loses at most the line being
written, and readers skip a torn last line; whole-file writes (summary, checkpoints) are atomic.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from persd_online import atomic
from persd_online.config import Config, dump_config, load_config
from persd_online.summary import RunSummary


class RunDir:
    """An open run directory (new or resumed)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        for sub in ("adapters", "checkpoints", "teacher_cache", "report"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self._events: IO[str] = (root / "events.jsonl").open("a", encoding="utf-8", buffering=1)
        self._metrics: IO[str] = (root / "metrics.jsonl").open("a", encoding="utf-8", buffering=1)
        self._timeline: IO[str] = (root / "timeline.jsonl").open("a", encoding="utf-8", buffering=1)

    @classmethod
    def create(cls, config: Config) -> RunDir:
        """A fresh directory `runs_dir/name`, or `name-2`, `name-3`… if taken; records the config."""
        base = Path(config.runs_dir) / config.name
        root, n = base, 1
        while root.exists():
            n += 1
            root = base.with_name(f"{config.name}-{n}")
        root.mkdir(parents=True)
        atomic.write_text(root / "config.yaml", dump_config(config))
        return cls(root)

    @classmethod
    def resume(cls, root: str | Path, overrides: list[str] | None = None) -> tuple[RunDir, Config]:
        """Reopen an existing run and its recorded config; `overrides` (e.g. a larger budget) are recorded."""
        root = Path(root)
        if not (root / "config.yaml").is_file():
            raise FileNotFoundError(f"{root} is not a run directory (no config.yaml); cannot resume it")
        config = load_config(root / "config.yaml", overrides)
        if overrides:
            atomic.write_text(root / "config.yaml", dump_config(config))
        return cls(root), config

    @property
    def adapters(self) -> Path:
        return self.root / "adapters"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def teacher_cache(self) -> Path:
        return self.root / "teacher_cache"

    @property
    def report(self) -> Path:
        return self.root / "report"

    def event(self, kind: str, **fields: Any) -> None:
        """Append one event line."""
        self._events.write(json.dumps({"t": round(time.time(), 3), "kind": kind, **fields}, default=str) + "\n")

    def metrics(self, snapshot: dict[str, Any]) -> None:
        """Append one metrics snapshot."""
        self._metrics.write(json.dumps({"t": round(time.time(), 3), **snapshot}, default=str) + "\n")

    def timeline(self, intervals: list[dict[str, Any]]) -> None:
        """Append stage busy intervals ({"stage", "start", "end"}, epoch seconds; `persd_online.timeline`)."""
        self._timeline.writelines(json.dumps(i) + "\n" for i in intervals)

    def write_summary(self, summary: RunSummary) -> None:
        summary.write(self.root / "summary.json")

    def close(self) -> None:
        self._events.close()
        self._metrics.close()
        self._timeline.close()


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """The records of an append-only JSONL file, skipping a torn last line left by a crash."""
    with Path(path).open(encoding="utf-8") as fh:
        lines = fh.readlines()
    for i, line in enumerate(lines):
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise

"""Adapter versions on disk: the directory protocol between the trainer, which publishes LoRA adapters, and
the student and the offline commands, which read them.

    <adapters_dir>/
      v0001/                a published version (`version_dir`): peft's adapter files, `adapter_version.json`
                            (`VERSION_FILE`: version, step, examples seen, trained example ids, loss, staleness)
                            and an empty `COMPLETE` marker (`MARKER`)
      .v0002.tmp-XXXXXXXX/  a version being written (`atomic.publish_dir`'s staging directory)

Outside an adapters directory the same marker rule holds for any published adapter directory (the student's
zero adapter).

Invariants:
- a directory counts as published only when it holds the marker: `publish` builds it in a staging directory,
  writes the marker last, fsyncs and renames it into place, so a reader never sees a half-written adapter, and
  a directory without the marker is never listed (`published_versions`) nor loaded (`check_published`);
- published directories are immutable: publishing over an existing one raises FileExistsError, so a version
  number is never reused; versions start at 1 (version 0 is the student's zero adapter, kept elsewhere);
- a version lives in `v` + its number in four digits; only names of that form are listed, so staging
  directories are not;
- `adapter_version.json` names the version its directory holds; a directory whose metadata names another
  version is refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from persd_online import atomic

MARKER = "COMPLETE"
VERSION_FILE = "adapter_version.json"


class AdapterNotReadyError(FileNotFoundError):
    """An adapter directory without its completion marker (not yet, or never, fully published)."""


def version_dir(adapters_dir: str | Path, version: int) -> Path:
    """The directory of `version` under `adapters_dir` (published or not)."""
    return Path(adapters_dir) / f"v{version:04d}"


def is_published(directory: str | Path) -> bool:
    """Whether `directory` is a completely published adapter (its marker is there)."""
    return (Path(directory) / MARKER).is_file()


def publish(target: str | Path, build: Callable[[Path], None]) -> Path:
    """Publish the adapter directory that `build(staging)` writes at `target`, atomically, marker last."""
    return atomic.publish_dir(target, build, marker=MARKER)


def publish_version(adapters_dir: str | Path, version: int, save: Callable[[Path], None],
                    meta: dict[str, Any]) -> Path:
    """Publish `version` under `adapters_dir`: `save(staging)` writes the adapter's files, `meta` (which names
    this version, or is given its number) goes to `VERSION_FILE`. Returns the version's directory."""
    if meta.get("version", version) != version:
        raise ValueError(f"metadata names version {meta['version']}, but version {version} is published")

    def build(staging: Path) -> None:
        save(staging)
        (staging / VERSION_FILE).write_text(json.dumps({"version": version, **meta}, indent=1))

    return publish(version_dir(adapters_dir, version), build)


def published_versions(adapters_dir: str | Path) -> list[int]:
    """Complete versions under `adapters_dir`, ascending."""
    return sorted(int(p.name[1:]) for p in Path(adapters_dir).glob("v[0-9][0-9][0-9][0-9]") if is_published(p))


def latest(adapters_dir: str | Path) -> int:
    """The newest complete version under `adapters_dir` (0: none)."""
    return max(published_versions(adapters_dir), default=0)


def read_metadata(directory: str | Path) -> dict[str, Any] | None:
    """The `VERSION_FILE` of an adapter directory (None: it has none, as the zero adapter)."""
    meta = Path(directory) / VERSION_FILE
    return json.loads(meta.read_text()) if meta.is_file() else None


def check_published(version: int, directory: str | Path) -> None:
    """Raise unless `directory` is a completely published adapter that may be served as `version`:
    AdapterNotReadyError without its marker, ValueError when its metadata names another version."""
    directory = Path(directory)
    if not is_published(directory):
        raise AdapterNotReadyError(
            f"adapter version {version} at {directory} has no {MARKER} marker: it is not (fully) published. "
            f"Load a version only after the trainer has written {directory / MARKER}."
        )
    recorded = (read_metadata(directory) or {}).get("version")
    if recorded is not None and recorded != version:
        raise ValueError(f"{directory / VERSION_FILE} says version {recorded}, but it was loaded as version {version}")

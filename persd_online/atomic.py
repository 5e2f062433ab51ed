"""Atomic writes: a reader sees either the old content or the whole new content, never a part.

Files: write a temporary sibling, fsync it, rename it over the target, fsync the directory.
Directories: build in a temporary sibling, fsync every file, rename into place; readers that need a
completion signal look for a marker file written last (see `publish_dir`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory below `root` (and `root` itself)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(dirpath))


def write_text(path: str | Path, text: str) -> None:
    """Replace `path` with `text` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def publish_dir(target: str | Path, build: Callable[[Path], None], *, marker: str) -> Path:
    """Build a directory with `build(staging)` and publish it at `target` with the file `marker` written last
    (each kind of directory names its own: `adapters.MARKER`, `merge.MARKER`).

    `target` must not exist yet: a published directory is never overwritten. A crash at any point
    leaves either nothing at `target` or a complete directory with its marker.
    """
    target = Path(target)
    if target.exists():
        raise FileExistsError(f"{target} is already published; published directories are immutable")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(staging)
        (staging / marker).write_text("")
        fsync_tree(staging)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_dir(target.parent)
    return target

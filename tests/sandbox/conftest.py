"""Fixtures for the sandbox tests: a shared pool, the task data, and a secret the programs must never see."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox import SandboxPool

REPO = Path(__file__).resolve().parents[2]
# Set before any pool starts, so every worker process inherits it: jobs must still not be able to read it.
SECRET = f"persd-sandbox-secret-{uuid.uuid4().hex}"
os.environ["PERSD_SANDBOX_TEST_SECRET"] = SECRET
TIMEOUT = 2.0
# 512 MiB of address space per process: enough for every task, and small enough that a memory bomb reaches
# the limit well inside the time limit even where first-touch page faults are slow (fresh VM memory).
MEMORY_MB = 512


def data_file(*names: str) -> Path:
    """The first of ``names`` found in the vendored data, else in ``../shared/data`` beside the clone."""
    for base in (REPO / "persd_online" / "data", REPO.parent / "shared" / "data"):
        for name in names:
            if (base / name).exists():
                return base / name
    raise FileNotFoundError(f"task data {names} not found under persd_online/data (vendored with the project) "
                            f"or ../shared/data: the checkout is incomplete")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def pool() -> Iterator[SandboxPool]:
    with SandboxPool(workers=2, timeout=TIMEOUT, memory_mb=MEMORY_MB) as shared:
        yield shared


@pytest.fixture(scope="session")
def humaneval() -> list[dict[str, Any]]:
    return read_jsonl(data_file("humaneval_seen_hidden.jsonl", "humaneval.jsonl"))


@pytest.fixture(scope="session")
def mbpp() -> list[dict[str, Any]]:
    return read_jsonl(data_file("mbpp.jsonl"))

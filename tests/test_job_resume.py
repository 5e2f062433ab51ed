"""A run submitted with `ray job submit` to a local `ray start --head` cluster, its driver killed (SIGKILL)
mid-run, then resumed with `persd-online run --resume`: versions and counters continue, no published
version is rewritten, and nothing is trained twice as fresh data. It runs the disaggregated placement (the
student on core 0 and the trainer on core 1, at once); tests/test_loop_e2e.py runs the colocated one, so both
placements run on the real stack."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from persd_online import adapters

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(runs_dir: Path) -> list[str]:
    return [f"runs_dir={runs_dir}", "name=jobrun", "tasks.limit=6", "eval.limit=1", "eval.max_new_tokens=32",
            "eval.every_versions=100", "student.max_new_tokens=192", "student.tasks_per_batch=6",
            "trainer.lr=1e-3", "trainer.warmup_steps=0", "trainer.publish_every_steps=1",
            "checkpoint_every_s=10", "budget.max_wall_s=900", "placement=disaggregated"]


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout_s:.0f} s")
        time.sleep(2)


@pytest.fixture
def cluster(tmp_path):
    env = os.environ | {"RAY_AUTH_MODE": "disabled"}
    port, dashboard = free_port(), free_port()
    subprocess.run([BIN / "ray", "start", "--head", f"--port={port}", "--num-cpus=3", "--include-dashboard=true",
                    f"--dashboard-port={dashboard}", "--disable-usage-stats"], check=True, env=env,
                   capture_output=True, timeout=120)
    try:
        yield f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}", env
    finally:
        subprocess.run([BIN / "ray", "stop", "--force"], env=env, capture_output=True, timeout=120)


def published(root: Path) -> dict[int, str]:
    return {v: (adapters.version_dir(root / "adapters", v) / adapters.VERSION_FILE).read_text()
            for v in adapters.published_versions(root / "adapters")}


def test_submitted_job_killed_then_resumed(student_model, tmp_path, cluster) -> None:
    address, dashboard, env = cluster
    runs = tmp_path / "runs"
    root = runs / "jobrun"
    cmd = [str(BIN / "persd-online"), "run", *(a for o in overrides(runs) for a in ("--set", o))]
    job = subprocess.Popen([BIN / "ray", "job", "submit", f"--address={dashboard}", "--working-dir", str(REPO),
                            "--", *cmd], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: len(published(root)) >= 2 and (root / "checkpoints" / "loop.json").is_file(), 600,
                 "second adapter version and run checkpoint from the submitted job")
        wait_for(lambda: json.loads((root / "checkpoints" / "loop.json").read_text())["ledger"]["counts"][
            "attempts"] > 0, 120, "checkpoint with attempts")
        driver = subprocess.run(["pgrep", "-f", "^[^ ]+ [^ ]*persd-online run --set runs_dir"], capture_output=True,
                                text=True).stdout.split()
        assert driver, "the job's driver process was not found"
        for pid in driver:
            os.kill(int(pid), signal.SIGKILL)
    finally:
        job.wait(timeout=120)
    before = published(root)
    checkpoint = json.loads((root / "checkpoints" / "loop.json").read_text())
    time.sleep(5)  # let Ray reap the dead driver's actors

    resumed = subprocess.run(
        [BIN / "persd-online", "run", "--resume", str(root), "--set", f"ray.address={address}",
         "--set", f"budget.max_versions={max(before) + 1}"],
        env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    summary = json.loads((root / "summary.json").read_text())
    after = published(root)
    assert all(after[v] == text for v, text in before.items())  # no version rewritten
    assert max(after) >= max(before) + 1 and summary["adapters_published"] == max(after)
    assert summary["attempts"] > checkpoint["ledger"]["counts"]["attempts"]  # counts continue from the checkpoint
    assert summary["heldout_pass1"][0] == [0, checkpoint["evals"][0]["pass1"]]  # the curve continues
    trained = [i for text in after.values() for i in json.loads(text)["example_ids"]]
    assert len(trained) == len(set(trained))  # nothing trained twice as fresh data
    starts = [json.loads(line) for line in (root / "events.jsonl").read_text().splitlines()
              if '"kind": "start"' in line]
    assert [s["resumed"] for s in starts] == [False, True]
    assert {s["placement"] for s in starts} == {summary["placement"]} == {"disaggregated"}

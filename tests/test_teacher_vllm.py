"""The teacher against a real vLLM OpenAI server (the small student checkpoint stands in for a teacher)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from persd_online.cascade import build_tier
from persd_online.config import OpenAITier
from persd_online.tasks import Task
from persd_online.teacher import TeacherConfigError

START_TIMEOUT_S = 300
TASK = Task(task_id="t/add", prompt="Return the sum of a and b.", entry_point="add",
            tests=["assert add(1, 2) == 3"], reference="def add(a, b):\n    return a + b\n")
WRONG = "def add(a, b):\n    return a - b\n"
FEEDBACK = "Input: add(1, 2)\nOutput: -1\nExpected: 3"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(proc: subprocess.Popen, url: str, log_path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vLLM server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    pytest.fail(f"vLLM server not healthy after {START_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def vllm_server(student_model, tmp_path_factory):
    """(base_url, served model name) of a vLLM server started for this module and always stopped."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("vllm") / "server.log"
    env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(student_model),
               "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048",
               "--host", "127.0.0.1", "--port", str(port)]
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        _wait_healthy(proc, f"http://127.0.0.1:{port}/health", log_path)
        yield f"http://127.0.0.1:{port}/v1", str(student_model)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.mark.slow
def test_teacher_against_a_real_vllm_server(vllm_server, tmp_path):
    base_url, model = vllm_server
    cfg = OpenAITier(base_url=base_url, model=model, max_tokens=96,
                     api_key_env="PERSD_TEST_UNSET", price_per_completion_token=1e-6)

    async def one_run():
        teacher = build_tier(cfg, tmp_path)
        return teacher, await teacher.propose(TASK, "a-1", WRONG, FEEDBACK, 1)

    teacher, first = asyncio.run(one_run())
    assert 50 < first.prompt_tokens and 0 < first.completion_tokens <= 96
    assert first.cost_usd == pytest.approx(first.completion_tokens * 1e-6) and not first.cached
    assert isinstance(first.program, str) and first.program.strip()
    assert teacher.describe()["calls"] == 1
    resumed, again = asyncio.run(one_run())
    assert again.cached and again.program == first.program
    assert (resumed.describe()["calls"], resumed.describe()["cache_hits"]) == (0, 1)

    unknown = cfg.model_copy(update={"model": "no-such-model"})
    with pytest.raises(TeacherConfigError, match="HTTP 404"):
        asyncio.run(build_tier(unknown, tmp_path).propose(TASK, "a-1", WRONG, FEEDBACK, 1))

"""The student over an external `vllm serve --enable-lora` (a real loopback server), swapping live."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from persd_online.config import StudentConfig
from persd_online.engine import Sampling
from persd_online.prompts import attempt_prompt, extract_program
from persd_online.student import AdapterDeliveryError, Student
from persd_online.student_server import wait_until_healthy
from persd_online.tasks import load_mbpp
from tests.lora_fixtures import AdapterFactory

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 300
TASK = load_mbpp("train")[0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server_url(student_model, tmp_path_factory):
    """A vLLM OpenAI server with runtime LoRA updates, started for this module and always stopped."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("server") / "vllm.log"
    env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
                        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}
    # `python -m`: the `vllm serve` script fails under the vllm-cpu distribution name (PackageNotFoundError).
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(student_model),
               "--enable-lora", "--max-lora-rank", "16", "--max-loras", "2", "--dtype", "float32",
               "--enforce-eager", "--max-model-len", "1024", "--host", "127.0.0.1", "--port", str(port)]
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # its own process group: kill the engine core too
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until_healthy(url, START_TIMEOUT_S)
        except TimeoutError:
            pytest.fail(f"vLLM server not healthy (exit code {proc.poll()}):\n{log_path.read_text()[-3000:]}")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def test_the_server_backend_generates_attempts_and_swaps_adapters_live(server_url, student_model, tmp_path):
    config = StudentConfig(backend="vllm_server", server_url=server_url, max_loras=1, max_new_tokens=32)
    student = Student(config, student_model, tmp_path / "student")
    factory = AdapterFactory(student_model, tmp_path / "adapters")
    try:
        assert student.engine.adapters() == {0}
        report = student.load_adapter(1, factory.publish(1, seed=1, scale=0.5))
        assert report.logprob_delta > 1e-2 and report.loaded_versions == (0, 1)

        attempts = student.generate([TASK], n=2)
        assert [(a.adapter_version, a.sample_index) for a in attempts] == [(1, 0), (1, 1)]
        assert all(0 < a.completion_tokens <= 32 and a.prompt_tokens > 20 for a in attempts)
        assert all(a.program == extract_program(TASK, a.completion, "chat") for a in attempts)
        greedy = Sampling(temperature=0.0, max_tokens=16)
        base, trained = (s[0].text for s in student.generate_prompts(
            [attempt_prompt(TASK, "chat")] * 2, greedy, version=[0, 1]))
        assert base != trained

        with pytest.raises(AdapterDeliveryError, match="changed no probe log-prob"):
            student.load_adapter(2, factory.publish(2, seed=1, scale=0.5))
        student.load_adapter(3, factory.publish(3, seed=3, scale=0.5))
        assert student.loaded_versions() == [0, 3] and student.engine.adapters() == {0, 3}  # 1 unloaded
    finally:
        student.shutdown()

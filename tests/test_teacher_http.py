"""The OpenAI-compatible teacher against a real HTTP server on loopback (tests/openai_stub_server.py).

Covers the request PERsD sends, key handling, retries (429, 500, dropped connections, timeouts), outage,
misconfiguration (401, 404), the content-addressed cache, the hard budget and checkpointed counters.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket

import pytest
from openai_stub_server import ANSWER, Reply, StubOpenAIServer

from persd_online.budget import BudgetExhausted
from persd_online.cascade import build_tier
from persd_online.config import OpenAITier
from persd_online.prompts import teacher_refinement_messages
from persd_online.tasks import Task
from persd_online.teacher import OpenAITeacher, TeacherConfigError, TeacherUnavailable
from persd_online.teacher_cache import TeacherCache, content_address

KEY_ENV = "PERSD_TEST_TEACHER_KEY"
SECRET = "sk-test-secret-0123456789"
TASK = Task(task_id="t/add", prompt="Return the sum of a and b.", entry_point="add",
            tests=["assert add(1, 2) == 3"], reference="def add(a, b):\n    return a + b\n")
WRONG = "def add(a, b):\n    return a - b\n"
FEEDBACK = "Input: add(1, 2)\nOutput: -1\nExpected: 3"


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    with StubOpenAIServer(api_key=SECRET) as srv:
        yield srv


def config(server: StubOpenAIServer, **overrides) -> OpenAITier:
    """A fast-retrying teacher config for `server`."""
    fields = dict(base_url=server.base_url, model=server.model, api_key_env=KEY_ENV,
                  max_retries=3, backoff_initial_s=0.01, backoff_max_s=0.05, timeout_s=5.0)
    return OpenAITier(**(fields | overrides))


def propose(teacher: OpenAITeacher, program: str = WRONG, round_no: int = 1):
    return teacher.propose(TASK, "attempt-1", program, FEEDBACK, round_no)


def run(coro_fn, *args):
    """Run `coro_fn(*args)` on a fresh event loop (the teacher's client lives inside it)."""
    return asyncio.run(coro_fn(*args))


def test_refinement_request_extraction_and_accounting(server, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    cfg = config(server, price_per_prompt_token=0.001, price_per_completion_token=0.002)

    async def main():
        teacher = build_tier(cfg, tmp_path)
        return teacher, await propose(teacher)

    teacher, refinement = run(main)
    (sent,) = server.requests
    assert sent["messages"] == teacher_refinement_messages(TASK, WRONG, FEEDBACK, None)
    assert (sent["model"], sent["temperature"], sent["max_tokens"]) == (server.model, 0.0, cfg.max_tokens)
    assert refinement.program == "def add(a, b):\n    return a + b\n"
    assert refinement.teacher_call_id == content_address(sent)
    assert (refinement.attempt_id, refinement.task_id, refinement.round) == ("attempt-1", TASK.task_id, 1)
    assert (refinement.prompt_tokens, refinement.completion_tokens, refinement.cached) == (10, 5, False)
    assert refinement.cost_usd == pytest.approx(10 * 0.001 + 5 * 0.002)
    summary = teacher.describe()
    assert summary["kind"] == "openai" and summary["model"] == server.model
    assert (summary["calls"], summary["prompt_tokens"], summary["completion_tokens"]) == (1, 10, 5)
    assert summary["cost_usd"] == pytest.approx(0.02)
    assert SECRET not in caplog.text and SECRET not in json.dumps(summary)


def test_reference_is_shown_only_when_configured(server, tmp_path):
    async def main(include):
        return await propose(OpenAITeacher(config(server, include_reference=include), None))

    run(main, False)
    run(main, True)
    without, with_reference = (r["messages"][-1]["content"] for r in server.requests)
    assert TASK.reference.strip() not in without
    assert TASK.reference.strip() in with_reference


def test_unset_key_sends_placeholder_and_says_so(monkeypatch, caplog):
    monkeypatch.delenv(KEY_ENV, raising=False)
    caplog.set_level(logging.INFO, logger="persd_online.teacher")
    with StubOpenAIServer(api_key="EMPTY") as srv:  # accepts only the placeholder
        refinement = run(lambda: propose(OpenAITeacher(config(srv), None)))
    assert refinement.program.startswith("def add")
    assert f"${KEY_ENV} is not set" in caplog.text


def test_retries_after_429_500_and_dropped_connection(server):
    server.script(Reply(status=429, headers={"Retry-After": "0"}), Reply(status=500), Reply(drop=True))

    async def main():
        teacher = OpenAITeacher(config(server), None)
        return teacher, await propose(teacher)

    teacher, refinement = run(main)
    assert len(server.requests) == 4
    assert refinement.program.startswith("def add")
    summary = teacher.describe()
    assert (summary["calls"], summary["retries"], summary["prompt_tokens"]) == (1, 3, 10)


def test_timeout_is_retried(server):
    server.script(Reply(delay_s=1.0))
    refinement = run(lambda: propose(OpenAITeacher(config(server, timeout_s=0.2), None)))
    assert len(server.requests) == 2 and refinement.program.startswith("def add")


def test_outage_raises_unavailable_after_bounded_retries(server):
    server.default = Reply(status=503)
    with pytest.raises(TeacherUnavailable, match="HTTP 503") as info:
        run(lambda: propose(OpenAITeacher(config(server, max_retries=2), None)))
    assert len(server.requests) == 3
    assert server.base_url in str(info.value)


def test_refused_connection_is_an_outage(tmp_path):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = OpenAITier(base_url=f"http://127.0.0.1:{port}/v1", model="m", max_retries=1, backoff_initial_s=0.01,
                     cache=False)
    with pytest.raises(TeacherUnavailable, match="APIConnectionError"):
        run(lambda: propose(build_tier(cfg, None)))


def test_bad_key_is_an_early_config_error(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-wrong-key-9876")
    with pytest.raises(TeacherConfigError) as info:
        run(lambda: propose(OpenAITeacher(config(server), None)))
    message = str(info.value)
    assert len(server.requests) == 1  # never retried
    for part in (server.base_url, server.model, "HTTP 401", "Incorrect API key", f"${KEY_ENV}"):
        assert part in message
    assert "sk-wrong-key-9876" not in message


def test_unknown_model_is_a_config_error(server):
    with pytest.raises(TeacherConfigError) as info:
        run(lambda: propose(OpenAITeacher(config(server, model="no-such-model"), None)))
    message = str(info.value)
    for part in ("HTTP 404", "`no-such-model` does not exist", "the tier's model"):
        assert part in message


def test_repeated_run_is_served_from_the_cache(server, tmp_path):
    cfg = config(server, price_per_prompt_token=0.01)

    async def one_run():
        teacher = build_tier(cfg, tmp_path / "teacher_cache")  # a fresh teacher: a resumed run
        return teacher, await propose(teacher)

    _, first = run(one_run)
    teacher, again = run(one_run)
    assert len(server.requests) == 1
    assert again.program == first.program and again.teacher_call_id == first.teacher_call_id
    assert (again.cached, again.prompt_tokens, again.completion_tokens, again.cost_usd) == (True, 0, 0, 0.0)
    assert (teacher.describe()["calls"], teacher.describe()["cache_hits"]) == (0, 1)
    key = first.teacher_call_id
    entry = json.loads((tmp_path / "teacher_cache" / key[:2] / f"{key}.json").read_text())
    assert entry["request"] == server.requests[0] and entry["response"]["content"] == ANSWER


def test_identical_concurrent_requests_pay_once(server, tmp_path):
    server.default = Reply(delay_s=0.2)

    async def main():
        teacher = build_tier(config(server), tmp_path)
        return await asyncio.gather(propose(teacher), propose(teacher))

    results = run(main)
    assert len(server.requests) == 1
    assert sorted(r.cached for r in results) == [False, True]


def test_damaged_cache_entry_is_a_miss_and_is_rewritten(server, tmp_path):
    first = run(lambda: propose(build_tier(config(server), tmp_path)))
    path = TeacherCache(tmp_path).path(first.teacher_call_id)
    path.write_text("{truncated")
    again = run(lambda: propose(build_tier(config(server), tmp_path)))
    assert len(server.requests) == 2 and not again.cached
    assert json.loads(path.read_text())["key"] == first.teacher_call_id


@pytest.mark.parametrize("limit", [{"budget_tokens": 20}, {"budget_usd": 0.3}])
def test_budget_stops_paid_calls_but_not_cache_hits(server, tmp_path, limit):
    # Each call: 10 + 5 tokens, $0.15; the limit is reached after two.
    cfg = config(server, price_per_prompt_token=0.01, price_per_completion_token=0.01, **limit)

    async def main():
        teacher = build_tier(cfg, tmp_path)
        await propose(teacher, "def add(a, b):\n    return 1\n")
        await propose(teacher, "def add(a, b):\n    return 2\n")
        with pytest.raises(BudgetExhausted, match="teacher budget exhausted"):
            await propose(teacher, "def add(a, b):\n    return 3\n")
        cached = await propose(teacher, "def add(a, b):\n    return 1\n")
        return teacher, cached

    teacher, cached = run(main)
    assert len(server.requests) == 2 and cached.cached
    assert teacher.describe()["prompt_tokens"] == 20


def test_concurrent_calls_overshoot_the_budget_by_at_most_those_in_flight(server):
    server.default = Reply(delay_s=0.1)
    cfg = config(server, budget_tokens=1, max_concurrency=2)

    async def main():
        teacher = OpenAITeacher(cfg, None)
        programs = [f"def add(a, b):\n    return {i}\n" for i in range(6)]
        return await asyncio.gather(*(propose(teacher, p) for p in programs), return_exceptions=True)

    results = run(main)
    assert len(server.requests) == 2  # one call reaches the budget; only the one in flight beside it overshot
    assert sum(isinstance(r, BudgetExhausted) for r in results) == 4


def test_counters_survive_a_checkpoint(server):
    cfg = config(server, budget_tokens=15)

    async def main():
        first = OpenAITeacher(cfg, None)
        await propose(first)
        resumed = OpenAITeacher(cfg, None, state=json.loads(json.dumps(first.state())))
        assert resumed.describe() == first.describe()
        with pytest.raises(BudgetExhausted):
            await propose(resumed, "def add(a, b):\n    return 0\n")

    run(main)
    assert len(server.requests) == 1
    with pytest.raises(ValueError, match="expected"):
        OpenAITeacher(cfg, None, state={"calls": 1})

"""The paper's methods offline: collection for each method on the real stack, offline training, comparison.

Collection runs the real student once (3 MBPP train tasks) in this process, the real sandbox pool, and the
teacher over HTTP on a loopback server answering each task's reference — except for one task, where it answers
code that fails, so that refinement is not verified. One synthetic attempt that passes (the reference itself)
checks that passed attempts yield nothing for inpd/persd. Every method's examples are built from those
same attempts.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from persd_online import adapters
from persd_online.cascade import build_cascade
from persd_online.collect import attempt_pool, build_examples, collect, pool_tasks, refine_failures
from persd_online.config import load_config
from persd_online.offline import PoolExecutor, local_student, open_pool, read_examples, train_offline
from persd_online.prompts import target_text
from persd_online.records import Attempt, Example
from tests.openai_stub_server import Reply, StubOpenAIServer

POOL = 3
WRONG = "```python\ndef {name}(*args):\n    return None\n```"


class ReferenceTeacher:
    """Answers the reference of the task named in the request; wrong code for `bad_task`."""

    def __init__(self, tasks, bad_task: str) -> None:
        self.tasks, self.bad_task = tasks, bad_task

    def __call__(self, body: dict) -> Reply:
        text = body["messages"][-1]["content"]
        task = next(t for t in self.tasks if t.prompt.strip() in text)
        if task.task_id == self.bad_task:
            return Reply(content=WRONG.format(name=task.entry_point))
        return Reply(content=f"```python\n{task.reference}\n```", prompt_tokens=100, completion_tokens=50)


def config_for(tmp_path, base_url: str = "http://127.0.0.1:9/v1"):
    return load_config(None, [
        f"runs_dir={tmp_path}", "name=baselines", "tasks.pool=mbpp:train", f"tasks.limit={POOL}",
        "student.max_new_tokens=64", "student.max_model_len=1024", "student.cpu_kvcache_gib=1",
        f"teacher.tiers=[{{kind: openai, base_url: '{base_url}', model: stub-teacher, refine_rounds: 0, "
        "max_retries: 0}]", "trainer.cpu_cores=null",
    ])


@pytest.fixture(scope="module")
def collected(student_model, tmp_path_factory):
    """One student run and one refinement pass, shared by the method checks."""
    tmp = tmp_path_factory.mktemp("collect")
    tasks = pool_tasks(config_for(tmp))
    teacher_answers = ReferenceTeacher(tasks, bad_task=tasks[2].task_id)
    with StubOpenAIServer(responder=teacher_answers) as server, open_pool(config_for(tmp)) as pool:
        config = config_for(tmp, server.base_url)
        executor = PoolExecutor(pool)
        student = local_student(config.student, student_model, tmp / "student")
        try:
            attempts, verdicts = attempt_pool(student, executor, tasks, 1, student.default_sampling())
        finally:
            student.shutdown()
        passing = Attempt(attempt_id="synthetic-pass", task_id=tasks[0].task_id, sample_index=9, adapter_version=0,
                          prompt_format="chat", completion="", program=tasks[0].reference, prompt_tokens=0,
                          completion_tokens=0)
        attempts = [*attempts, passing]
        [passing_verdict] = asyncio.run(_score(executor, tasks, passing))
        verdicts = [*verdicts, passing_verdict]
        cache = tmp / "teacher_cache"
        outcomes, stop = asyncio.run(refine_failures(build_cascade(config.teacher, cache, executor), tasks,
                                                     attempts, verdicts))
        paid = len(server.requests)
        again, _ = asyncio.run(refine_failures(build_cascade(config.teacher, cache, executor), tasks, attempts,
                                               verdicts))
        repaid = len(server.requests) - paid
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(student_model)
    examples = {m: build_examples(m, tasks, attempts, verdicts, outcomes, tokenizer, "chat")
                for m in ("stand", "inpd", "persd", "persd_refine", "persd_combine")}
    return dict(tasks=tasks, attempts=attempts, verdicts=verdicts, outcomes=outcomes, stop=stop, paid=paid,
                repaid=repaid, again=again, examples=examples, config=config, tmp=tmp)


async def _score(executor, tasks, attempt):
    from persd_online.evaluator import score

    return await score(executor, tasks, [attempt])


pytestmark = pytest.mark.slow


def test_attempts_are_scored_and_failures_refined_and_verified(collected):
    c = collected
    assert c["verdicts"][-1].passed  # the reference passes in the real sandbox
    failed = [a for a, v in zip(c["attempts"], c["verdicts"], strict=True) if not v.passed]
    assert failed, "the 135M student is expected to fail some MBPP train task"
    assert set(c["outcomes"]) == {a.attempt_id for a in failed} and c["stop"] is None
    assert c["paid"] == len(failed)  # one teacher call per failed attempt (refine_rounds=0)
    assert c["repaid"] == 0  # the second pass came from the cache
    bad = c["tasks"][2].task_id
    for attempt in failed:
        outcome = c["outcomes"][attempt.attempt_id]
        assert (outcome.verified is None) == (attempt.task_id == bad)


def test_stand_has_every_task_with_its_reference(collected):
    stand = collected["examples"]["stand"]
    assert [e.task_id for e in stand] == [t.task_id for t in collected["tasks"]]
    for example, task in zip(stand, collected["tasks"], strict=True):
        assert example.method == "stand" and example.source_attempt_id is None
        assert example.completion == target_text(task, task.reference, "chat")


def test_inpd_has_only_failed_tasks(collected):
    c = collected
    failed_tasks = {a.task_id for a, v in zip(c["attempts"], c["verdicts"], strict=True) if not v.passed}
    inpd = c["examples"]["inpd"]
    assert {e.task_id for e in inpd} == failed_tasks
    assert all(e.method == "inpd" and e.source_attempt_id != "synthetic-pass" for e in inpd)


def test_persd_has_only_verified_refinements(collected):
    c = collected
    verified = {aid: o.verified for aid, o in c["outcomes"].items() if o.verified is not None}
    persd = c["examples"]["persd"]
    assert {e.source_attempt_id for e in persd} == set(verified)
    bad = c["tasks"][2].task_id
    for e in persd:
        assert e.method == "persd" and e.task_id != bad
        assert e.teacher_call_id == verified[e.source_attempt_id].teacher_call_id
        task = next(t for t in c["tasks"] if t.task_id == e.task_id)
        assert e.completion == target_text(task, verified[e.source_attempt_id].program, "chat")


def test_persd_refine_prompts_hold_the_wrong_code_and_its_feedback(collected):
    c = collected
    by_attempt = {a.attempt_id: (a, v) for a, v in zip(c["attempts"], c["verdicts"], strict=True)}
    refine = c["examples"]["persd_refine"]
    assert {e.source_attempt_id for e in refine} == {e.source_attempt_id for e in c["examples"]["persd"]}
    for e in refine:
        attempt, verdict = by_attempt[e.source_attempt_id]
        assert e.method == "persd_refine"
        assert attempt.program.strip() in e.prompt and verdict.feedback.strip() in e.prompt


def test_persd_combine_is_both_shapes(collected):
    ex = collected["examples"]
    combine = ex["persd_combine"]
    assert {e.example_id for e in combine} == {e.example_id for e in ex["persd"] + ex["persd_refine"]}


def test_collect_stand_end_to_end_writes_examples_and_stats(collected, student_model):
    config, tmp = collected["config"], collected["tmp"]
    out = tmp / "stand.jsonl"
    stats = collect(config, student_model, "stand", out)
    assert stats["examples"] == POOL == len(read_examples(out))
    assert json.loads((tmp / "stand.jsonl.stats.json").read_text())["method"] == "stand"


def test_offline_training_publishes_a_version_that_peft_loads(collected, student_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = collected["config"].model_copy(deep=True)
    config.trainer.batch_examples = 2
    config.trainer.publish_every_steps = 2
    config.trainer.warmup_steps = 0
    stand = collected["examples"]["stand"]
    examples = [*stand, stand[0].model_copy(update={"example_id": "extra"})]  # 4 examples -> 2 steps
    assert len(examples) == 4
    versions = train_offline(config, student_model, examples, tmp_path / "adapter", epochs=1,
                             info={"method": "stand"})
    assert versions == [1]
    version_dir = adapters.version_dir(tmp_path / "adapter" / "adapters", 1)
    assert adapters.is_published(version_dir)
    meta = adapters.read_metadata(version_dir)
    assert meta["step"] == 2 and len(meta["example_ids"]) == 4
    info = json.loads((tmp_path / "adapter" / "offline.json").read_text())
    assert info["method"] == "stand" and info["train_steps"] == 2
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(student_model), str(version_dir))
    assert any("lora_" in name for name, _ in model.named_parameters())
    assert isinstance(examples[0], Example)

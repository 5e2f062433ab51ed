"""The limits that end generations early: the repetition rule and per-task token caps."""

from transformers import AutoTokenizer

from persd_online.prompts import CHAT_STOP, extract_program, stop_sequences, target_text
from persd_online.repetition import repeats_itself
from persd_online.tasks import load_tasks
from persd_online.token_caps import token_caps


def test_a_repeated_line_is_caught_and_normal_code_is_not():
    line = [11, 12, 13, 14, 15, 16, 17, 18, 10]  # one "line" of 9 tokens
    assert repeats_itself(list(range(100, 140)) + line * 8)
    assert repeats_itself([7] * 64)
    assert not repeats_itself([7] * 63)  # shorter than the minimum span
    assert not repeats_itself(line * 3)  # three repeats are allowed
    assert not repeats_itself(list(range(500)))
    # a repeat that stopped is not a loop: only the tail counts
    assert not repeats_itself(line * 8 + list(range(200, 230)))
    # a block longer than the longest period looked for is not caught
    assert not repeats_itself(list(range(60)) * 4, max_period=48)


def test_chat_stop_ends_at_the_closing_fence_and_the_program_survives():
    answer = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\nThis adds."
    cut = answer[:answer.index(CHAT_STOP[0])]  # what the engine returns: the stop string is not included
    [task] = [t for t in load_tasks("mbpp:prompt")][:1]
    assert extract_program(task, cut, "chat") == extract_program(task, answer, "chat")
    assert "```python" not in CHAT_STOP[0]  # an opening fence names its language: it never stops there
    assert stop_sequences("chat") == CHAT_STOP


def test_token_caps_follow_reference_lengths(student_model):
    tokenizer = AutoTokenizer.from_pretrained(student_model)
    tasks = load_tasks("mbpp:validation")[:20]
    caps = token_caps(tasks, tokenizer, "chat", factor=1.5, margin=32, max_new_tokens=320)
    lengths = [len(tokenizer(target_text(t, t.reference, "chat"), add_special_tokens=False).input_ids)
               for t in tasks]
    assert all(cap == min(320, -(-3 * n // 2) + 32) for cap, n in zip(caps, lengths, strict=True))
    assert max(caps) <= 320 and min(caps) > max(32, min(lengths))
    assert token_caps(tasks, tokenizer, "chat", factor=None, margin=32, max_new_tokens=99) == [99] * 20
    no_ref = tasks[0].model_copy(update={"reference": None})
    assert token_caps([no_ref], tokenizer, "chat", factor=1.5, margin=0, max_new_tokens=77) == [77]

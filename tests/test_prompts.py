"""Prompts and program extraction: what the student is asked and what gets executed or trained on."""

import pytest

from persd_online.prompts import (
    attempt_prompt,
    extract_program,
    refine_prompt,
    target_text,
    teacher_refinement_messages,
)
from persd_online.tasks import Task, load_humaneval, load_mbpp

ADD = Task(task_id="add", prompt="Return a + b.", entry_point="add", tests=["assert add(1, 2) == 3"],
           header="def add(a, b):")


@pytest.mark.parametrize("answer", [
    "Sure:\n```python\ndef add(a, b):\n    return a + b\n```\nDone.",
    "Fixed:\n```python3\ndef add(a, b):\n    return a + b\n```\nDone.",
    "```\ndef add(a, b):\n    return a + b\n```",
    "```py\nimport os\n```\nand\n```python\ndef add(a, b):\n    return a + b\n```",  # the block defining it
    "Here it is.\ndef add(a, b):\n    return a + b\n",  # no fence at all
    "```python\ndef add(a, b):\n    return a + b\n",  # unterminated fence (cut by max tokens)
])
def test_chat_extraction(answer):
    program = extract_program(ADD, answer, "chat")
    namespace: dict = {}
    exec(program, namespace)
    assert namespace["add"](2, 3) == 5


def test_chat_extraction_adds_header_imports():
    task = load_humaneval()[0]
    program = extract_program(task, "```python\ndef has_close_elements(numbers: List[float], t):\n"
                                    "    return False\n```", "chat")
    assert program.startswith("from typing import List\n")


def test_completion_extraction_cuts_at_first_unindented_line():
    program = extract_program(ADD, "    return a + b\n\nprint(add(1, 2))\ndef other():\n", "completion")
    assert program.endswith("    return a + b\n") and "print" not in program
    namespace: dict = {}
    exec(program, namespace)
    assert namespace["add"](1, 2) == 3


def test_every_reference_reassembles_in_completion_format():
    for task in load_mbpp() + load_humaneval():
        program = attempt_prompt(task, "completion") + target_text(task, task.reference, "completion")
        compile(program, task.task_id, "exec")  # raises on a broken reassembly


def test_completion_target_keeps_helpers_and_imports():
    program = ("import math\n\ndef helper(x):\n    return math.floor(x)\n\n"
               "def add(a, b):\n    '''doc'''\n    return helper(a) + b\n")
    namespace: dict = {}
    exec(attempt_prompt(ADD, "completion") + target_text(ADD, program, "completion"), namespace)
    assert namespace["add"](1.5, 2) == 3


def test_chat_target_and_refine_prompts():
    assert target_text(ADD, "def add(a, b):\n    return a + b\n", "chat") == (
        "```python\ndef add(a, b):\n    return a + b\n```")
    refine = refine_prompt(ADD, "def add(a, b):\n    return a - b\n", "Input: (1, 2) Output: -1 Expected: 3",
                           "chat")[0]["content"]
    assert "return a - b" in refine and "Expected: 3" in refine
    teacher = teacher_refinement_messages(ADD, "def add(a, b): return a - b", "Output: -1", "def add(a, b): ...")
    assert teacher[0]["role"] == "system" and "reference solution" in teacher[1]["content"]
    assert "reference" not in teacher_refinement_messages(ADD, "x", "y", None)[1]["content"]

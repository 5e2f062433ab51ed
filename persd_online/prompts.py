"""Every prompt the system sends, and the extraction of programs from what comes back.

Three prompts exist: the student's first attempt (chat or plain completion), the teacher's PERsD
refinement request (task + the student's own wrong code + execution feedback), and the student-side
refine format (PERsD's `persd_refine` training examples and two-step inference). Training targets are
rendered here too, so a trained example has exactly the shape the student is later asked to produce.

Chat prompts are message lists; `render` turns them into text with the student's own chat template.
"""

from __future__ import annotations

import ast
import re
import textwrap
from typing import Any, Protocol

from persd_online.records import PromptFormat
from persd_online.tasks import Task

Messages = list[dict[str, str]]

ANSWER_RULE = "Answer with the complete code in one ```python code block."
# Where a generation's program ends. Chat: the closing fence of the code block (a fence followed by a new line;
# an opening fence is followed by a language name). Completion: the next top-level statement (extraction cuts at
# the first unindented line anyway; stopping there saves the tokens).
CHAT_STOP = ("\n```\n",)
COMPLETION_STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\nassert ", "\n#")
_FENCE = re.compile(r"```[ \t]*[\w+-]*[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


class ChatTemplate(Protocol):
    """What `render` needs of a tokenizer."""

    def apply_chat_template(self, conversation: Messages, **kwargs: Any) -> Any: ...


def _code_block(code: str) -> str:
    return f"```python\n{code.strip()}\n```"


def _statement(task: Task) -> str:
    """The task as the chat student reads it."""
    if task.header and task.prompt.strip() == task.header.strip():  # HumanEval: the prompt is code
        return f"Complete the following Python function.\n\n{_code_block(task.prompt)}"
    return f"{task.prompt.strip()}\n\nWrite the Python function `{task.entry_point}`."


def _completion_header(task: Task) -> str:
    """Docstring + header for a completion prompt (PERsD's plain format)."""
    if task.header and task.prompt.strip() == task.header.strip():
        return task.prompt
    header = task.header or f"def {task.entry_point}(*args):"
    doc = "\n    ".join(task.prompt.strip().splitlines())
    return f'{header}\n    """{doc}\n    """\n'


def stop_sequences(fmt: PromptFormat) -> tuple[str, ...]:
    """The stop strings that end a generation where its program ends (not included in the output)."""
    return CHAT_STOP if fmt == "chat" else COMPLETION_STOP


def attempt_prompt(task: Task, fmt: PromptFormat) -> Messages | str:
    """The student's first-attempt prompt: chat messages, or the text a completion continues."""
    if fmt == "chat":
        return [{"role": "user", "content": f"{_statement(task)}\n{ANSWER_RULE}"}]
    return _completion_header(task)


def refine_prompt(task: Task, program: str, feedback: str, fmt: PromptFormat) -> Messages | str:
    """The student-side refine format: the task, its own failing code and the error, asking for a fix."""
    if fmt == "chat":
        return [{
            "role": "user",
            "content": f"{_statement(task)}\n\nThis attempt fails:\n{_code_block(program)}\n\n"
            f"Running it gave:\n{feedback.strip()}\n\nWrite a corrected version. {ANSWER_RULE}",
        }]
    commented = "\n".join(f"# {line}" for line in program.strip().splitlines())
    return (f"# Incorrect code:\n{commented}\n# Error: {' '.join(feedback.split())}\n"
            f"# Corrected code:\n{_completion_header(task)}")


def teacher_refinement_messages(task: Task, program: str, feedback: str, reference: str | None) -> Messages:
    """PERsD's refinement request: correct the student's own attempt, guided by the execution error."""
    parts = [
        f"Task:\n{task.prompt.strip()}",
        f"The code to correct (an attempt at `{task.entry_point}`):\n{_code_block(program)}",
        f"Running it against the tests gave:\n{feedback.strip()}",
    ]
    if reference:
        parts.append(f"A reference solution, for guidance only:\n{_code_block(reference)}")
    parts.append(
        "Fix the student's code. Keep the student's approach, names and structure wherever possible and "
        "change only what is needed to make it correct. " + ANSWER_RULE
    )
    return [
        {"role": "system", "content": "You are an expert Python programmer who corrects students' code."},
        {"role": "user", "content": "\n\n".join(parts)},
    ]


def render(prompt: Messages | str, tokenizer: ChatTemplate) -> str:
    """Prompt text as the model sees it (chat template applied, generation turn opened)."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def target_text(task: Task, program: str, fmt: PromptFormat) -> str:
    """The training target for `program` in a format (what the student should have generated)."""
    if fmt == "chat":
        return _code_block(program)
    header = _completion_header(task)
    body = program[len(header):] if program.startswith(header) else _completion_body(program, task)
    return body.rstrip() + "\n"


def _completion_body(program: str, task: Task) -> str:
    """`program` as a continuation of the task's header: the entry point's body, with the program's other
    top-level code (imports, helpers) moved to the start of that body, so the reassembled function behaves
    as the program that was verified (the completion format can only continue one function)."""
    # Leading tabs (common in MBPP) would clash with the header's space-indented docstring.
    program = "\n".join(re.sub(r"^\t+", lambda m: "    " * len(m.group()), ln) for ln in program.splitlines())
    try:
        tree = ast.parse(program)
    except SyntaxError:
        return program
    entry = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == task.entry_point), None)
    if entry is None:
        return program
    lines = program.splitlines()
    given = set(_imports_of(task.header))
    preamble = [ast.get_source_segment(program, n, padded=True) or "" for n in tree.body
                if n is not entry and ast.get_source_segment(program, n) not in given]
    body = entry.body
    if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the header already carries the docstring
    own = textwrap.dedent("\n".join(lines[body[0].lineno - 1:entry.end_lineno]))
    # Re-indent at four spaces: MBPP bodies use one or two, which clash with the header's docstring.
    return textwrap.indent("\n".join([*preamble, own]), "    ")


def _cut_at_dedent(completion: str) -> str:
    """PERsD's cut: keep the body up to the first non-empty line that is not indented."""
    kept = []
    for line in completion.splitlines():
        if line.strip() and not line[:1].isspace():
            break
        kept.append(line)
    return "\n".join(kept).rstrip() + "\n"


def _imports_of(header: str | None) -> list[str]:
    if not header:
        return []
    return [ln for ln in header.splitlines() if ln.startswith(("import ", "from "))]


def _best_block(blocks: list[str], entry_point: str) -> str | None:
    defining = [b for b in blocks if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", b, re.M)]
    return (defining or blocks or [None])[0]


def extract_program(task: Task, completion: str, fmt: PromptFormat) -> str:
    """The program to execute from a generation.

    completion format: the prompt's header plus the body up to the first non-indented line (PERsD).
    chat format: the fenced block that defines the entry point (else the first block, else the text from
    the first `def`), with the task header's imports prepended when the answer left them out.
    """
    if fmt == "completion":
        return _completion_header(task) + _cut_at_dedent(completion)
    code = _best_block(_FENCE.findall(completion), task.entry_point)
    if code is None:
        match = re.search(r"^(?:def|class|import|from)\s", completion, re.M)
        code = completion[match.start():] if match else completion
    missing = [imp for imp in _imports_of(task.header) if imp not in code]
    return "\n".join([*missing, code.strip()]) + "\n"

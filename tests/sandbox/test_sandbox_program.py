"""Programs are compiled in the judge and sent as code; large ones are compiled by the job itself."""

from __future__ import annotations

import marshal

import pytest

from sandbox import Job, SandboxPool, Status, TestSuite
from sandbox.program import MAX_COMPILED_CHARS, program_payload
from sandbox.remote import CandidateRaised

SUITE = TestSuite("f", ("assert f() == 'type'",))
# Annotations are evaluated as in plain Python: the judge's own `from __future__ import annotations` is not
# inherited by the program (it would make this annotation the string "int").
PROGRAM = "def g(x: int):\n    pass\n\ndef f():\n    return type(g.__annotations__['x']).__name__\n"


def test_a_program_is_sent_as_code_and_a_large_one_as_source() -> None:
    assert type(marshal.loads(program_payload(PROGRAM))).__name__ == "code"  # type: ignore[arg-type]
    large = PROGRAM + "#" * MAX_COMPILED_CHARS
    assert program_payload(large) == large


def test_a_syntax_error_is_the_programs_error() -> None:
    with pytest.raises(CandidateRaised) as caught:
        program_payload("def f(:\n    pass\n")
    assert caught.value.type_name == "SyntaxError" and "(line 1)" in caught.value.message


@pytest.mark.parametrize("padding", [0, MAX_COMPILED_CHARS])
def test_code_and_source_load_alike(pool: SandboxPool, padding: int) -> None:
    ok, broken = (pool.run_batch([Job(PROGRAM + "#" * padding, SUITE), Job("def f(:\n" + "#" * padding, SUITE)]))
    assert ok.status is Status.PASSED, ok.feedback
    assert broken.status is Status.ERROR and broken.feedback.startswith("SyntaxError: "), broken.feedback
    assert "(line 1)" in broken.feedback


def test_programs_import_from_the_interpreters_site_packages(pool: SandboxPool) -> None:
    pytest.importorskip("numpy")  # not a module of the standard library: found only through site-packages
    program = "import numpy\n\ndef f():\n    return str(int(numpy.arange(4).sum()))\n"
    result = pool.run(program, TestSuite("f", ("assert f() == '6'",)))
    if pool.isolation.layers["job_site_packages"].startswith("not readable"):  # said so, with a warning
        assert result.feedback == "ModuleNotFoundError: No module named 'numpy'"
    else:
        assert result.status is Status.PASSED, (result.feedback, result.stderr)

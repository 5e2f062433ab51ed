"""Output volume never changes a verdict: stdout and stderr are drained by the judge, and only their tail kept.

The files a program writes to its work directory stay capped (``RLIMIT_FSIZE``: the hostile suite's
``big_file``); what it prints is not, through ``print`` or straight to descriptors 1 and 2.
"""

from __future__ import annotations

import textwrap

from sandbox import Job, SandboxPool, Status, TestSuite

DOUBLES = TestSuite("f", ("assert f(1) == 2", "assert f(3) == 6"))


def _floods(pool: SandboxPool) -> int:
    """Bytes each flood writes: twice the file-size cap that once failed such programs."""
    return 2 * pool.limits.max_file_mb << 20


def test_a_correct_program_that_prints_past_the_cap_through_print_passes(pool: SandboxPool) -> None:
    program = textwrap.dedent(f'''
        import sys
        line = "p" * 1023 + "\\n"
        for _ in range({_floods(pool) // 1024}):
            print(line, end="")
            sys.stderr.write(line)
        print("end of load")
        sys.stderr.write("stderr at load\\n")

        def f(x):
            print("f called with", x)
            return 2 * x
    ''')
    result = pool.run(program, DOUBLES)
    assert result.status is Status.PASSED, (result.feedback, result.stderr[-300:])
    assert result.stdout.endswith("p\nend of load\nf called with 1\nf called with 3\n")
    assert result.stderr.endswith("p\nstderr at load\n")
    assert len(result.stdout) == len(result.stderr) == pool.limits.output_tail_chars


def test_a_correct_program_that_writes_past_the_cap_to_descriptors_1_and_2_passes(pool: SandboxPool) -> None:
    program = textwrap.dedent(f'''
        import os
        block = b"w" * 65535 + b"\\n"
        for _ in range({_floods(pool) // 65536}):
            os.write(1, block)
        os.write(1, b"end of load\\n")

        def f(x):
            os.write(2, b"e" * {_floods(pool)})  # one write, far larger than the pipe: it waits for the judge
            os.write(2, b"|f(%d)" % x)
            return 2 * x
    ''')
    result = pool.run(program, DOUBLES)
    assert result.status is Status.PASSED, (result.feedback, result.stderr[-300:])
    chars = pool.limits.output_tail_chars
    assert result.stdout == ("w" * 65535 + "\n" + "end of load\n")[-chars:]
    assert result.stderr == ("e" * chars + "|f(3)")[-chars:]


def test_a_flood_leaves_the_verdict_of_a_wrong_program_as_it_was(pool: SandboxPool) -> None:
    flood = f"for _ in range({_floods(pool) // 1024}):\n    print('x' * 1023)\n"
    results = pool.run_batch([Job(flood + "def f(x):\n    return 3 * x\n", DOUBLES),
                              Job(flood + "def f(x):\n    raise ValueError('no')\n", DOUBLES)])
    assert [(r.status, r.feedback) for r in results] == [(Status.FAILED, "Input: 1 Output: 3 Expected: 2"),
                                                         (Status.ERROR, "ValueError: no")]
    assert all(r.stdout == (("x" * 1023 + "\n") * 2)[-pool.limits.output_tail_chars:] for r in results)

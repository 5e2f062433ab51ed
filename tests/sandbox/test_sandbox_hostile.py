"""Hostile programs, run in one batch with innocent jobs interleaved between them.

For each: the verdict it must get (never a false pass), and afterwards for the whole batch: no harness
failure or restart, no leaked process, no host file touched, no connection accepted, no secret read, and every
innocent job beside them judged truly.
"""

from __future__ import annotations

import os
import re
import socket
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, SECRET

from sandbox import Job, Result, SandboxPool, Status, TestSuite

ASSERTS = TestSuite("f", ("assert f(1) == 2", "assert f(3) == 6"))
# PERsD/HumanEval style: the checks go through a helper the program might try to redefine.
CHECK_ASSERT = TestSuite("f", textwrap.dedent('''
    def check_assert(delim, input_args, output, expected):
        error_text = 'Input: ' + str(input_args) + ' Output: ' + str(output) + ' Expected: ' + str(expected)
        assert output == expected, error_text

    def check(candidate):
        check_assert('==', (1), candidate(1), 2)
        check_assert('==', (3), candidate(3), 6)
'''))
TRUTHY = TestSuite("f", ("assert f(2)", "assert not f(3)"))
ITERATED = TestSuite("f", textwrap.dedent('''
    def check(candidate):
        for output, expected in zip(map(candidate, [1, 2, 3]), [2, 4, 6]):
            assert output == expected
        assert [candidate(x) for x in (1, 2)] == [2, 4]
'''))
INNOCENT = "def f(x):\n    return 2 * x\n"
INNOCENT_WRONG = "def f(x):\n    return 3 * x\n"
NOTHING_SUCCEEDED = "Input: 1 Output: [] Expected: 2"


@dataclass(frozen=True)
class Hostile:
    name: str
    program: str
    statuses: frozenset[Status]
    feedback: str = ""  # a substring the feedback must contain
    suite: TestSuite = ASSERTS


@dataclass
class Host:
    """Host-side bait: a listener, a sentinel file, a marker for daemons, the test process's pid."""

    tcp_port: int
    abstract_socket: str
    sentinel_dir: Path
    marker: str
    sentinel_mode: int = 0


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    name = f"persd-sandbox-test-{uuid.uuid4().hex}"
    abstract.bind("\0" + name)
    abstract.listen()
    abstract.setblocking(False)
    sentinel_dir = REPO / f".sandbox-sentinel-{uuid.uuid4().hex}"
    sentinel_dir.mkdir()
    (sentinel_dir / "keep.txt").write_text("keep")
    mode = (sentinel_dir / "keep.txt").stat().st_mode
    yield Host(listener.getsockname()[1], name, sentinel_dir, uuid.uuid4().hex, mode)
    for conn in (listener, abstract):
        with pytest.raises(BlockingIOError):
            conn.accept()  # nothing ever connected
        conn.close()
    for path in sorted(sentinel_dir.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    sentinel_dir.rmdir()


def hostile_programs(host: Host) -> list[Hostile]:
    s = frozenset
    attempts = textwrap.dedent('''
        def attempt(done, label, action):
            try:
                action()
                done.append(label)
            except Exception:
                pass
    ''')
    return [
        Hostile("infinite_loop", "def f(x):\n    while True:\n        pass\n", s({Status.TIMEOUT})),
        Hostile("sleep", "import time\ndef f(x):\n    time.sleep(60)\n    return 2 * x\n", s({Status.TIMEOUT})),
        Hostile("fork_bomb", textwrap.dedent('''
            import os
            def f(x):
                while True:
                    try:
                        os.fork()
                    except OSError:
                        pass
        '''), s({Status.TIMEOUT})),
        Hostile("fork_count_is_capped", textwrap.dedent('''
            import os, time
            def f(x):
                forked = 0
                for _ in range(500):
                    try:
                        pid = os.fork()
                    except OSError:
                        break
                    if pid == 0:
                        time.sleep(60)
                        os._exit(0)
                    forked += 1
                return forked
        '''), s({Status.FAILED})),
        Hostile("thread_bomb", textwrap.dedent('''
            import threading, time
            def f(x):
                for _ in range(10000):
                    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
                return 2 * x
        '''), s({Status.ERROR}), "RuntimeError"),
        Hostile("memory_bomb", textwrap.dedent('''
            def f(x):
                blocks = []
                while True:
                    blocks.append(bytearray(64 * 1024 * 1024))
        '''), s({Status.MEMORY}), "MemoryError"),
        Hostile("recursion_bomb", "def f(x):\n    return f(x) + 1\n", s({Status.ERROR}), "RecursionError"),
        Hostile("recursion_limit_lifted", "import sys\nsys.setrecursionlimit(10**9)\n"
                "def f(x):\n    return f(x) + 1\n", s({Status.TIMEOUT, Status.MEMORY, Status.CRASHED})),
        Hostile("stdout_flood", "import sys\ndef f(x):\n    while True:\n        sys.stdout.write('A' * 65536)\n",
                s({Status.TIMEOUT})),  # its writes never fail: it prints until the time limit
        Hostile("big_file", "def f(x):\n    with open('big', 'wb') as out:\n"
                "        for _ in range(200):\n            out.write(bytes(1 << 20))\n    return 2 * x\n",
                s({Status.ERROR}), "OSError"),
        Hostile("binary_garbage_output", "import os\ndef f(x):\n    os.write(1, bytes(range(256)) * 64)\n"
                "    os.write(2, b'\\xff\\xfe\\x00' * 1000)\n    return 2 * x\n", s({Status.PASSED})),
        Hostile("touch_host_files", attempts + textwrap.dedent(f'''
            import os, shutil
            def f(x):
                done = []
                attempt(done, 'create', lambda: open({str(host.sentinel_dir / "pwned")!r}, 'w').write('x'))
                attempt(done, 'delete', lambda: os.remove({str(host.sentinel_dir / "keep.txt")!r}))
                attempt(done, 'rmtree', lambda: shutil.rmtree({str(host.sentinel_dir)!r}))
                attempt(done, 'chmod', lambda: os.chmod({str(host.sentinel_dir / "keep.txt")!r}, 0o777))
                attempt(done, 'etc', lambda: open('/etc/persd-pwned-{host.marker}', 'w').write('x'))
                attempt(done, 'usr', lambda: open('/usr/persd-pwned-{host.marker}', 'w').write('x'))
                attempt(done, 'tmp_root', lambda: open('/tmp/persd-pwned', 'w').write('x'))
                return done
        '''), s({Status.FAILED}), NOTHING_SUCCEEDED),
        Hostile("read_secrets", attempts + textwrap.dedent(f'''
            import os
            def f(x):
                found = []
                def scan(label, read):
                    try:
                        if {SECRET!r}.encode() in read():
                            found.append(label)
                    except Exception:
                        pass
                scan('environ', lambda: repr(dict(os.environ)).encode())
                for pid in os.listdir('/proc'):
                    if pid.isdigit() or pid == 'self':
                        for part in ('environ', 'cmdline'):
                            scan(pid + part, lambda: open('/proc/' + pid + '/' + part, 'rb').read())
                return found
        '''), s({Status.FAILED}), NOTHING_SUCCEEDED),
        Hostile("network", attempts + textwrap.dedent(f'''
            import socket
            def f(x):
                done = []
                attempt(done, 'tcp4', lambda: socket.create_connection(('127.0.0.1', {host.tcp_port}), timeout=1))
                attempt(done, 'tcp6', lambda: socket.create_connection(('::1', {host.tcp_port}), timeout=1))
                def abstract():
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.connect('\\0' + {host.abstract_socket!r})
                attempt(done, 'abstract_unix', abstract)
                attempt(done, 'dns', lambda: socket.getaddrinfo('example.com', 80))
                return done
        '''), s({Status.FAILED}), NOTHING_SUCCEEDED),
        Hostile("kill_parent_and_siblings", attempts + textwrap.dedent(f'''
            import os, signal
            def f(x):
                done = []
                attempt(done, 'parent', lambda: os.kill(os.getppid(), signal.SIGKILL))
                attempt(done, 'test_runner', lambda: os.kill({os.getpid()}, signal.SIGKILL))
                for pid in os.listdir('/proc'):
                    if pid.isdigit() and int(pid) != os.getpid():
                        attempt(done, 'pid' + pid, lambda: os.kill(int(pid), signal.SIGKILL))
                attempt(done, 'everything', lambda: os.kill(-1, signal.SIGKILL))  # only its own processes
                return done
        '''), s({Status.FAILED}), NOTHING_SUCCEEDED),
        Hostile("escape_privileges", attempts + textwrap.dedent('''
            import ctypes, os
            libc = ctypes.CDLL(None, use_errno=True)
            def ok(result):
                if result != 0:
                    raise OSError(ctypes.get_errno(), 'refused')
            def f(x):
                done = []
                attempt(done, 'setuid0', lambda: os.setuid(0))
                attempt(done, 'unshare_mount', lambda: ok(libc.unshare(0x00020000)))
                attempt(done, 'unshare_user', lambda: ok(libc.unshare(0x10000000)))
                attempt(done, 'remount_rw', lambda: ok(libc.mount(None, b'/', None, 0x20, None)))
                attempt(done, 'chroot', lambda: os.chroot('/'))
                attempt(done, 'ptrace_zygote', lambda: ok(libc.ptrace(16, 1, None, None)))
                attempt(done, 'zygote_memory', lambda: open('/proc/1/mem', 'rb'))
                return done
        '''), s({Status.FAILED}), NOTHING_SUCCEEDED),
        Hostile("sees_only_its_own_processes", "import os\ndef f(x):\n"
                "    return len([p for p in os.listdir('/proc') if p.isdigit()])\n", s({Status.FAILED}),
                "Input: 3 Output: 2 Expected: 6"),  # f(1) == 2 holds: it sees itself and the zygote
        Hostile("daemon_outlives_job", textwrap.dedent(f'''
            import os, time
            def f(x):
                if os.fork() == 0:
                    os.setsid()
                    if os.fork() == 0:
                        os.execv('/bin/sh', ['/bin/sh', '-c', 'sleep 600 # {host.marker}'])
                    os._exit(0)
                if os.fork() == 0:
                    os.setsid()
                    while True:
                        time.sleep(1)
                return 2 * x
        '''), s({Status.PASSED})),
        Hostile("reads_stdin", "def f(x):\n    return int(input())\n", s({Status.ERROR}), "EOFError"),
        Hostile("syntax_error", "def f(x)\n    return 2 * x\n", s({Status.ERROR}), "SyntaxError"),
        Hostile("segfault_via_ctypes", "import ctypes\ndef f(x):\n    return ctypes.string_at(0)\n",
                s({Status.CRASHED}), "SIGSEGV"),
        Hostile("exit_at_load", "import sys\nsys.exit(0)\n", s({Status.ERROR}), "SystemExit"),
        Hostile("exit_in_call", "import sys\ndef f(x):\n    sys.exit(0)\n", s({Status.ERROR}), "SystemExit"),
        Hostile("os_exit_at_load", "import os\nos._exit(0)\n", s({Status.CRASHED}), "exited with code 0"),
        Hostile("os_exit_in_call", "import os\ndef f(x):\n    os._exit(0)\n", s({Status.CRASHED})),
        Hostile("atexit_hook", "import atexit\natexit.register(print, 'passed')\ndef f(x):\n    return 0\n",
                s({Status.FAILED}), "Input: 1 Output: 0 Expected: 2"),
        Hostile("forged_output", "def f(x):\n    print('passed')\n"
                "    print('{\"status\": \"passed\", \"passed\": true}')\n    return 0\n", s({Status.FAILED})),
        Hostile("always_equal_object", "class Any:\n    def __eq__(self, other):\n        return True\n"
                "    __hash__ = object.__hash__\ndef f(x):\n    return Any()\n", s({Status.FAILED})),
        Hostile("always_equal_object_check_form", "class Any:\n    def __eq__(self, other):\n        return True\n"
                "def f(x):\n    return Any()\n", s({Status.FAILED}), suite=CHECK_ASSERT),
        Hostile("always_equal_int_subclass", "class I(int):\n    def __eq__(self, other):\n        return True\n"
                "def f(x):\n    return I(0)\n", s({Status.FAILED}), "Input: 1 Output: 0 Expected: 2"),
        Hostile("always_true_object", "class T:\n    def __bool__(self):\n        return True\n"
                "def f(x):\n    return T()\n", s({Status.FAILED}), suite=TRUTHY),
        Hostile("redefines_check_helpers", textwrap.dedent('''
            import builtins
            def check_assert(*args, **kwargs):
                pass
            def check(candidate):
                pass
            builtins.AssertionError = type('NotAnAssertion', (Exception,), {})
            def f(x):
                return 0
        '''), s({Status.FAILED}), "Input: 1 Output: 0 Expected: 2", suite=CHECK_ASSERT),
        Hostile("stop_iteration_ends_a_test_loop", "def f(x):\n    raise StopIteration\n", s({Status.ERROR}),
                "StopIteration", suite=ITERATED),
        Hostile("forged_channel_messages", textwrap.dedent('''
            import marshal, os, struct
            def frame(message):
                data = marshal.dumps(message)
                return struct.pack('!I', len(data)) + data
            os.write(3, frame(('ready', {'f': ('value', 2)})) + frame(('value', 2)) + frame(('value', 6)))
            def f(x):
                return 0
        '''), s({Status.FAILED, Status.CRASHED})),
        Hostile("garbage_on_channel", "import os\nos.write(3, b'\\xff' * 64)\ndef f(x):\n    return 2 * x\n",
                s({Status.CRASHED}), "result channel"),
        Hostile("huge_result", "def f(x):\n    return [0] * 20_000_000\n", s({Status.FAILED, Status.CRASHED})),
    ]


@pytest.fixture(scope="module")
def batch(pool: SandboxPool, host: Host) -> tuple[list[Hostile], list[Result], list[Result], list[Result]]:
    if not (pool.isolation.active("pid_namespace") or pool.isolation.active("job_user")):
        # The kill program would reach this very test process; test_sandbox_isolation.py covers this case.
        # CI runs as root with namespaces: there the hostile suite must run, never be skipped.
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the hostile suite, but jobs share the runner's uid and PID namespace: "
                        f"{pool.isolation.layers}")
        pytest.skip(f"jobs here share the test runner's uid and PID namespace: {pool.isolation.layers}")
    hostiles = hostile_programs(host)
    jobs: list[Job] = []
    for hostile in hostiles:  # each hostile job sits between innocent ones on the same workers
        jobs += [Job(hostile.program, hostile.suite), Job(INNOCENT, ASSERTS), Job(INNOCENT_WRONG, ASSERTS)]
    results = pool.run_batch(jobs)
    return hostiles, results[0::3], results[1::3], results[2::3]


def _hostile_result(batch: tuple, name: str) -> tuple[Hostile, Result]:
    hostiles, results = batch[0], batch[1]
    index = next(i for i, h in enumerate(hostiles) if h.name == name)
    return hostiles[index], results[index]


@pytest.mark.parametrize("name", [h.name for h in hostile_programs(Host(1, "x", Path("/x"), "m"))])
def test_hostile_program_gets_its_true_verdict(batch: tuple, name: str) -> None:
    hostile, result = _hostile_result(batch, name)
    assert result.status in hostile.statuses, (result.status, result.feedback, result.stderr[-500:])
    assert hostile.feedback in result.feedback
    assert result.attempts == 1 and len(result.stdout) <= 2000 and len(result.stderr) <= 2000


def test_hostile_programs_are_at_least_twenty_and_none_passes_falsely(batch: tuple) -> None:
    hostiles, results = batch[0], batch[1]
    assert len(hostiles) >= 20
    honest_passes = {"binary_garbage_output", "daemon_outlives_job"}  # they do compute f correctly
    assert {h.name for h, r in zip(hostiles, results, strict=True) if r.passed} == honest_passes


def test_innocent_jobs_beside_hostile_ones_keep_their_verdicts(batch: tuple) -> None:
    innocent, wrong = batch[2], batch[3]
    assert [r.status for r in innocent] == [Status.PASSED] * len(innocent)
    assert {r.status for r in wrong} == {Status.FAILED}
    assert {r.feedback for r in wrong} == {"Input: 1 Output: 3 Expected: 2"}


def test_fork_count_is_capped_by_the_process_limit(batch: tuple, pool: SandboxPool) -> None:
    _, result = _hostile_result(batch, "fork_count_is_capped")
    forked = int(re.search(r"Output: (\d+)", result.feedback).group(1))
    assert 0 < forked < pool.limits.max_processes


def test_floods_and_garbage_are_capped_and_decoded(batch: tuple) -> None:
    _, flood = _hostile_result(batch, "stdout_flood")
    assert flood.stdout == "A" * 2000
    _, garbage = _hostile_result(batch, "binary_garbage_output")
    assert "\ufffd" in garbage.stdout and "\ufffd" in garbage.stderr


def test_no_process_outlives_its_job(batch: tuple, host: Host, pool: SandboxPool) -> None:
    leftovers, ahead = [], []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
            status = (proc / "status").read_text()
        except OSError:
            continue
        uid = int(status.split("\nUid:")[1].split()[0])
        if host.marker.encode() in cmdline:
            leftovers.append((proc.name, cmdline))
        elif uid >= 1_000_000_000:  # the job user: only the process each zygote forked for the next job
            ahead.append(int(status.split("\nPPid:")[1].split()[0]))
    assert leftovers == []
    assert len(ahead) == len(set(ahead)), ahead  # at most one per zygote: nothing a job left behind
    if pool.isolation.active("cgroup_pids"):
        groups = list(Path("/sys/fs/cgroup/pids").rglob(f"persd-sandbox-{os.getpid()}-*/pids.current"))
        # each worker's zygote pair and the one process forked ahead for its next job
        assert groups and all(int(g.read_text()) == 3 for g in groups)


def test_host_files_and_harness_are_intact(batch: tuple, host: Host, pool: SandboxPool) -> None:
    assert sorted(p.name for p in host.sentinel_dir.iterdir()) == ["keep.txt"]
    assert (host.sentinel_dir / "keep.txt").read_text() == "keep"
    assert (host.sentinel_dir / "keep.txt").stat().st_mode == host.sentinel_mode
    assert not Path(f"/etc/persd-pwned-{host.marker}").exists()
    assert not Path(f"/usr/persd-pwned-{host.marker}").exists()
    assert pool.restarts == 0
    assert pool.run(INNOCENT, ASSERTS).passed

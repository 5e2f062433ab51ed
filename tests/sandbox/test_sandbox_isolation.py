"""Isolation layers: the seccomp filter, and what is still enforced when the kernel refuses namespaces.

A refused layer is simulated with ``IsolationConfig(disabled=...)`` or ``namespaces=False``: the zygote then
skips those ``unshare`` calls exactly as if the kernel had returned an error, and takes the same fallbacks.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MEMORY_MB, REPO, SECRET, TIMEOUT

from sandbox import IsolationConfig, Job, SandboxPool, Status, TestSuite
from sandbox.isolation import ETC_FILES

RETURNS_EMPTY = TestSuite("f", ("assert f(1) == []",))
DOUBLES = TestSuite("f", ("assert f(1) == 2", "assert f(3) == 6"))
INNOCENT = "def f(x):\n    return 2 * x\n"
SECCOMP_MACHINES = ("x86_64", "aarch64")
ATTEMPT = textwrap.dedent('''
    import ctypes, os
    libc = ctypes.CDLL(None, use_errno=True)

    def attempt(done, label, action):
        """Record `label` if `action` succeeded, else `label:<errno name>`."""
        try:
            result = action()
        except OSError as exc:
            done.append(f"{label}:{os.strerror(exc.errno) if exc.errno else exc}")
            return
        except Exception as exc:
            done.append(f"{label}:{type(exc).__name__}")
            return
        done.append(label)

    def ok(result):
        if result == -1:
            raise OSError(ctypes.get_errno(), 'refused')
        return result
''')
EPERM = os.strerror(1)


@pytest.fixture(scope="module")
def listeners() -> Iterator[tuple[int, str]]:
    """A loopback TCP listener and an abstract Unix socket; nothing may ever connect to them."""
    tcp = socket.create_server(("127.0.0.1", 0))
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    name = f"persd-sandbox-isolation-{uuid.uuid4().hex}"
    abstract.bind("\0" + name)
    for sock in (tcp, abstract):
        sock.listen()
        sock.setblocking(False)
    yield tcp.getsockname()[1], name
    for sock in (tcp, abstract):
        with pytest.raises(BlockingIOError):
            sock.accept()
        sock.close()


def network_program(port: int, abstract: str) -> str:
    return ATTEMPT + textwrap.dedent(f'''
        import socket
        def f(x):
            done = []
            attempt(done, 'tcp4', lambda: socket.create_connection(('127.0.0.1', {port}), timeout=1))
            attempt(done, 'tcp6', lambda: socket.create_connection(('::1', {port}), timeout=1))
            udp = ('127.0.0.1', {port})
            attempt(done, 'udp', lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', udp))
            attempt(done, 'abstract_unix', lambda: socket.socket(socket.AF_UNIX).connect('\\0' + {abstract!r}))
            attempt(done, 'raw', lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW))
            return [d for d in done if ':' not in d]
    ''')


@pytest.mark.skipif(platform.machine() not in SECCOMP_MACHINES, reason="no seccomp syscall table here")
def test_seccomp_refuses_user_namespaces_and_risky_syscalls_but_not_fork_or_threads(pool: SandboxPool) -> None:
    assert pool.isolation.layers["seccomp"] == "active"
    x86 = platform.machine() == "x86_64"
    numbers = {"keyctl": 250 if x86 else 219, "bpf": 321 if x86 else 280, "clone3": 435,
               "io_uring_setup": 425}
    program = ATTEMPT + textwrap.dedent(f'''
        import threading
        def f(x):
            done = []
            attempt(done, 'unshare_user', lambda: ok(libc.unshare(0x10000000)))
            attempt(done, 'unshare_user_net', lambda: ok(libc.unshare(0x10000000 | 0x40000000)))
            for name, nr in {numbers!r}.items():
                attempt(done, name, lambda: ok(libc.syscall(nr, 0, 0, 0, 0)))
            pid = os.fork()
            if pid == 0:
                os._exit(7)
            done.append('fork:' + str(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])))
            thread = threading.Thread(target=done.append, args=('thread',))
            thread.start()
            thread.join()
            return done
    ''')
    result = pool.run(program, RETURNS_EMPTY)
    assert result.status is Status.FAILED
    output = eval(result.feedback.split(" Output: ")[1].split(" Expected: ")[0])  # noqa: S307 - our own repr
    assert output == [f"unshare_user:{EPERM}", f"unshare_user_net:{EPERM}", f"keyctl:{EPERM}", f"bpf:{EPERM}",
                      f"clone3:{os.strerror(38)}", f"io_uring_setup:{EPERM}", "fork:7", "thread"]


def test_programs_see_nothing_of_the_hosts_etc_or_network_interfaces(pool: SandboxPool) -> None:
    if not pool.isolation.active("mount_namespace"):
        pytest.skip(f"no mount namespace here: {pool.isolation.layers}")  # the fallback test covers this case
    assert pool.isolation.active("private_etc") and pool.isolation.active("private_sys")
    program = textwrap.dedent('''
        import os, socket, ssl, time
        def read(path):
            try:
                with open(path) as file:
                    return file.read()
            except OSError as exc:
                return type(exc).__name__
        def f():
            seen = {path: read(path) for path in ("/etc/passwd", "/etc/hosts", "/etc/hostname", "/etc/resolv.conf")}
            seen["/etc"] = sorted(os.listdir("/etc"))
            seen["/sys/class/net"] = os.listdir("/sys/class/net")
            seen["uname"] = os.uname().nodename
            seen["stdlib"] = [time.localtime().tm_year > 2000, socket.getservbyname("http"), ssl.OPENSSL_VERSION[:7]]
            raise RuntimeError(repr(seen))
    ''')
    result = pool.run(program, TestSuite("f", ("assert f() is None",)))
    assert result.status is Status.ERROR and result.feedback.startswith("RuntimeError: "), result.feedback
    seen = eval(result.feedback.removeprefix("RuntimeError: "))  # noqa: S307 - our own repr
    assert seen == {"/etc/passwd": "FileNotFoundError", "/etc/hosts": "FileNotFoundError",
                    "/etc/hostname": "FileNotFoundError", "/etc/resolv.conf": "FileNotFoundError",
                    "/etc": sorted({name.split("/")[0] for name in ETC_FILES if os.path.exists(f"/etc/{name}")}),
                    "/sys/class/net": ["lo"], "uname": "sandbox", "stdlib": [True, 80, "OpenSSL"]}
    for user in Path("/etc/passwd").read_text().splitlines()[:3]:  # nothing of the host's reached the feedback
        assert user.split(":")[0] not in result.feedback


def test_network_namespace_refused_sockets_are_still_refused(
        listeners: tuple[int, str], pool: SandboxPool, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="sandbox")
    config = IsolationConfig(disabled=("network_namespace",))
    with SandboxPool(workers=1, timeout=TIMEOUT, memory_mb=MEMORY_MB, isolation=config) as fallback:
        layers = fallback.isolation.layers
        results = fallback.run_batch([Job(network_program(*listeners), RETURNS_EMPTY), Job(INNOCENT, DOUBLES)])
    assert layers["network_namespace"] == "disabled by configuration"
    assert any("no network namespace" in r.getMessage() for r in caplog.records)
    # Every other layer is as it is with the namespace (but the /sys of its own, which needs it).
    netns_layers = ("network_namespace", "socket_filter", "private_sys")
    assert {k: v for k, v in layers.items() if k not in netns_layers} == {
        k: v for k, v in pool.isolation.layers.items() if k not in netns_layers}
    assert layers["private_sys"] == "no network namespace"
    if platform.machine() in SECCOMP_MACHINES:
        assert layers["socket_filter"] == "active"
        assert results[0].status is Status.PASSED, results[0].feedback  # no connection, no socket at all
    assert results[1].passed


def test_without_any_namespace_what_is_still_enforced(
        listeners: tuple[int, str], caplog: pytest.LogCaptureFixture) -> None:
    """The kernel refuses every namespace (as in a default Docker container): the limits, the process
    cleanup, the scrubbed environment, the fresh work directory, the socket filter and the verdicts hold;
    where the pool runs as root and the Python installation is readable by others, so does the job uid."""
    caplog.set_level(logging.WARNING, logger="sandbox")
    marker = uuid.uuid4().hex
    probes = {
        "timeout": ("def f(x):\n    while True:\n        pass\n", DOUBLES, {Status.TIMEOUT}),
        "memory": ("def f(x):\n    return bytearray(4 << 30)\n", DOUBLES, {Status.MEMORY}),
        "network": (network_program(*listeners), RETURNS_EMPTY, {Status.PASSED}),
        "environment": (f"import os\ndef f(x):\n    return [k for k, v in os.environ.items() if {SECRET!r} in v]\n",
                        RETURNS_EMPTY, {Status.PASSED}),
        "fork_cap": ("import os, time\ndef f(x):\n    n = 0\n    for _ in range(200):\n"
                     "        try:\n            pid = os.fork()\n        except OSError:\n            break\n"
                     "        if pid == 0:\n            time.sleep(30)\n            os._exit(0)\n"
                     "        n += 1\n    return [] if n < 40 else [n]\n", RETURNS_EMPTY, {Status.PASSED}),
        "leaves_files_and_daemon": (textwrap.dedent(f'''
            import os
            def f(x):
                open('left-behind', 'w').write('x')
                if os.fork() == 0:
                    os.setsid()
                    if os.fork() == 0:
                        os.execv('/bin/sh', ['/bin/sh', '-c', 'sleep 600 # {marker}'])
                    os._exit(0)
                return 2 * x
        '''), DOUBLES, {Status.PASSED}),
        "fresh_work_dir": ("import os\ndef f(x):\n    return os.listdir('.')\n", RETURNS_EMPTY, {Status.PASSED}),
        "always_equal": ("class A:\n    def __eq__(self, other):\n        return True\ndef f(x):\n    return A()\n",
                         DOUBLES, {Status.FAILED}),
        "exit_zero": ("import os\ndef f(x):\n    os._exit(0)\n", DOUBLES, {Status.CRASHED}),
        "innocent": (INNOCENT, DOUBLES, {Status.PASSED}),
    }
    config = IsolationConfig(namespaces=False)
    with SandboxPool(workers=1, timeout=TIMEOUT, memory_mb=MEMORY_MB, isolation=config) as fallback:
        layers = fallback.isolation.layers
        results = dict(zip(probes, fallback.run_batch([Job(p, s) for p, s, _ in probes.values()]), strict=True))
        job_user = fallback.isolation.active("job_user")
        if job_user:  # a distinct uid keeps the job away from the host's root processes and files
            guarded = fallback.run(ATTEMPT + textwrap.dedent(f'''
                import signal
                def f(x):
                    done = []
                    attempt(done, 'kill_runner', lambda: os.kill({os.getpid()}, 0))
                    attempt(done, 'runner_environ', lambda: open('/proc/{os.getpid()}/environ', 'rb').read())
                    attempt(done, 'write_repo', lambda: open({str(REPO / f"pwned-{marker}")!r}, 'w'))
                    return [d for d in done if ':' not in d]
            '''), RETURNS_EMPTY)
        restarts = fallback.restarts
    warnings = " | ".join(r.getMessage() for r in caplog.records)
    for missing in ("no PID namespace", "no network namespace", "no mount namespace", "host /proc visible",
                    "host /etc visible", "host /sys visible"):
        assert missing in warnings
    assert all(layers[k] == "disabled by configuration" for k in ("mount_namespace", "pid_namespace",
                                                                   "network_namespace", "ipc_uts_namespaces"))
    assert layers["process_cleanup"] == "process group + subreaper"
    for name, (_, _, statuses) in probes.items():
        if name == "network" and layers.get("socket_filter") != "active":
            continue  # no seccomp here: nothing else blocks the network (the warning says so)
        if name == "fork_cap" and not (fallback.isolation.active("cgroup_pids") or layers["rlimit_nproc"] == "active"):
            continue
        assert results[name].status in statuses, (name, results[name].feedback, results[name].stderr[-300:])
    assert restarts == 0
    leftovers = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _cmdline_has(p, marker)]
    assert leftovers == []
    if job_user:
        assert guarded.status is Status.PASSED, guarded.feedback
        assert not (REPO / f"pwned-{marker}").exists()


def _cmdline_has(proc: Path, marker: str) -> bool:
    try:
        return marker.encode() in (proc / "cmdline").read_bytes()
    except OSError:
        return False


def test_unknown_disabled_layer_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown isolation layers"):
        IsolationConfig(disabled=("network",))


def test_a_sandbox_installed_under_tmp_is_kept_visible_and_read_only() -> None:
    # /tmp is replaced by a private tmpfs; the zygote is exec'd after that, so it must still find its package
    # (a checkout or virtual environment under /tmp), bound back in read-only and left alone between jobs.
    copy = Path("/tmp") / f"persd-sandbox-copy-{uuid.uuid4().hex}"
    shutil.copytree(REPO / "sandbox", copy / "sandbox", ignore=shutil.ignore_patterns("__pycache__"))
    script = textwrap.dedent(f'''
        import sys
        sys.path.insert(0, {str(copy)!r})
        from sandbox import Job, SandboxPool, TestSuite
        program = "def f():\\n    try:\\n        open({str(copy / 'evil')!r}, 'w')\\n        return 'written'\\n" \\
                  "    except OSError as exc:\\n        return exc.strerror\\n"
        with SandboxPool(workers=1, timeout=5.0) as pool:
            results = pool.run_batch([Job(program, TestSuite("f", ("assert f() == 'Read-only file system'",)))] * 2)
        print([r.status.value for r in results])
    ''')
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert done.stdout.strip() == "['passed', 'passed']", done.stderr[-2000:]
        assert not (copy / "evil").exists() and (copy / "sandbox" / "zygote.py").exists()
    finally:
        shutil.rmtree(copy, ignore_errors=True)

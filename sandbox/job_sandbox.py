"""The isolation steps of the lean zygote: its own hardening (which every job inherits), and each job's.

The zygote imports this module to run jobs, so it imports nothing heavy: every module the zygote holds is
mapped into every job, and each MiB of it costs every job ~40 µs of ``fork`` and exit here. The steps that run
once per worker before it, while the zygote boots, are in :mod:`sandbox.isolation`.
"""

from __future__ import annotations

import errno
import os
import resource
import signal

from sandbox import linux

ACTIVE = "active"
SCRATCH = "/tmp"  # a private tmpfs per worker, wiped after every job
WORKDIR = "/tmp/work"  # each job's fresh working directory


def lock_down_zygote(layers: dict[str, str]) -> None:
    """Privilege and signal hardening of the zygote itself, recorded in ``layers``; jobs inherit all of it.

    Done after the boot's ``execve``: an emptied capability bounding set would have left the exec'd zygote
    without the capabilities it needs (to chown job directories, switch jobs to their user, kill them).
    """
    linux.set_child_subreaper()
    linux.set_non_dumpable()
    linux.set_no_new_privs()
    layers["no_new_privs"] = ACTIVE
    try:
        linux.drop_bounding_capabilities()
        layers["capabilities"] = ACTIVE
    except OSError as exc:
        layers["capabilities"] = ACTIVE if os.geteuid() != 0 else f"refused: {exc.strerror}"
    deny_sockets = layers.get("network_namespace") != ACTIVE
    try:
        linux.install_seccomp_filter(deny_sockets=deny_sockets)
        layers["seccomp"] = ACTIVE
        layers["socket_filter"] = ACTIVE if deny_sockets else "not needed (network namespace)"
    except OSError as exc:
        layers["seccomp"] = f"refused: {exc.strerror}"
        layers["socket_filter"] = "no seccomp" if deny_sockets else "not needed (network namespace)"
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # PID 1 only receives signals it has handlers for
    layers["process_cleanup"] = ("kill every process of the PID namespace" if os.getpid() == 1
                                 else "process group + subreaper")


def enter_job_sandbox(cpu_seconds: int, fds: tuple[int, int, int, int], workdir: str,
                      job_user: tuple[int, int] | None, new_session: bool) -> None:
    """In a freshly forked job process: apply the per-job steps. ``fds`` is (stdin, stdout, stderr, channel).

    With ``job_user`` (uid, gid) the process switches to that unprivileged user, which also makes the kernel
    clear every capability; otherwise capabilities are cleared explicitly. ``new_session`` is needed only when
    the job is not alone in a PID namespace, for killing by process group. The other limits come from the
    zygote (:func:`sandbox.isolation.limit_job_resources`).
    """
    if new_session:
        os.setsid()
    os.chdir(workdir)
    if min(fds) < 3:
        raise OSError(errno.EBADF, "job descriptors must not overlap stdio")
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    os.closerange(len(fds), max_fd())
    os.set_blocking(1, True)  # pipes the judge drains (sandbox.output): non-blocking only on the judge's side
    os.set_blocking(2, True)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    if job_user is not None:
        uid, gid = job_user
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    else:
        linux.drop_all_capabilities()


def wipe_scratch(path: str, workdir: str, keep: frozenset[str]) -> None:
    """Delete everything a job left under ``path`` (never following symlinks) but the entries named in
    ``keep`` (read-only host paths bound in); fast when it left nothing."""
    try:
        os.rmdir(workdir)
    except OSError:
        pass
    for entry in os.scandir(path):
        if entry.name in keep:
            continue
        if entry.is_dir(follow_symlinks=False):
            import shutil  # only when a job left a directory behind

            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            try:
                os.unlink(entry.path)
            except OSError:
                pass


def max_fd() -> int:
    """One above the highest descriptor this process may have open."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]

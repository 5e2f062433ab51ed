"""Booting a zygote: the worker-level isolation, applied once, then ``exec`` into the lean zygote.

:func:`boot` runs in a process the worker has just forked (the worker has already imported all it needs,
which saves a Python start and ~25 ms of imports per zygote). It joins the zygote's pids cgroup, enters the
namespaces (continuing as PID 1 of its own), makes the filesystem read-only and private, picks the job user
and sets the limits every job shares, then replaces itself with :mod:`sandbox.zygote`, which hardens itself
(:func:`sandbox.job_sandbox.lock_down_zygote`) before anything else. All of that survives ``execve``;
nothing of the worker's does: its memory (and the modules the boot used: ``pathlib``, ``dataclasses``,
``tempfile``…, so jobs are not forked from them), its environment (the zygote gets :data:`SCRUBBED_ENV`), its
descriptors (every one but stdio and the control socket is close-on-exec).
"""

from __future__ import annotations

import marshal
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from sandbox import isolation
from sandbox.boot import boot_command
from sandbox.isolation import PidsCgroup
from sandbox.job import Limits
from sandbox.zygote import ZygoteParams

# The zygote and its jobs see only this environment: nothing of the worker's leaks into programs.
# LD_BIND_NOW: the zygote resolves every symbol once, instead of each job writing (copying) the pages of the
# symbol tables it resolves lazily.
SCRUBBED_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": "/tmp",
    "TMPDIR": "/tmp", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
    "LD_BIND_NOW": "1",
}
EXIT_BOOT_FAILED = 122


@dataclass(frozen=True)
class ZygoteSpec:
    """What a worker's zygote is to be."""

    control_fd: int  # the zygote's end of the control socket
    limits: Limits
    namespaces: bool
    site_packages: tuple[str, ...]  # what jobs may import besides the standard library (no .pth files run)
    scratch_dir: str  # host directory for per-job working directories when there is no mount namespace
    outer_uid: int
    worker_pid: int
    cgroup: PidsCgroup | None  # to join first, if any
    cgroup_state: str  # "active", or why there is no cgroup
    disabled: tuple[str, ...] = ()  # namespace layers not to attempt


def boot(spec: ZygoteSpec) -> NoReturn:
    """In a process just forked from the worker: isolate, then exec the zygote. Never returns."""
    try:
        _boot(spec)
    except BaseException:  # noqa: BLE001 - say why the zygote could not start; the worker sees it exit
        import traceback

        traceback.print_exc()
    finally:
        os._exit(EXIT_BOOT_FAILED)


def _boot(spec: ZygoteSpec) -> None:
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    report = isolation.IsolationReport()
    report.layers["cgroup_pids"] = spec.cgroup_state
    if spec.cgroup is not None:  # before any process is created
        try:
            spec.cgroup.add(os.getpid())
        except OSError as exc:
            report.layers["cgroup_pids"] = f"unavailable: {exc.strerror or exc}"
    user_processes = isolation.count_user_processes(spec.outer_uid) if spec.outer_uid != 0 else 0
    if spec.namespaces:
        isolation.enter_worker_namespaces(report, spec.disabled)
    else:
        for layer in isolation.NAMESPACE_LAYERS:
            report.layers[layer] = "disabled by configuration"
    kept_in_scratch = isolation.isolate_filesystem(report, _paths_python_needs(spec.site_packages),
                                                   scratch_mb=4 * spec.limits.max_file_mb)
    job_user = _choose_job_user(spec, report)
    # RLIMIT_NPROC counts every process of the job's real user; it is ignored for root.
    nproc_limit = (spec.limits.max_processes if job_user else
                   user_processes + spec.limits.max_processes if spec.outer_uid != 0 else None)
    report.layers["rlimit_nproc"] = isolation.ACTIVE if nproc_limit else "ignored by the kernel for root"
    isolation.limit_job_resources(spec.limits, job_user, nproc_limit)
    params = ZygoteParams(control_fd=spec.control_fd, cpu_seconds=spec.limits.cpu_seconds, job_user=job_user,
                          private_tmp=report.active("private_tmp"), scratch_dir=spec.scratch_dir,
                          kept_in_scratch=kept_in_scratch, site_packages=list(spec.site_packages),
                          layers=report.layers)
    os.set_inheritable(spec.control_fd, True)
    command = boot_command("sandbox.zygote", marshal.dumps(params).hex())
    os.execve(command[0], command, SCRUBBED_ENV)


def _choose_job_user(spec: ZygoteSpec, report: isolation.IsolationReport) -> tuple[int, int] | None:
    """Run jobs as an unprivileged uid when we are really root and the Python installation is reachable.

    This holds with or without the namespaces: where they are refused, the uid is what keeps a job from
    signalling, reading the environment of, or writing the files of the root-owned host processes. Whether
    that user can also read site-packages is reported (``job_site_packages``): a virtualenv inside a directory
    only root may enter (``mktemp -d`` makes them so) leaves jobs the standard library alone.
    """
    if spec.outer_uid != 0 or os.geteuid() != 0:
        report.layers["job_user"] = "not root: jobs keep the worker's uid, without capabilities"
        report.layers["job_site_packages"] = "not needed (jobs keep the worker's uid)"
        return None
    user = isolation.job_user_for(spec.worker_pid)
    site_dirs = [p for p in spec.site_packages if os.path.isdir(p)]  # as root: for the job user, isdir says False
    pid = os.fork()
    if pid == 0:  # probe: can that user read the interpreter's standard library, and site-packages?
        os.setresgid(user[1], user[1], user[1])
        os.setresuid(user[0], user[0], user[0])
        if not (os.access(os.__file__, os.R_OK) and os.access(os.path.dirname(os.__file__), os.X_OK)):
            os._exit(1)
        os._exit(0 if all(os.access(p, os.R_OK | os.X_OK) for p in site_dirs) else 2)
    probe = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if probe not in (0, 2):
        report.layers["job_user"] = "the Python installation is not readable by other users: jobs run as root"
        report.layers["job_site_packages"] = "not needed (jobs run as root)"
        return None
    report.layers["job_site_packages"] = isolation.ACTIVE if probe == 0 else (
        f"not readable by the job user: {', '.join(spec.site_packages)} (make them and the directories above "
        f"them readable by others)")
    if not report.active("private_tmp"):
        os.chmod(spec.scratch_dir, 0o711)  # job directories are made in here: let the job user reach its own
    report.layers["job_user"] = isolation.ACTIVE
    return user


def _paths_python_needs(site_packages: tuple[str, ...]) -> list[str]:
    """What the zygote and its jobs must still see: the interpreter (as named, a virtualenv's included, and as
    resolved), the standard library, ``site_packages`` and this package."""
    named = os.path.dirname(sys.executable)
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *sys.path, *site_packages,
             str(Path(__file__).parents[1]), named, os.path.dirname(named),
             os.path.dirname(os.path.realpath(sys.executable))}
    return sorted({os.path.realpath(p) for p in roots if p and os.path.exists(p)})


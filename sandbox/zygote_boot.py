"""Booting a zygote: the worker-level isolation, applied once, then ``exec`` into the lean zygote.

A worker starts this with a fresh ``exec`` and a scrubbed environment, so nothing of the worker's is in its
memory (``/proc/self/environ`` included). It waits until the worker has moved it into its pids cgroup, enters
the namespaces (continuing as PID 1 of its own), makes the filesystem read-only and private, picks the job
user and sets the limits every job shares, then replaces itself with :mod:`sandbox.zygote`, which hardens
itself (:func:`sandbox.job_sandbox.lock_down_zygote`) before anything else. All of that survives ``execve``;
the modules it took to do it (``json``, ``pathlib``, ``dataclasses``, ``tempfile``…) do not, so jobs are not
forked from them.
"""

from __future__ import annotations

import json
import marshal
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from sandbox import isolation
from sandbox.boot import boot_command
from sandbox.job import Limits


@dataclass(frozen=True)
class ZygoteSpec:
    """What a worker tells its zygote on the command line (JSON)."""

    control_fd: int
    limits: Limits
    namespaces: bool
    site_packages: tuple[str, ...]  # what jobs may import besides the standard library (no .pth files run)
    scratch_dir: str  # host directory for per-job working directories when there is no mount namespace
    outer_uid: int
    worker_pid: int
    disabled: tuple[str, ...] = ()  # namespace layers not to attempt

    def to_json(self) -> str:
        return json.dumps({**self.__dict__, "limits": self.limits.__dict__})

    @classmethod
    def from_json(cls, text: str) -> ZygoteSpec:
        data = json.loads(text)
        return cls(**{**data, "limits": Limits(**data["limits"]), "site_packages": tuple(data["site_packages"]),
                      "disabled": tuple(data["disabled"])})


def main() -> None:
    """Entry point: ``python -I -S -c <boot> <spec-json>``; ends by exec'ing :func:`sandbox.zygote.main`."""
    spec = ZygoteSpec.from_json(sys.argv[1])
    sys.dont_write_bytecode = True
    sys.path.extend(spec.site_packages)
    control = socket.socket(fileno=spec.control_fd)
    report = isolation.IsolationReport()
    cgroup = marshal.loads(control.recv(65536) or marshal.dumps(("cgroup", "the worker went away")))
    report.layers["cgroup_pids"] = str(cgroup[1])  # no process is created before this point
    user_processes = isolation.count_user_processes(spec.outer_uid) if spec.outer_uid != 0 else 0
    if spec.namespaces:
        isolation.enter_worker_namespaces(report, spec.disabled)
    else:
        for layer in isolation.NAMESPACE_LAYERS:
            report.layers[layer] = "disabled by configuration"
    isolation.isolate_filesystem(report, _paths_python_needs(), scratch_mb=4 * spec.limits.max_file_mb)
    job_user = _choose_job_user(spec, report)
    # RLIMIT_NPROC counts every process of the job's real user; it is ignored for root.
    nproc_limit = (spec.limits.max_processes if job_user else
                   user_processes + spec.limits.max_processes if spec.outer_uid != 0 else None)
    report.layers["rlimit_nproc"] = isolation.ACTIVE if nproc_limit else "ignored by the kernel for root"
    isolation.limit_job_resources(spec.limits, job_user, nproc_limit)
    params = {"control_fd": spec.control_fd, "cpu_seconds": spec.limits.cpu_seconds, "job_user": job_user,
              "private_tmp": report.active("private_tmp"), "scratch_dir": spec.scratch_dir,
              "site_packages": list(spec.site_packages), "layers": report.layers}
    os.set_inheritable(spec.control_fd, True)
    command = boot_command("sandbox.zygote", marshal.dumps(params).hex())
    os.execv(command[0], command)


def _choose_job_user(spec: ZygoteSpec, report: isolation.IsolationReport) -> tuple[int, int] | None:
    """Run jobs as an unprivileged uid when we are really root and the Python installation is reachable.

    This holds with or without the namespaces: where they are refused, the uid is what keeps a job from
    signalling, reading the environment of, or writing the files of the root-owned host processes.
    """
    if spec.outer_uid != 0 or os.geteuid() != 0:
        report.layers["job_user"] = "not root: jobs keep the worker's uid, without capabilities"
        return None
    user = isolation.job_user_for(spec.worker_pid)
    pid = os.fork()
    if pid == 0:  # probe: can that user read the interpreter's standard library?
        os.setresgid(user[1], user[1], user[1])
        os.setresuid(user[0], user[0], user[0])
        readable = os.access(os.__file__, os.R_OK) and os.access(os.path.dirname(os.__file__), os.X_OK)
        os._exit(0 if readable else 1)
    if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0:
        report.layers["job_user"] = "the Python installation is not readable by other users: jobs run as root"
        return None
    if not report.active("private_tmp"):
        os.chmod(spec.scratch_dir, 0o711)  # job directories are made in here: let the job user reach its own
    report.layers["job_user"] = isolation.ACTIVE
    return user


def _paths_python_needs() -> list[str]:
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *sys.path,
             str(Path(__file__).parents[1]), os.path.dirname(os.path.realpath(sys.executable))}
    return sorted({os.path.realpath(p) for p in roots if p and os.path.exists(p)})


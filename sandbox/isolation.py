"""Isolation steps, applied once per worker (here, as the zygote boots) and per job (:mod:`sandbox.job_sandbox`).

Worker level, before any program exists, so that its cost is paid once:
    pids cgroup (created by the worker, which moves the booting zygote into it) → user namespace (non-root
    only) → mount, PID, network, IPC and UTS namespaces → host scratch and home directories masked, a minimal
    ``/etc`` (:data:`ETC_FILES`), the network namespace's own ``/sys``, whole filesystem read-only and
    private, fresh ``/proc`` → job user, the rlimits every job shares; then, in the exec'd zygote
    (:func:`sandbox.job_sandbox.lock_down_zygote`): capability bounding set emptied, securebits locked,
    ``no_new_privs``, non-dumpable, child subreaper → seccomp filter (no new user namespaces, no
    keyrings/bpf/io_uring; and ``socket(2)`` refused outright when there is no network namespace, so a refused
    namespace does not open the network).
Job level, in each forked child before the program loads:
    new session (without a PID namespace) → its own empty working directory in the private tmpfs → stdin
    ``/dev/null``, stdout/stderr to pipes the judge drains (:mod:`sandbox.output`), every other descriptor
    closed → CPU-time limit → the job user (or, without one, all capabilities cleared).

Every step either takes effect or is recorded in the :class:`IsolationReport` with the reason the kernel
gave; the worker logs a warning for each missing one. Invariants: a refused step never enables a more
dangerous fallback (``kill(-1)`` is only used as PID 1 of our own namespace), and the job process never
holds a capability or an inherited descriptor other than its channel and stdio.
"""

from __future__ import annotations

import errno
import os
import re
import resource
import shutil
import signal
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from sandbox import linux
from sandbox.job import Limits
from sandbox.job_sandbox import ACTIVE, SCRATCH, max_fd

# Host places that hold other users' data, sockets or shared memory; covered by an empty tmpfs in the worker.
MASKED_DIRS = ("/var/tmp", "/run", "/var/run", "/dev/shm", "/home", "/root", "/srv", "/mnt", "/media")
# All programs see of the host's /etc (an empty tmpfs otherwise): what the dynamic loader, local time, OpenSSL
# (ssl, hashlib) and the standard library's table lookups (mimetypes, socket.getservbyname/getprotobyname)
# read. Nothing that names the host, its users or its network: no passwd, group, hosts, hostname, resolv.conf.
ETC_FILES = ("ld.so.cache", "localtime", "ssl/openssl.cnf", "mime.types", "services", "protocols")
_NAMESPACE_FLAGS = {
    "mount_namespace": linux.CLONE_NEWNS,
    "pid_namespace": linux.CLONE_NEWPID,
    "network_namespace": linux.CLONE_NEWNET,
    "ipc_uts_namespaces": linux.CLONE_NEWIPC | linux.CLONE_NEWUTS,
}
_WARNINGS = {
    "cgroup_pids": "no pids cgroup: a fork bomb is bounded only by RLIMIT_NPROC, which root ignores",
    "pid_namespace": "no PID namespace: programs can see and signal processes of the same user",
    "network_namespace": "no network namespace: the network is blocked only by the socket filter",
    "mount_namespace": "no mount namespace: programs can write wherever the worker's user can",
    "readonly_root": "filesystem not read-only: programs can write wherever the worker's user can",
    "private_proc": "host /proc visible: programs can list host processes",
    "private_etc": "host /etc visible: programs can read its user names, host names and resolver settings",
    "private_sys": "host /sys visible: programs can read the host's network interfaces and their addresses",
    "capabilities": "capabilities not dropped",
    "seccomp": "no seccomp filter: programs can create user namespaces and use keyrings, bpf, io_uring",
    "socket_filter": "no socket filter either: programs can open network connections",
    "job_site_packages": "programs can import only the standard library",
}
NAMESPACE_LAYERS = tuple(_NAMESPACE_FLAGS)


@dataclass(frozen=True)
class IsolationConfig:
    """Which worker-level layers to attempt; each still falls back, with a warning, if the kernel refuses.

    ``disabled`` names namespace layers (:data:`NAMESPACE_LAYERS`) not to attempt, as if the kernel had
    refused them: for machines where one misbehaves, and for testing the fallbacks.
    """

    namespaces: bool = True
    cgroup: bool = True
    disabled: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = set(self.disabled) - set(NAMESPACE_LAYERS)
        if unknown:
            raise ValueError(f"unknown isolation layers {sorted(unknown)}; choose from {list(NAMESPACE_LAYERS)}")


@dataclass
class IsolationReport:
    """Layer name → ``"active"`` or why it is not."""

    layers: dict[str, str] = field(default_factory=dict)

    def active(self, layer: str) -> bool:
        return self.layers.get(layer) == ACTIVE

    def warnings(self) -> list[str]:
        return [f"{msg} ({self.layers[name]})" for name, msg in _WARNINGS.items()
                if name in self.layers and not self.active(name) and not self.layers[name].startswith("not needed")]


class PidsCgroup:
    """A cgroup-v1 ``pids`` group for one worker, capping the processes its jobs can create."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, name: str, max_pids: int) -> PidsCgroup:
        """Create ``name`` under this process's own pids cgroup. Raises ``OSError`` if unavailable."""
        parent = own_pids_cgroup()
        if parent is None:
            raise OSError(errno.ENOENT, "no cgroup-v1 pids hierarchy")
        path = parent / name
        try:
            path.mkdir(parents=True)
        except FileExistsError:  # left by a process that had our pid; reusable only if empty (rmdir says)
            path.rmdir()
            path.mkdir()
        (path / "pids.max").write_text(str(max_pids))
        return cls(path)

    def add(self, pid: int) -> None:
        """Move process ``pid`` (and so every process it will create) into the group."""
        (self.path / "cgroup.procs").write_text(str(pid))

    def remove(self) -> None:
        """Remove the group; it must be empty (the worker kills its zygote first)."""
        try:
            self.path.rmdir()
        except FileNotFoundError:
            pass


def own_pids_cgroup() -> Path | None:
    """This process's cgroup-v1 ``pids`` directory, if there is such a hierarchy."""
    root = Path("/sys/fs/cgroup/pids")
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    own = next((line.split(":", 2)[2].strip() for line in lines if line.split(":")[1] == "pids"), None)
    if own is None or not (root / "cgroup.procs").exists():
        return None
    return root / own.lstrip("/")


# What a worker named "<pool pid>-<n>" leaves behind if it is killed: its zygotes' pids cgroups
# (persd-sandbox-<name>-<start>) and its scratch directory (persd-sandbox-<name>-<random>, under the temp dir).
LEFTOVER_PREFIX = "persd-sandbox-"
_LEFTOVER = re.compile(rf"{LEFTOVER_PREFIX}(\d+)-(\d+)-")


def remove_leftovers(worker_names: set[str] | None = None) -> int:
    """Remove the cgroups and scratch directories of the named workers, or (``None``) of pools whose process
    no longer exists. Only empty cgroups can go (``rmdir`` refuses others), so a live job is never touched.
    Returns how many matching entries are still there."""
    remaining = 0
    places = [(own_pids_cgroup(), True), (Path(tempfile.gettempdir()), False)]
    for parent, is_cgroup in places:
        if parent is None:
            continue
        try:
            entries = list(parent.iterdir())
        except OSError:
            continue
        for entry in entries:
            match = _LEFTOVER.match(entry.name)
            if match is None or not entry.is_dir() or entry.is_symlink():
                continue
            name = f"{match[1]}-{match[2]}"
            if worker_names is not None and name not in worker_names:
                continue
            if worker_names is None and Path(f"/proc/{match[1]}").exists():
                continue  # that pool is still running (or its pid was reused: leave it)
            try:
                entry.rmdir() if is_cgroup else shutil.rmtree(entry)
            except OSError:
                remaining += 1
    return remaining


def enter_worker_namespaces(report: IsolationReport, disabled: tuple[str, ...] = ()) -> None:
    """Unshare every namespace the kernel allows; if a PID namespace was made, continue as its PID 1.

    Root needs no user namespace; anyone else gets one mapping their uid to root inside it, which is what lets
    them create the others. On success the calling process forks: the child returns here as PID 1 (killed
    by the kernel if its parent dies), the parent waits for it and exits with its status.
    """
    outer_uid, outer_gid = os.getuid(), os.getgid()
    needs_user_ns = os.geteuid() != 0
    wanted = 0
    for layer, flags in _NAMESPACE_FLAGS.items():
        if layer in disabled:
            report.layers[layer] = "disabled by configuration"
            continue
        try:
            linux.unshare(flags | (linux.CLONE_NEWUSER if needs_user_ns and not wanted else 0))
        except OSError as exc:
            report.layers[layer] = f"refused: {exc.strerror}"
            continue
        if needs_user_ns and not wanted:
            _write_id_maps(outer_uid, outer_gid)
            report.layers["user_namespace"] = ACTIVE
        wanted |= flags
        report.layers[layer] = ACTIVE
    report.layers.setdefault("user_namespace", "not needed (root)" if not needs_user_ns else "refused")
    if wanted & linux.CLONE_NEWUTS:
        linux.sethostname("sandbox")
    if wanted & linux.CLONE_NEWPID:
        _continue_as_pid1()


def _write_id_maps(uid: int, gid: int) -> None:
    Path("/proc/self/setgroups").write_text("deny")
    Path("/proc/self/uid_map").write_text(f"0 {uid} 1")
    Path("/proc/self/gid_map").write_text(f"0 {gid} 1")


def _continue_as_pid1() -> None:
    pid = os.fork()
    if pid:
        os.closerange(3, max_fd())  # only PID 1 may hold the worker's control socket
        _, status = os.waitpid(pid, 0)
        os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
    linux.set_parent_death_signal(signal.SIGKILL)


def isolate_filesystem(report: IsolationReport, keep: list[str], scratch_mb: int) -> list[str]:
    """Hide host scratch and home directories, show a minimal /etc and the network namespace's own /sys, make
    every mount read-only and private, mount a fresh /proc and a private writable tmpfs of ``scratch_mb`` MiB
    at /tmp. All of it once per worker: a job pays nothing for it.

    ``keep`` lists paths the zygote must still see (the Python installation, the sandbox package): masked
    directories, /etc and /tmp that contain one get it bound back in, read-only. Returns the names of the
    entries of /tmp that hold such paths (a job's clean-up must leave them).
    """
    if not report.active("mount_namespace"):
        for layer in ("masked_paths", "private_etc", "private_sys", "readonly_root", "private_proc", "private_tmp"):
            report.layers[layer] = "no mount namespace"
        return []
    try:
        for path in MASKED_DIRS:
            _mask_directory(path, [k for k in keep if k.startswith(path + "/")])
        report.layers["masked_paths"] = ACTIVE
    except OSError as exc:
        report.layers["masked_paths"] = f"refused: {exc.strerror}"
    etc_files = [path for path in (f"/etc/{name}" for name in ETC_FILES) if os.path.exists(path)]
    try:
        _cover("/etc", etc_files + [k for k in keep if k.startswith("/etc/")], "size=64k,nr_inodes=64,mode=0755")
        report.layers["private_etc"] = ACTIVE
    except OSError as exc:
        report.layers["private_etc"] = f"refused: {exc.strerror}"
    if report.active("network_namespace"):
        try:  # a sysfs mounted in a network namespace lists only its interfaces (here: lo)
            linux.mount("sysfs", "/sys", "sysfs", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)
            report.layers["private_sys"] = ACTIVE
        except OSError as exc:
            report.layers["private_sys"] = f"refused: {exc.strerror}"
    else:
        report.layers["private_sys"] = "no network namespace"
    try:
        linux.make_tree_readonly_private("/")
        report.layers["readonly_root"] = ACTIVE
    except OSError as exc:
        report.layers["readonly_root"] = f"refused: {exc.strerror}"
    in_scratch = [k for k in keep if k.startswith(SCRATCH + "/")]
    try:
        _cover(SCRATCH, in_scratch, f"size={scratch_mb}m,nr_inodes=4096,mode=0755")
        report.layers["private_tmp"] = ACTIVE
    except OSError as exc:
        report.layers["private_tmp"] = f"refused: {exc.strerror}"
    if report.active("pid_namespace"):
        try:
            flags = linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC
            linux.mount("proc", "/proc", "proc", flags)
            report.layers["private_proc"] = ACTIVE
        except OSError as exc:
            report.layers["private_proc"] = f"refused: {exc.strerror}"
    else:
        report.layers["private_proc"] = "no PID namespace"
    return sorted({k[len(SCRATCH) + 1:].split("/")[0] for k in in_scratch}) if report.active("private_tmp") else []


def _mask_directory(path: str, keep: list[str]) -> None:
    """Cover ``path`` with an empty tmpfs, then bind the ``keep`` paths under it back into place."""
    if os.path.islink(path) or not os.path.isdir(path):
        return
    _cover(path, keep, "size=64k,mode=0755")


def _cover(path: str, keep: list[str], options: str) -> None:
    """Mount a tmpfs (``options``) on ``path``, then bind the ``keep`` paths under it back into place."""
    kept = [(k, os.open(k, os.O_PATH)) for k in _topmost(keep)]
    try:
        linux.mount("tmpfs", path, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, options)
        for target, fd in kept:
            if os.path.isdir(f"/proc/self/fd/{fd}"):
                os.makedirs(target, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                open(target, "a").close()
            linux.mount(f"/proc/self/fd/{fd}", target, None, linux.MS_BIND | linux.MS_REC)
    finally:
        for _, fd in kept:
            os.close(fd)


def _topmost(paths: list[str]) -> list[str]:
    """The paths that are not inside another of them."""
    ordered = sorted(set(paths))
    return [p for i, p in enumerate(ordered) if not any(p.startswith(q + "/") for q in ordered[:i])]


def limit_job_resources(limits: Limits, job_user: tuple[int, int] | None, nproc_limit: int | None) -> None:
    """The limits every job shares, set once on the zygote for its jobs to inherit (fewer calls per job):
    address space, open files, file size, no core dumps, processes (``nproc_limit``, if any) and, when jobs
    run as ``job_user``, no supplementary groups. The CPU-time limit is per job (:func:`enter_job_sandbox`).
    """
    mib = 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb * mib,) * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits.max_open_files,) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.max_file_mb * mib,) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if nproc_limit is not None:
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc_limit,) * 2)
    if job_user is not None:
        os.setgroups([])


def job_user_for(worker_pid: int) -> tuple[int, int]:
    """A uid/gid used by no one else while this worker lives: RLIMIT_NPROC then counts only its jobs."""
    return 1_000_000_000 + worker_pid, 1_000_000_000 + worker_pid


def count_user_processes(uid: int) -> int:
    """Processes (threads included, as RLIMIT_NPROC counts them) currently owned by ``uid``."""
    count = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields.get("Uid", "-1").split()[0]) == uid:
            count += int(fields.get("Threads", "1"))
    return count

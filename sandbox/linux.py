"""Thin ctypes bindings for the Linux calls that Python 3.11's ``os`` module lacks.

Every function raises ``OSError`` with the kernel's errno on failure, so callers can tell "the kernel
refused" (``EPERM``, ``ENOSYS``, ``EINVAL``) from success and fall back deliberately. Nothing here
decides policy; :mod:`sandbox.isolation` does.
"""

from __future__ import annotations

import ctypes
import os

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18

_MOUNT_ATTR_RDONLY = 0x1
_MOUNT_ATTR_NOSUID = 0x2
_AT_FDCWD = -100
_AT_RECURSIVE = 0x8000

_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_PR_CAPBSET_DROP = 24
_PR_SET_SECUREBITS = 28
_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4

# SECBIT_NOROOT, SECBIT_KEEP_CAPS off, SECBIT_NO_CAP_AMBIENT_RAISE, each locked; SECBIT_NO_SETUID_FIXUP is
# locked off, so that switching to a non-root uid clears every capability.
_SECUREBITS_LOCKED_DOWN = 0x01 | 0x02 | 0x08 | 0x20 | 0x40 | 0x80
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

_SYSCALLS = {  # (mount_setattr, capset) by machine; both are in the generic table from 5.12 on.
    "x86_64": (442, 126),
    "aarch64": (442, 91),
}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32),
    ]


def _check(result: int, what: str) -> None:
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _c_str(value: str | None) -> bytes | None:
    return None if value is None else value.encode()


def _syscall_number(index: int, name: str) -> int:
    numbers = _SYSCALLS.get(os.uname().machine)
    if numbers is None:
        raise OSError(38, f"{name}: syscall number unknown on {os.uname().machine}")  # ENOSYS
    return numbers[index]


def unshare(flags: int) -> None:
    """Move the calling process into new namespaces (``unshare(2)``)."""
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    """``mount(2)``."""
    _check(
        _libc.mount(_c_str(source), _c_str(target), _c_str(fstype), ctypes.c_ulong(flags), _c_str(data)),
        f"mount {target}",
    )


def make_tree_readonly_private(path: str = "/") -> None:
    """Mark every mount under ``path`` read-only, nosuid and private in one call (``mount_setattr(2)``)."""
    attr = _MountAttr(_MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID, 0, MS_PRIVATE, 0)
    number = _syscall_number(0, "mount_setattr")
    result = _libc.syscall(
        ctypes.c_long(number), ctypes.c_int(_AT_FDCWD), path.encode(), ctypes.c_uint(_AT_RECURSIVE),
        ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    _check(result, "mount_setattr")


def sethostname(name: str) -> None:
    """``sethostname(2)`` (only meaningful inside a new UTS namespace)."""
    raw = name.encode()
    _check(_libc.sethostname(raw, ctypes.c_size_t(len(raw))), "sethostname")


def _prctl(option: int, arg: int = 0) -> None:
    _check(_libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0),
                       ctypes.c_ulong(0)), f"prctl({option})")


def set_parent_death_signal(signum: int) -> None:
    """Have the kernel send ``signum`` to this process when its parent dies."""
    _prctl(_PR_SET_PDEATHSIG, signum)


def set_non_dumpable() -> None:
    """Forbid ptrace and ``/proc/<pid>/{mem,environ,fd}`` access by peers without CAP_SYS_PTRACE."""
    _prctl(_PR_SET_DUMPABLE, 0)


def set_child_subreaper() -> None:
    """Adopt orphaned descendants, so that daemons that double-fork can still be found and killed."""
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def set_no_new_privs() -> None:
    """Make ``execve`` unable to grant privileges (setuid binaries, file capabilities)."""
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)


def drop_bounding_capabilities() -> None:
    """Empty the capability bounding and ambient sets and lock root's special treatment off.

    The bounding set only limits what ``execve`` can grant, so the caller keeps its current
    capabilities; :func:`drop_all_capabilities` clears those.
    """
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        _prctl(_PR_CAPBSET_DROP, cap)
    _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
    _prctl(_PR_SET_SECUREBITS, _SECUREBITS_LOCKED_DOWN)


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_SECCOMP_RET_ALLOW = 0x7FFF0000
_SECCOMP_RET_ERRNO = 0x00050000
_BPF_LD_W_ABS, _BPF_JEQ_K, _BPF_JGE_K, _BPF_JSET_K, _BPF_RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
_X32_SYSCALL_BIT = 0x40000000
# audit arch; syscall numbers of unshare, clone, clone3, socket; those refused outright.
_SECCOMP_TABLE = {
    "x86_64": (0xC000003E, 272, 56, 435, 41, {
        "keyctl": 250, "add_key": 248, "request_key": 249, "bpf": 321, "perf_event_open": 298,
        "userfaultfd": 323, "io_uring_setup": 425}),
    "aarch64": (0xC00000B7, 97, 220, 435, 198, {
        "keyctl": 219, "add_key": 217, "request_key": 218, "bpf": 280, "perf_event_open": 241,
        "userfaultfd": 282, "io_uring_setup": 425}),
}


def install_seccomp_filter(deny_sockets: bool = False) -> list[str]:
    """Refuse new user namespaces and a few high-risk, rarely needed syscalls, for us and every descendant.

    ``unshare``/``clone`` with CLONE_NEWUSER fail with EPERM; ``clone3`` (whose flags a filter cannot read)
    fails with ENOSYS, which makes glibc fall back to ``clone``. With ``deny_sockets``, ``socket(2)`` fails
    with EPERM for every address family (``socketpair(2)`` still works): the fallback when there is no
    network namespace. Requires ``no_new_privs``. Returns the names of the syscalls refused outright.
    """
    table = _SECCOMP_TABLE.get(os.uname().machine)
    if table is None:
        raise OSError(38, f"seccomp: no syscall table for {os.uname().machine}")
    arch, unshare_nr, clone_nr, clone3_nr, socket_nr, refused = table
    refused = {**refused, **({"socket": socket_nr} if deny_sockets else {})}
    eperm, enosys = _SECCOMP_RET_ERRNO | 1, _SECCOMP_RET_ERRNO | 38  # EPERM, ENOSYS

    # (label or None, code, k, jump-if-true label, jump-if-false label); classic BPF jumps only go forward,
    # as offsets from the next instruction, which `assemble` computes from the labels.
    program: list[tuple[str | None, int, int, str | None, str | None]] = [
        (None, _BPF_LD_W_ABS, 4, None, None),  # seccomp_data.arch
        (None, _BPF_JEQ_K, arch, None, "deny"),
        (None, _BPF_LD_W_ABS, 0, None, None),  # seccomp_data.nr
        (None, _BPF_JGE_K, _X32_SYSCALL_BIT, "nosys", None),
        (None, _BPF_JEQ_K, clone3_nr, "nosys", None),
        (None, _BPF_JEQ_K, unshare_nr, "flags", None),
        (None, _BPF_JEQ_K, clone_nr, "flags", None),
        *((None, _BPF_JEQ_K, nr, "deny", None) for nr in refused.values()),
        (None, _BPF_RET_K, _SECCOMP_RET_ALLOW, None, None),
        ("flags", _BPF_LD_W_ABS, 16, None, None),  # low 32 bits of args[0]: the clone/unshare flags
        (None, _BPF_JSET_K, CLONE_NEWUSER, "deny", None),
        (None, _BPF_RET_K, _SECCOMP_RET_ALLOW, None, None),
        ("deny", _BPF_RET_K, eperm, None, None),
        ("nosys", _BPF_RET_K, enosys, None, None),
    ]
    labels = {label: i for i, (label, *_) in enumerate(program) if label}

    def offset(pc: int, label: str | None) -> int:
        return 0 if label is None else labels[label] - pc - 1

    filters = (_SockFilter * len(program))(*(_SockFilter(code, offset(pc, jt), offset(pc, jf), k)
                                              for pc, (_, code, k, jt, jf) in enumerate(program)))
    prog = _SockFprog(len(program), filters)
    _check(_libc.prctl(ctypes.c_int(_PR_SET_SECCOMP), ctypes.c_ulong(_SECCOMP_MODE_FILTER), ctypes.byref(prog),
                       ctypes.c_ulong(0), ctypes.c_ulong(0)), "prctl(PR_SET_SECCOMP)")
    return sorted(refused)


def drop_all_capabilities() -> None:
    """Clear the effective, permitted and inheritable capability sets (``capset(2)``)."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    number = _syscall_number(1, "capset")
    _check(_libc.syscall(ctypes.c_long(number), ctypes.byref(header), ctypes.byref(data)), "capset")

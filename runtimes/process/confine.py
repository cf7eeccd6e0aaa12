"""What a process container's child does between fork and exec to become the container: its
own mount view, its user, its capabilities, no_new_privs and seccomp. Standard library only: the
shim (runtimes/shim.py, run with `python -S`) and the agent's exec path both call it.

`security` is the dict runtimes/process/security.py resolves at create time (it lands in the
container's spec.json). The order is the one runc follows:

1. mounts: a new mount namespace, made private, with the node's secrets hidden (or, for exec, the
   container's own mount namespace, entered with setns);
2. seccomp, here already when no_new_privs is off (loading a filter then needs CAP_SYS_ADMIN,
   which the container may not keep);
3. the capability bounding set, then setgroups/setgid/setuid (a non-root user loses its
   permitted and effective capabilities there, as on execve: no ambient capabilities, as the
   kubelet and runc give none), then capset for root;
4. PR_SET_NO_NEW_PRIVS;
5. seccomp, last before exec, when no_new_privs is on.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from typing import Any

CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x20, 0x1000, 0x4000, 0x40000
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, PR_CAP_AMBIENT = 24, 38, 22, 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SECCOMP_MODE_FILTER = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
CAP_MKNOD = 27

# runc's defaults for containers that are not privileged.
MASKED_PATHS = (
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
    "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware", "/sys/devices/virtual/powercap",
)  # fmt: skip
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
_DEVICES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9), ("tty", 5, 0))
_MOUNT_OPTION_FLAGS = {"ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC}


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_libc: Any = None


def _c() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
        _libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return _libc


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    _check(_c().mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def _prctl(option: int, arg: int = 0) -> None:
    _check(_c().prctl(option, arg, 0, 0, 0), f"prctl({option})")


def unescape(field: str) -> str:
    """A mountinfo path: \\040 is a space, and so on (no codec lookup: the child may no longer
    see the standard library's encodings once paths are hidden)."""
    parts = field.split("\\")
    out = parts[0]
    for part in parts[1:]:
        if len(part) >= 3 and part[:3].isdigit():
            out += chr(int(part[:3], 8)) + part[3:]
        else:
            out += "\\" + part
    return out


def _mounts() -> list[tuple[str, int]]:
    """(mount point, MS_ flags among ro/nosuid/nodev/noexec) of every mount this process sees."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = unescape(fields[4])
            flags = sum(_MOUNT_OPTION_FLAGS.get(o, 0) for o in fields[5].split(","))
            out.append((point, flags))
    return out


def _remount(point: str, flags: int) -> None:
    _mount(None, point, None, MS_REMOUNT | MS_BIND | flags)


def _bind_readonly(path: str) -> None:
    """`path` and every mount below it read-only (each mount is remounted on its own)."""
    _mount(path, path, None, MS_BIND | MS_REC)
    for point, flags in _mounts():
        if point == path or point.startswith(path.rstrip("/") + "/"):
            with contextlib.suppress(OSError):  # an overmounted or vanished mount point
                _remount(point, flags | MS_RDONLY)


def _hide(path: str) -> None:
    """An empty read-only tmpfs over a directory; /dev/null over a file."""
    if os.path.isdir(path):
        _mount("tmpfs", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=755")
    elif os.path.lexists(path):
        _mount("/dev/null", path, None, MS_BIND)
        _remount(path, MS_RDONLY | MS_NOSUID | MS_NOEXEC | MS_NODEV)


def _fresh_dev(security: dict[str, Any] | None = None) -> None:
    """A /dev of the container's own (runc's devices), so host disks and the like are not there;
    the container's termination log in it. /dev/pts is the host's: the shim and exec open a
    container's terminal there before it enters this namespace, and a new devpts instance would
    leave `tty` and ttyname() with no name for it."""
    host_pts = os.open("/dev/pts", os.O_PATH | os.O_DIRECTORY)
    _mount("tmpfs", "/dev", "tmpfs", MS_NOSUID, "mode=755,size=65536k")
    for name, major, minor in _DEVICES:
        os.mknod(f"/dev/{name}", 0o666 | 0o020000, os.makedev(major, minor))
        os.chmod(f"/dev/{name}", 0o666)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2"), ("ptmx", "pts/ptmx")):  # fmt: skip
        os.symlink(target, f"/dev/{name}")
    os.mkdir("/dev/pts", 0o755)
    os.mkdir("/dev/shm", 0o755)
    try:
        _mount(f"/proc/self/fd/{host_pts}", "/dev/pts", None, MS_BIND)
    finally:
        os.close(host_pts)
    _mount("shm", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=1777,size=65536k")
    if security is not None:
        _bind_termination_log(security, fresh_dev=True)
    _mount(None, "/dev", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID, "mode=755,size=65536k")  # no mknod in it


def _host_devices_in_own_dev() -> None:
    """A privileged container's /dev: a tmpfs of its own with every entry of the host's /dev bound
    into it (directories with what is mounted below them, such as /dev/pts and /dev/shm), so that it
    sees the host's devices, as runc gives a privileged container, and a file made in it (its
    termination log) is not made in the host's /dev."""
    host = os.open("/dev", os.O_PATH | os.O_DIRECTORY)
    try:
        entries = [(e.name, e.is_symlink(), e.is_dir(follow_symlinks=False)) for e in os.scandir("/dev")]
        _mount("tmpfs", "/dev", "tmpfs", MS_NOSUID, "mode=755,size=65536k")
        for name, is_link, is_dir in entries:
            source, target = f"/proc/self/fd/{host}/{name}", f"/dev/{name}"
            with contextlib.suppress(OSError):  # one odd entry must not cost the container its start
                if is_link:
                    os.symlink(os.readlink(source), target)
                    continue
                if is_dir:
                    os.mkdir(target, 0o755)
                else:
                    os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o600))
                _mount(source, target, None, MS_BIND | MS_REC)
    finally:
        os.close(host)


def _bind_termination_log(security: dict[str, Any], fresh_dev: bool) -> None:
    """The container's own message file (in its state directory) bound at its
    terminationMessagePath. The mount point is made only in the container's own /dev (a tmpfs of
    its mount view): elsewhere the host's file system is shared, so a path that does not exist
    there is left alone rather than created on the host."""
    fd = security.get("termination_log_fd")
    target = (security.get("termination_log") or (None, None))[1]
    if fd is None or not target or not os.path.isabs(target):
        return
    in_own_dev = fresh_dev and target.startswith("/dev/") and ".." not in target.split("/")
    if in_own_dev and not os.path.lexists(target):
        with contextlib.suppress(OSError):
            os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
            os.close(os.open(target, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW, 0o666))
    if os.path.isfile(target) and not os.path.islink(target):
        with contextlib.suppress(OSError):
            _mount(f"/proc/self/fd/{fd}", target, None, MS_BIND)
            _remount(target, MS_NOSUID | MS_NODEV | MS_NOEXEC)
    with contextlib.suppress(OSError):
        os.close(fd)


def _outside(point: str, hidden: tuple[str, ...]) -> bool:
    return not (point == "/dev" or point.startswith(("/dev/", *hidden)))


def all_nodev(security: dict[str, Any]) -> bool:
    """Whether every mount the container sees, but its own /dev, is nodev: a device node it
    makes with CAP_MKNOD then opens nothing."""
    hidden = tuple(p.rstrip("/") + "/" for p in security.get("hidden_paths") or [])
    return all(flags & MS_NODEV for point, flags in _mounts() if _outside(point, hidden))


def setup_mount_view(security: dict[str, Any]) -> None:
    """A private mount namespace for the container."""
    _check(_c().unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing mounted here reaches the host, nor back
    source = (security.get("termination_log") or [None])[0]
    if source:  # held open: the state directory it lives in is about to be hidden
        with contextlib.suppress(OSError):
            security = {**security, "termination_log_fd": os.open(source, os.O_PATH | os.O_CLOEXEC)}
    for path in security.get("hidden_paths") or []:
        with contextlib.suppress(FileNotFoundError):
            _hide(path)
    if security.get("privileged"):
        target = (security.get("termination_log") or (None, None))[1] or ""
        own_dev = target.startswith("/dev/") and not os.path.lexists(target)
        if own_dev:  # the file is to be made: in a /dev of its own, never in the host's
            _host_devices_in_own_dev()
        _bind_termination_log(security, fresh_dev=own_dev)
        return
    hidden = tuple(p.rstrip("/") + "/" for p in security.get("hidden_paths") or [])
    for point, flags in _mounts():
        if not flags & MS_NODEV and _outside(point, hidden):
            with contextlib.suppress(OSError):  # all_nodev tells whether any is left
                _remount(point, flags | MS_NODEV)
    for path in READONLY_PATHS:
        if os.path.exists(path):
            _bind_readonly(path)
    for path in MASKED_PATHS:
        with contextlib.suppress(OSError):
            _hide(path)
    _bind_readonly("/sys")
    _fresh_dev(security)


def enter_mount_namespace(fd: int) -> None:
    _check(_c().setns(fd, CLONE_NEWNS), "setns(mount namespace)")


def _load_seccomp(program: bytes) -> None:
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    _check(_c().prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog), 0, 0), "seccomp")


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 40


def _capset(mask: int) -> None:
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)(_CapData(mask & 0xFFFFFFFF, mask & 0xFFFFFFFF, 0), _CapData(mask >> 32, mask >> 32, 0))
    _check(_c().capset(ctypes.byref(header), data), "capset")


def drop_privileges(security: dict[str, Any], seccomp: bytes | None, nodev: bool = True) -> None:
    """Steps 2 to 5 of the module's order, in the child, as root, before exec."""
    nnp = bool(security.get("no_new_privs"))
    if seccomp and not nnp:
        _load_seccomp(seccomp)
    caps = set(security.get("capabilities") or [])
    if not nodev:  # a device node made on a visible mount would open: no mknod at all then
        caps.discard(CAP_MKNOD)
    last = _last_cap()
    mask = sum(1 << c for c in caps if c <= last)
    for cap in range(last + 1):
        if cap not in caps:
            _prctl(PR_CAPBSET_DROP, cap)
    with contextlib.suppress(OSError):  # kernels before 4.3 have no ambient set
        _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    uid, gid = security["uid"], security["gid"]
    os.setgroups(list(security.get("groups") or []))
    os.setgid(gid)
    if uid == 0:
        _capset(mask & _permitted())  # what execve leaves root with (the bounding set); inheritable none
    else:
        _capset(0xFFFFFFFFFFFFFFFF & ((1 << (last + 1)) - 1) & _permitted())  # inheritable cleared first
        os.setuid(uid)  # without PR_SET_KEEPCAPS: permitted and effective are now empty
    if nnp:
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        if seccomp:
            _load_seccomp(seccomp)


def _permitted() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapPrm:"):
                return int(line.split()[1], 16)
    return 0


def confine(security: dict[str, Any] | None, seccomp: bytes | None, mount_ns_fd: int | None = None) -> None:
    """Everything above, in order. `mount_ns_fd`: exec joins the container's mount namespace
    instead of making one."""
    if not security:
        return
    if mount_ns_fd is not None:
        enter_mount_namespace(mount_ns_fd)
    elif security.get("mount_view"):
        setup_mount_view(security)
    drop_privileges(security, seccomp, bool(security.get("privileged")) or all_nodev(security))

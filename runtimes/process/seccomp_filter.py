"""Seccomp profiles (the OCI `linux.seccomp` format, as runtimes/oci/seccomp.py builds them and as
Localhost profile files hold them) compiled to a classic BPF program with libseccomp.

The process backend has no OCI runtime to do this: the agent compiles a container's profile once,
with libseccomp (libseccomp.so.2, which runc, crun and systemd depend on) through ctypes, and the
container's child process loads the raw program with prctl(PR_SET_SECCOMP) just before exec
(runtimes/process/confine.py). Only the native architecture is allowed: a syscall made through
another ABI (int 0x80 on x86_64) kills the process, so it cannot slip past a rule.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Mapping
from typing import Any

EPERM = 1

_ACTIONS = {
    "SCMP_ACT_KILL": 0x00000000,
    "SCMP_ACT_KILL_THREAD": 0x00000000,
    "SCMP_ACT_KILL_PROCESS": 0x80000000,
    "SCMP_ACT_TRAP": 0x00030000,
    "SCMP_ACT_LOG": 0x7FFC0000,
    "SCMP_ACT_ALLOW": 0x7FFF0000,
}
_OPS = {
    "SCMP_CMP_NE": 1,
    "SCMP_CMP_LT": 2,
    "SCMP_CMP_LE": 3,
    "SCMP_CMP_EQ": 4,
    "SCMP_CMP_GE": 5,
    "SCMP_CMP_GT": 6,
    "SCMP_CMP_MASKED_EQ": 7,
}
_NR_SCMP_ERROR = -1


class SeccompError(Exception):
    """The profile cannot be compiled here; the message says why."""


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


_lib: Any = None


def _libseccomp() -> Any:
    global _lib
    if _lib is None:
        name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError as exc:
            raise SeccompError(f"libseccomp is not installed on this node ({exc}); install libseccomp2") from exc
        lib.seccomp_init.restype = ctypes.c_void_p
        lib.seccomp_init.argtypes = [ctypes.c_uint32]
        lib.seccomp_release.argtypes = [ctypes.c_void_p]
        lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_rule_add_array.argtypes = [
            ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(_ArgCmp),
        ]  # fmt: skip
        lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
        _lib = lib
    return _lib


def available() -> bool:
    try:
        _libseccomp()
    except SeccompError:
        return False
    return True


def _action(name: str, errno_ret: int | None) -> int:
    if name == "SCMP_ACT_ERRNO":
        return 0x00050000 | ((EPERM if errno_ret is None else errno_ret) & 0xFFFF)
    if name == "SCMP_ACT_TRACE":
        return 0x7FF00000 | ((EPERM if errno_ret is None else errno_ret) & 0xFFFF)
    if name not in _ACTIONS:
        raise SeccompError(f"unknown seccomp action {name!r}")
    return _ACTIONS[name]


def compile_profile(profile: Mapping[str, Any]) -> bytes:
    """The BPF program (struct sock_filter[]) of an OCI seccomp profile, for this machine's
    architecture. Syscall names this kernel's architecture does not have are skipped, as runc does."""
    lib = _libseccomp()
    default = _action(profile.get("defaultAction") or "SCMP_ACT_ALLOW", profile.get("defaultErrnoRet"))
    ctx = lib.seccomp_init(default)
    if not ctx:
        raise SeccompError(f"seccomp_init failed for default action {profile.get('defaultAction')!r}")
    try:
        for rule in profile.get("syscalls") or []:
            action = _action(rule.get("action") or "", rule.get("errnoRet"))
            if action == default:
                continue  # libseccomp refuses rules that repeat the default action
            args = rule.get("args") or []
            try:
                cmps = (_ArgCmp * max(len(args), 1))(*(
                    _ArgCmp(int(a["index"]), _OPS[a["op"]], int(a.get("value", 0)), int(a.get("valueTwo", 0)))
                    for a in args
                ))  # fmt: skip
            except (KeyError, TypeError, ValueError) as exc:
                raise SeccompError(f"seccomp rule {rule.get('names')}: bad argument condition {args!r}") from exc
            for name in rule.get("names") or ([rule["name"]] if rule.get("name") else []):
                nr = lib.seccomp_syscall_resolve_name(name.encode())
                if nr == _NR_SCMP_ERROR:
                    continue
                rc = lib.seccomp_rule_add_array(ctx, action, nr, len(args), cmps)
                if rc < 0:
                    raise SeccompError(f"seccomp rule for {name}: {os.strerror(-rc)}")
        fd = os.memfd_create("seccomp-bpf")  # a pipe could fill up before it is read
        try:
            rc = lib.seccomp_export_bpf(ctx, fd)
            if rc < 0:
                raise SeccompError(f"seccomp_export_bpf: {os.strerror(-rc)}")
            os.lseek(fd, 0, os.SEEK_SET)
            chunks = []
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
        finally:
            os.close(fd)
        program = b"".join(chunks)
        if not program or len(program) % 8:
            raise SeccompError("libseccomp produced no BPF program")
        return program
    finally:
        lib.seccomp_release(ctx)

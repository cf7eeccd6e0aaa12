"""Seccomp for `securityContext.seccompProfile` (container over Pod): Unconfined (the kubelet's
default), Localhost (a profile file from the node's seccomp directory) and RuntimeDefault.

RuntimeDefault here is a deny list, not the allow list containerd ships: every syscall is
allowed except those that reach past the container (kernel modules, kexec, the kernel keyring,
reboot, clocks, namespaces and mounts, tracing other processes...). As in the usual runtime
profiles, a syscall whose capability the container was given (CAP_SYS_ADMIN for mount, say)
stays allowed. Denied calls fail with EPERM.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

EPERM = 1
ENOSYS = 38
# CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET
CLONE_NAMESPACE_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)

# Denied whatever the capabilities: no container may use these.
ALWAYS_DENIED = (
    "kexec_load", "kexec_file_load", "open_by_handle_at", "add_key", "request_key", "keyctl", "uselib",
    "lookup_dcookie", "nfsservctl", "vm86", "vm86old", "create_module", "get_kernel_syms", "query_module",
    "_sysctl", "userfaultfd",
)  # fmt: skip

# Denied unless the container holds the capability.
DENIED_WITHOUT = {
    "CAP_SYS_ADMIN": (
        "mount",
        "umount",
        "umount2",
        "unshare",
        "setns",
        "pivot_root",
        "swapon",
        "swapoff",
        "quotactl",
        "quotactl_fd",
        "bpf",
        "fanotify_init",
        "name_to_handle_at",
        "fsopen",
        "fsconfig",
        "fsmount",
        "fspick",
        "move_mount",
        "open_tree",
        "mount_setattr",
        "perf_event_open",
        "lookup_dcookie",
        "clone3",
    ),
    "CAP_SYS_MODULE": ("init_module", "finit_module", "delete_module"),
    "CAP_SYS_BOOT": ("reboot",),
    "CAP_SYS_TIME": ("settimeofday", "stime", "clock_settime", "clock_settime64", "clock_adjtime", "adjtimex"),
    "CAP_SYS_PTRACE": ("ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd"),
    "CAP_SYS_PACCT": ("acct",),
    "CAP_SYS_RAWIO": ("iopl", "ioperm"),
    "CAP_SYSLOG": ("syslog",),
}


def runtime_default(capabilities: Sequence[str]) -> dict[str, Any]:
    """The OCI `linux.seccomp` object of RuntimeDefault for a container with these capabilities."""
    held = set(capabilities)
    names = list(ALWAYS_DENIED)
    for capability, calls in DENIED_WITHOUT.items():
        if capability not in held:
            names += [c for c in calls if c not in names]
    denied = [n for n in names if n != "clone3"]
    syscalls: list[dict[str, Any]] = [{"names": denied, "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM}]
    if "CAP_SYS_ADMIN" not in held:
        # clone3 hides its flags in memory seccomp cannot read: ENOSYS makes libc fall back to
        # clone, whose flags are checked; one rule per namespace flag (separate rules are OR'ed).
        syscalls.append({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS})
        for flag in CLONE_NAMESPACE_FLAGS:
            syscalls.append({
                "names": ["clone"], "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM,
                "args": [{"index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}],
            })  # fmt: skip
    return {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": syscalls}


def profile_type(pod_security: Mapping[str, Any], container_security: Mapping[str, Any]) -> tuple[str, str]:
    """(type, localhostProfile) of the effective seccompProfile; ("Unconfined", "") when unset."""
    profile = container_security.get("seccompProfile") or pod_security.get("seccompProfile") or {}
    return profile.get("type") or "Unconfined", profile.get("localhostProfile") or ""

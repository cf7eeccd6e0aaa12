"""The OCI runtime spec (config.json) of one Kubernetes container: pure functions, no I/O.

Everything the backend read from disk or the API (the image config, the rootfs's /etc/passwd and
/etc/group, the container's environment, where each volume lives on the host, the Pod's namespace
paths) comes in as arguments, so every rule here is unit-tested without runc or root.

Rules follow what the kubelet and containerd's CRI plugin produce (facts, not their code):
command/args against the image's Entrypoint/Cmd, env merge, user resolution, default
capabilities, runc's default masked and read-only paths.
"""

from __future__ import annotations

import os
import posixpath
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cgroups.quantity import parse_quantity
from cgroups.resources import BEST_EFFORT, GUARANTEED, ResourceConfig, qos_class
from runtimes.base import CreateContainerConfigError
from runtimes.container_env import expand
from runtimes.oci.seccomp import profile_type, runtime_default

JSON = dict[str, Any]

OCI_VERSION = "1.0.2"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# containerd's default capability set for CRI containers.
DEFAULT_CAPABILITIES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW", "CAP_SETGID",
    "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL",
    "CAP_AUDIT_WRITE",
)  # fmt: skip

# Linux capabilities 0..40 in kernel order (CAP_CHECKPOINT_RESTORE is the last runc 1.1 knows).
ALL_CAPABILITIES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_SETGID",
    "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
)  # fmt: skip

# runc's defaults for unprivileged containers (`runc spec`).
MASKED_PATHS = (
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
    "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
)  # fmt: skip
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")


# --- inputs ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostVolume:
    """Where a Pod volume lives on the host (a directory or file), bind-mounted into containers.
    Shared by the Pod's containers: a Memory emptyDir is a tmpfs the backend mounts on the host."""

    source: str
    read_only: bool = False  # forced for configMap, secret and downwardAPI volumes, as the kubelet does


@dataclass(frozen=True)
class PodNamespaces:
    """Namespace files of the Pod sandbox that its containers join; None: not shared that way."""

    network: str | None = None
    ipc: str | None = None
    uts: str | None = None
    pid: str | None = None  # joined only with shareProcessNamespace
    # An ephemeral container's target (targetContainerName): that container's pid namespace,
    # joined when the Pod shares none (the kubelet's NamespaceMode_TARGET).
    target_pid: str | None = None


@dataclass(frozen=True)
class SpecInput:
    pod: JSON
    container: JSON
    image_config: Mapping[str, Any]  # the OCI image config's "config" object: Entrypoint, Cmd, Env, ...
    env: Sequence[tuple[str, str]]  # the container's own environment (runtimes/container_env.py)
    rootfs: str
    hostname: str
    cgroups_path: str
    resources: ResourceConfig
    namespaces: PodNamespaces
    volumes: Mapping[str, HostVolume]  # Pod volume name -> host side
    etc_files: Mapping[str, str]  # "/etc/hosts", "/etc/hostname", "/etc/resolv.conf" -> host file
    shm_path: str | None = None  # the Pod's shared /dev/shm (a host tmpfs); None: a tmpfs per container
    node_memory: int | None = None  # the node's memory capacity in bytes, for Burstable oom_score_adj
    # The lowest oom_score_adj this host lets the runtime set: without CAP_SYS_RESOURCE (user
    # namespaces, some VMs) a process cannot go below its own, so asking more fails `runc create`.
    oom_score_adj_floor: int = -1000
    localhost_seccomp: Mapping[str, Any] | None = None  # the Localhost profile, read by the backend
    termination_log: str | None = None  # host file bound at terminationMessagePath (/dev/termination-log)
    passwd: str | None = None  # the rootfs's /etc/passwd text, for user names in the image's User
    group: str | None = None  # the rootfs's /etc/group text
    allow_privileged: bool = False
    allow_host_path: bool = False
    handler_name: str = ""
    annotations: Mapping[str, str] = field(default_factory=dict)


def _where(inp: SpecInput) -> str:
    meta = inp.pod.get("metadata", {})
    return f"pod {meta.get('namespace')}/{meta.get('name')} container {inp.container.get('name')}"


# --- process ---------------------------------------------------------------------------------------


def process_args(container: Mapping[str, Any], image_config: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
    """Kubernetes' rules: `command` replaces Entrypoint and drops Cmd; `args` alone replace Cmd.
    $(VAR) in command/args expands from the container's environment."""
    command = container.get("command") or []
    args = container.get("args") or []
    entrypoint = list(image_config.get("Entrypoint") or [])
    cmd = list(image_config.get("Cmd") or [])
    if command:
        argv = [expand(c, env) for c in command] + [expand(a, env) for a in args]
    elif args:
        argv = entrypoint + [expand(a, env) for a in args]
    else:
        argv = entrypoint + cmd
    return argv


def merge_env(
    image_env: Sequence[str], container_env: Sequence[tuple[str, str]], hostname: str, tty: bool = False
) -> list[str]:
    """KEY=VALUE list: PATH default, HOSTNAME, then the image's Env, then the container's (it wins);
    a `tty: true` container gets TERM=xterm unless one of those sets TERM (containerd's WithTTY)."""
    merged: dict[str, str] = {"PATH": DEFAULT_PATH, "HOSTNAME": hostname}
    for item in image_env:
        key, sep, value = item.partition("=")
        if key:
            merged[key] = value if sep else ""
    for key, value in container_env:
        merged[key] = value
    if tty:
        merged.setdefault("TERM", "xterm")
    return [f"{k}={v}" for k, v in merged.items()]


def _parse_db(text: str | None) -> list[list[str]]:
    return [line.split(":") for line in (text or "").splitlines() if line and not line.startswith("#")]


def _lookup_user(name: str, passwd: str | None) -> tuple[int, int] | None:
    for fields in _parse_db(passwd):
        if len(fields) >= 4 and fields[0] == name and fields[2].isdigit() and fields[3].isdigit():
            return int(fields[2]), int(fields[3])
    return None


def _user_by_uid(uid: int, passwd: str | None) -> tuple[str, int] | None:
    for fields in _parse_db(passwd):
        if len(fields) >= 4 and fields[2] == str(uid) and fields[3].isdigit():
            return fields[0], int(fields[3])
    return None


def _lookup_group(name: str, group: str | None) -> int | None:
    for fields in _parse_db(group):
        if len(fields) >= 3 and fields[0] == name and fields[2].isdigit():
            return int(fields[2])
    return None


def _member_groups(user: str, group: str | None) -> list[int]:
    return [
        int(fields[2])
        for fields in _parse_db(group)
        if len(fields) >= 4 and fields[2].isdigit() and user in fields[3].split(",")
    ]


def resolve_user(inp: SpecInput) -> JSON:
    """The OCI `process.user`: securityContext runAsUser/runAsGroup (container over pod), else the
    image's User ("uid", "uid:gid", "name", "name:group", names looked up in the rootfs), plus the
    groups /etc/group lists for the user, supplementalGroups and fsGroup."""
    pod_sc = inp.pod.get("spec", {}).get("securityContext") or {}
    sc = {**pod_sc, **(inp.container.get("securityContext") or {})}
    image_user = str(inp.image_config.get("User") or "")
    uid: int | None = sc.get("runAsUser")
    gid: int | None = sc.get("runAsGroup")
    if uid is None and image_user:
        user_part, _, group_part = image_user.partition(":")
        if user_part.isdigit():
            uid = int(user_part)
        else:
            if sc.get("runAsNonRoot"):
                raise CreateContainerConfigError(
                    f"{_where(inp)}: container has runAsNonRoot and image has non-numeric user ({user_part}), "
                    "cannot verify user is non-root; set securityContext.runAsUser"
                )
            found = _lookup_user(user_part, inp.passwd)
            if found is None:
                raise CreateContainerConfigError(
                    f"{_where(inp)}: the image's user {user_part!r} is not in the image's /etc/passwd; "
                    "set securityContext.runAsUser"
                )
            uid, primary = found
            gid = primary if gid is None else gid
        if group_part and sc.get("runAsGroup") is None:
            if group_part.isdigit():
                gid = int(group_part)
            else:
                found_gid = _lookup_group(group_part, inp.group)
                if found_gid is None:
                    raise CreateContainerConfigError(
                        f"{_where(inp)}: the image's group {group_part!r} is not in the image's /etc/group; "
                        "set securityContext.runAsGroup"
                    )
                gid = found_gid
    uid = uid or 0
    if sc.get("runAsNonRoot") and uid == 0:
        raise CreateContainerConfigError(
            f"{_where(inp)}: container has runAsNonRoot and image will run as root; set securityContext.runAsUser"
        )
    by_uid = _user_by_uid(uid, inp.passwd)
    if gid is None:
        gid = by_uid[1] if by_uid else 0
    extra: list[int] = _member_groups(by_uid[0], inp.group) if by_uid else []
    extra += [int(g) for g in pod_sc.get("supplementalGroups") or []]
    if pod_sc.get("fsGroup") is not None:
        extra.append(int(pod_sc["fsGroup"]))
    user: JSON = {"uid": uid, "gid": gid}
    additional = sorted({g for g in extra if g != gid})
    if additional:
        user["additionalGids"] = additional
    return user


def _cap_name(name: str) -> str:
    name = name.upper()
    return name if name.startswith("CAP_") else f"CAP_{name}"


_HOST_DEV_MOUNTS = ("/dev/pts", "/dev/shm", "/dev/mqueue", "/dev/hugepages")  # the container has its own


def host_devices(root: str = "/dev") -> list[JSON]:
    """Every character and block device node under the host's /dev, as containerd's
    WithHostDevices gives a privileged container: the runtime makes them in the container's own
    /dev, so a file the spec binds there (the termination log) is never made in the host's /dev."""
    found: list[JSON] = []
    for top, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if os.path.join(top, d) not in _HOST_DEV_MOUNTS]
        for name in files:
            path = os.path.join(top, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue  # gone meanwhile
            kind = "c" if stat.S_ISCHR(st.st_mode) else "b" if stat.S_ISBLK(st.st_mode) else None
            if kind:
                found.append({"path": path, "type": kind, "major": os.major(st.st_rdev), "minor": os.minor(st.st_rdev),
                              "fileMode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid})  # fmt: skip
    return found


def host_capabilities(status: str | None = None) -> list[str]:
    """The capabilities this process holds and may hand on: those in both its bounding set (CapBnd)
    and its effective set (CapEff) of /proc/self/status, in kernel order. containerd grants a
    privileged container the runtime's own set (oci.WithAllCurrentCapabilities) rather than every
    capability the kernel knows, so runc never asks for one the host took away ("unable to apply
    caps"). All known capabilities when the status cannot be read."""
    if status is None:
        try:
            with open("/proc/self/status", encoding="ascii") as f:
                status = f.read()
        except OSError:
            return list(ALL_CAPABILITIES)
    masks: dict[str, int] = {}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in ("CapBnd", "CapEff"):
            masks[key] = int(value.strip(), 16)
    if len(masks) != 2:
        return list(ALL_CAPABILITIES)
    held = masks["CapBnd"] & masks["CapEff"]
    return [name for bit, name in enumerate(ALL_CAPABILITIES) if held >> bit & 1]


def capabilities(security_context: Mapping[str, Any], privileged: bool, host: Sequence[str] | None = None) -> list[str]:
    """The default set with securityContext.capabilities applied; "ALL" in add or drop first,
    so add [ALL] + drop [CHOWN] is everything but CHOWN, and drop [ALL] + add [CHOWN] only CHOWN.
    Privileged and "ALL" mean the host's own set (`host`, read from /proc/self/status when None),
    as containerd grants them."""
    if host is None:
        host = host_capabilities()
    if privileged:
        return list(host)
    spec = security_context.get("capabilities") or {}
    add = [_cap_name(c) for c in spec.get("add") or []]
    drop = [_cap_name(c) for c in spec.get("drop") or []]
    caps = list(DEFAULT_CAPABILITIES)
    if "CAP_ALL" in add:
        caps = list(host)
    if "CAP_ALL" in drop:
        caps = []
    for cap in add:
        if cap != "CAP_ALL" and cap not in caps:
            caps.append(cap)
    return [c for c in caps if c not in drop]


def oom_score_adj(pod: Mapping[str, Any], container: Mapping[str, Any], node_memory: int | None) -> int:
    """The kubelet's QoS rule: Guaranteed -997, BestEffort 1000, Burstable 1000 minus the share of
    the node's memory the container requests (per mille), kept within 2..999."""
    qos = qos_class(pod)
    if qos == GUARANTEED:
        return -997
    if qos == BEST_EFFORT:
        return 1000
    requests = (container.get("resources") or {}).get("requests") or {}
    limits = (container.get("resources") or {}).get("limits") or {}
    request = requests.get("memory", limits.get("memory"))
    adj = 1000
    if request is not None and node_memory:
        adj = 1000 - (1000 * int(parse_quantity(request))) // node_memory
    return min(max(adj, 2), 999)


# --- mounts ----------------------------------------------------------------------------------------


def _standard_mounts(inp: SpecInput, privileged: bool) -> list[JSON]:
    sys_options = ["nosuid", "noexec", "nodev"] + ([] if privileged else ["ro"])
    mounts: list[JSON] = [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755",
                                                                                "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": sys_options},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
    ]  # fmt: skip
    if inp.shm_path:
        mounts.append({"destination": "/dev/shm", "type": "bind", "source": inp.shm_path, "options": ["rbind", "rw"]})
    else:
        mounts.append({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                       "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]})  # fmt: skip
    read_only_root = bool((inp.container.get("securityContext") or {}).get("readOnlyRootFilesystem"))
    for destination in ("/etc/hostname", "/etc/hosts", "/etc/resolv.conf"):
        source = inp.etc_files.get(destination)
        if source:
            mode = "ro" if read_only_root else "rw"
            mounts.append({"destination": destination, "type": "bind", "source": source, "options": ["rbind", mode]})
    return mounts


def _volume_mounts(inp: SpecInput) -> list[JSON]:
    """The container's volumeMounts on their host volumes; hostPath only where the handler allows it."""
    pod_volumes = {v.get("name"): v for v in inp.pod.get("spec", {}).get("volumes") or []}
    mounts: list[JSON] = []
    for vm in inp.container.get("volumeMounts") or []:
        name = vm.get("name", "")
        spec = pod_volumes.get(name)
        if spec is None:
            raise CreateContainerConfigError(f"{_where(inp)}: volumeMount {name!r} names no volume of the Pod")
        if "hostPath" in spec and not inp.allow_host_path:
            raise CreateContainerConfigError(
                f"{_where(inp)}: volume {name!r} is a hostPath, which runtime handler {inp.handler_name!r} does not "
                "allow; set allow_host_path = true on the handler or use another volume type"
            )
        host = inp.volumes.get(name)
        if host is None:
            raise CreateContainerConfigError(
                f"{_where(inp)}: volume {name!r} has a type this backend does not support "
                f"({', '.join(k for k in spec if k != 'name')})"
            )
        destination = vm.get("mountPath", "")
        if not destination.startswith("/"):
            raise CreateContainerConfigError(f"{_where(inp)}: volumeMount {name!r}: mountPath must be absolute")
        read_only = bool(vm.get("readOnly")) or host.read_only
        sub_path = vm.get("subPath") or ""
        if sub_path and (sub_path.startswith("/") or ".." in sub_path.split("/")):
            raise CreateContainerConfigError(
                f"{_where(inp)}: volumeMount {name!r}: subPath {sub_path!r} must be relative and not contain '..'"
            )
        source = posixpath.join(host.source, sub_path) if sub_path else host.source
        propagation = {"HostToContainer": "rslave", "Bidirectional": "rshared"}.get(
            vm.get("mountPropagation") or "", "rprivate"
        )
        mounts.append({"destination": destination, "type": "bind", "source": source,
                       "options": ["rbind", propagation, "ro" if read_only else "rw"]})  # fmt: skip
    return mounts


# --- namespaces ------------------------------------------------------------------------------------


def namespaces(pod: Mapping[str, Any], ns: PodNamespaces) -> list[JSON]:
    """Each container gets its own mount namespace and (unless shareProcessNamespace) its own pid
    namespace, or its target's for an ephemeral container; network, IPC and UTS are the Pod's, or
    the host's with hostNetwork/hostIPC/hostPID."""
    spec = pod.get("spec", {})
    out: list[JSON] = [{"type": "mount"}]
    if not spec.get("hostPID"):
        if spec.get("shareProcessNamespace") and ns.pid:
            out.append({"type": "pid", "path": ns.pid})
        elif ns.target_pid:
            out.append({"type": "pid", "path": ns.target_pid})
        else:
            out.append({"type": "pid"})
    if not spec.get("hostIPC"):
        out.append({"type": "ipc", "path": ns.ipc} if ns.ipc else {"type": "ipc"})
    if not spec.get("hostNetwork"):
        out.append({"type": "network", "path": ns.network} if ns.network else {"type": "network"})
        out.append({"type": "uts", "path": ns.uts} if ns.uts else {"type": "uts"})
    return out


# --- resources -------------------------------------------------------------------------------------


def linux_resources(config: ResourceConfig, privileged: bool) -> JSON:
    resources: JSON = {"devices": [{"allow": privileged, "access": "rwm"}]}
    cpu: JSON = {}
    if config.cpu_shares is not None:
        cpu["shares"] = config.cpu_shares
    if config.cpu_quota is not None:
        cpu["quota"] = config.cpu_quota
        cpu["period"] = config.cpu_period or 100000
    if cpu:
        resources["cpu"] = cpu
    if config.memory_limit is not None:
        # swap = limit: memory+swap capped at the limit, i.e. no swap, as the kubelet runs containers.
        resources["memory"] = {"limit": config.memory_limit, "swap": config.memory_limit}
    if config.pids_limit is not None:
        resources["pids"] = {"limit": config.pids_limit}
    return resources


def update_resources(config: ResourceConfig) -> JSON:
    """The `<runtime> update --resources` input for an in-place resize: cpu and memory only (an
    absent field is left as it is, so an unset limit is written as -1, unlimited)."""
    cpu: JSON = {"quota": -1 if config.cpu_quota is None else config.cpu_quota, "period": config.cpu_period or 100000}
    if config.cpu_shares is not None:
        cpu["shares"] = config.cpu_shares
    limit = -1 if config.memory_limit is None else config.memory_limit
    return {"cpu": cpu, "memory": {"limit": limit, "swap": limit}}  # swap = limit: no swap, as at create


def _seccomp(inp: SpecInput, caps: list[str]) -> JSON | None:
    kind, localhost = profile_type(inp.pod.get("spec", {}).get("securityContext") or {},
                                   inp.container.get("securityContext") or {})  # fmt: skip
    if kind == "RuntimeDefault":
        return runtime_default(caps)
    if kind == "Localhost":
        if inp.localhost_seccomp is None:
            raise CreateContainerConfigError(
                f"{_where(inp)}: seccomp profile {localhost!r} (Localhost) is not on this node"
            )
        return dict(inp.localhost_seccomp)
    if kind != "Unconfined":
        raise CreateContainerConfigError(f"{_where(inp)}: unknown seccompProfile type {kind!r}")
    return None


# --- the spec --------------------------------------------------------------------------------------


def build_spec(inp: SpecInput) -> JSON:
    """The config.json of one container. Raises CreateContainerConfigError for what the Pod may
    not do on this handler (privileged, hostPath) or what cannot be resolved (an unknown user)."""
    container = inp.container
    pod_spec = inp.pod.get("spec", {})
    sc = container.get("securityContext") or {}
    privileged = bool(sc.get("privileged"))
    if privileged and not inp.allow_privileged:
        raise CreateContainerConfigError(
            f"{_where(inp)}: privileged containers are not allowed on runtime handler {inp.handler_name!r}; "
            "set allow_privileged = true on the handler or drop securityContext.privileged"
        )
    env = dict(inp.env)
    argv = process_args(container, inp.image_config, env)
    if not argv:
        raise CreateContainerConfigError(
            f"{_where(inp)}: no command to run: the image has neither Entrypoint nor Cmd and the container "
            "sets no command"
        )
    caps = capabilities(sc, privileged)
    process: JSON = {
        # The shim owns the container's stdio: pipes, or with `tty: true` the terminal's master.
        "terminal": bool(container.get("tty")),
        "user": resolve_user(inp),
        "args": argv,
        "env": merge_env(inp.image_config.get("Env") or [], inp.env, inp.hostname, bool(container.get("tty"))),
        "cwd": container.get("workingDir") or inp.image_config.get("WorkingDir") or "/",
        "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
        "noNewPrivileges": sc.get("allowPrivilegeEscalation") is False,
        "oomScoreAdj": max(oom_score_adj(inp.pod, container, inp.node_memory), inp.oom_score_adj_floor),
    }
    mounts = _standard_mounts(inp, privileged) + _volume_mounts(inp)
    if inp.termination_log:
        destination = container.get("terminationMessagePath") or "/dev/termination-log"
        mounts.append({"destination": destination, "type": "bind", "source": inp.termination_log,
                       "options": ["rbind", "rw"]})  # fmt: skip
    linux: JSON = {
        "cgroupsPath": inp.cgroups_path,
        "namespaces": namespaces(inp.pod, inp.namespaces),
        "resources": linux_resources(inp.resources, privileged),
    }
    if privileged:  # the host's devices in a /dev of its own (never a bind of the host's /dev)
        linux["devices"] = host_devices()
    if not privileged:
        linux["maskedPaths"] = list(MASKED_PATHS)
        linux["readonlyPaths"] = list(READONLY_PATHS)
        seccomp = _seccomp(inp, caps)
        if seccomp is not None:
            linux["seccomp"] = seccomp
    sysctls = {s["name"]: str(s.get("value", "")) for s in (pod_spec.get("securityContext") or {}).get("sysctls") or []}
    if sysctls:
        linux["sysctl"] = sysctls
    spec: JSON = {
        "ociVersion": OCI_VERSION,
        "process": process,
        "root": {"path": inp.rootfs, "readonly": bool(sc.get("readOnlyRootFilesystem"))},
        "mounts": mounts,
        "linux": linux,
        "annotations": dict(inp.annotations),
    }
    if not pod_spec.get("hostNetwork"):
        spec["hostname"] = inp.hostname
    return spec


# --- files the Pod's containers share: /etc/hosts, /etc/hostname, /etc/resolv.conf ------------------


def pod_hostname(pod: Mapping[str, Any]) -> str:
    """spec.hostname, else the Pod name, cut to 63 characters as the kubelet does."""
    name = pod.get("spec", {}).get("hostname") or pod.get("metadata", {}).get("name", "")
    return name[:63].rstrip("-.")


def hosts_file(pod: Mapping[str, Any], pod_ips: Sequence[str], hostname: str) -> str:
    """The kubelet's managed /etc/hosts for a Pod with its own network."""
    lines = [
        "# Kubernetes-managed hosts file.",
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        "fe00::0\tip6-localnet",
        "fe00::0\tip6-mcastprefix",
        "fe00::1\tip6-allnodes",
        "fe00::2\tip6-allrouters",
    ]
    # With no pod IP (a loopback-only sandbox) the hostname still resolves, Debian-style.
    for ip in pod_ips or ["127.0.1.1"]:
        lines.append(f"{ip}\t{hostname}")
    aliases = pod.get("spec", {}).get("hostAliases") or []
    if aliases:
        lines.append("")
        lines.append("# Entries added by HostAliases.")
        for alias in aliases:
            lines.append(f"{alias.get('ip')}\t" + "\t".join(alias.get("hostnames") or []))
    return "\n".join(lines) + "\n"


def _parse_resolv(text: str) -> tuple[list[str], list[str], list[str]]:
    servers: list[str] = []
    searches: list[str] = []
    options: list[str] = []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if fields[0] == "nameserver" and len(fields) > 1:
            servers.append(fields[1])
        elif fields[0] in ("search", "domain"):
            searches = fields[1:]  # the last one wins, as in the resolver
        elif fields[0] == "options":
            options.extend(fields[1:])
    return servers, searches, options


def resolv_conf(pod: Mapping[str, Any], host_resolv: str) -> str:
    """The Pod's resolv.conf: the host's (dnsPolicy Default, and ClusterFirst while this node has no
    cluster DNS), or only dnsConfig (dnsPolicy None), with spec.dnsConfig merged in."""
    spec = pod.get("spec", {})
    dns = spec.get("dnsConfig") or {}
    if spec.get("dnsPolicy") == "None":
        servers, searches, options = [], [], []
    else:
        servers, searches, options = _parse_resolv(host_resolv)
    servers = list(dict.fromkeys(servers + list(dns.get("nameservers") or [])))[:3]
    searches = list(dict.fromkeys(searches + list(dns.get("searches") or [])))[:32]
    merged: dict[str, str] = {}
    for option in options:
        merged[option.partition(":")[0]] = option
    for option in dns.get("options") or []:
        name = option.get("name", "")
        merged[name] = f"{name}:{option['value']}" if option.get("value") is not None else name
    lines = [f"nameserver {s}" for s in servers]
    if searches:
        lines.append("search " + " ".join(searches))
    if merged:
        lines.append("options " + " ".join(merged.values()))
    return "\n".join(lines) + "\n"

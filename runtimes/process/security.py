"""A process container's securityContext, resolved at create time into what its child process
enforces before exec (runtimes/process/confine.py), or refused with CreateContainerConfigError.

- user: runAsUser / runAsGroup (container over Pod), else the handler's `default_run_as_user` /
  `default_run_as_group` (65534, nobody/nogroup, by default: never root unless asked for). With
  runAsUser and no runAsGroup the group is the user's primary group in this host's /etc/passwd
  (the host is the image here), else the default group. Supplementary groups are exactly
  `supplementalGroups` and `fsGroup` (the Strict policy: the host's /etc/group memberships of the
  uid are not merged in).
- runAsNonRoot: the kubelet's checks and wording (verifyRunAsNonRoot).
- capabilities: containerd's default set, `drop` then `add` ("ALL" too), the bounding set of the
  process; root keeps them as permitted/effective, a non-root user has none after exec (Linux
  rules, no ambient set: what the kubelet and runc give). `privileged`: every capability, no
  seccomp, and only on a handler with `allow_privileged = true`.
- no_new_privs: set unless allowPrivilegeEscalation is true, or the container is privileged or
  adds CAP_SYS_ADMIN (stricter than runc, which sets it only for `false`: a process container
  runs the host's own set-user-ID binaries).
- seccompProfile: RuntimeDefault (runtimes/oci/seccomp.py's profile) and Localhost (a file under
  the handler option `seccomp_dir`, default /var/lib/kubelet/seccomp), compiled to BPF here.
- hostPath volumes (the container sees the host's files anyway) only with `allow_host_path = true`.
- a private mount view hiding `hidden_paths`: the agent's state directory, the node's credentials.
"""

from __future__ import annotations

import base64
import json
import pwd
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from runtimes.base import CreateContainerConfigError
from runtimes.oci.seccomp import profile_type, runtime_default
from runtimes.oci.spec import ALL_CAPABILITIES, capabilities
from runtimes.process.seccomp_filter import SeccompError, compile_profile

JSON = dict[str, Any]
DEFAULT_RUN_AS_USER = 65534  # nobody
DEFAULT_RUN_AS_GROUP = 65534  # nogroup
DEFAULT_SECCOMP_DIR = "/var/lib/kubelet/seccomp"
# Always hidden from process containers when they exist: node credentials of kubeadm-style and
# kubelet-emu nodes.
NODE_SECRET_PATHS = ("/etc/kubernetes", "/var/lib/kubelet", "/var/lib/kubelet-emu")


def _kubelet_pod_name(pod: Mapping[str, Any]) -> str:
    """The kubelet's format.Pod: name_namespace(uid), which its messages quote."""
    meta = pod.get("metadata", {})
    return f"{meta.get('name')}_{meta.get('namespace')}({meta.get('uid')})"


def _where(pod: Mapping[str, Any], container: Mapping[str, Any]) -> str:
    meta = pod.get("metadata", {})
    return f"pod {meta.get('namespace')}/{meta.get('name')} container {container.get('name')}"


def _primary_group(uid: int) -> int | None:
    try:
        return pwd.getpwuid(uid).pw_gid
    except KeyError:
        return None


def verify_run_as_non_root(
    pod: Mapping[str, Any], container: Mapping[str, Any], sc: Mapping[str, Any], uid: int
) -> None:
    """The kubelet's verifyRunAsNonRoot: `uid` is what runs when runAsUser is not set (the
    handler's default user standing in for the image's)."""
    if not sc.get("runAsNonRoot"):
        return
    who = f'(pod: "{_kubelet_pod_name(pod)}", container: {container.get("name")})'
    if sc.get("runAsUser") is not None:
        if sc["runAsUser"] == 0:
            raise CreateContainerConfigError(f"container's runAsUser breaks non-root policy {who}")
        return
    if uid == 0:
        raise CreateContainerConfigError(f"container has runAsNonRoot and image will run as root {who}")


def _check_host_paths(pod: Mapping[str, Any], container: Mapping[str, Any], handler: Any) -> None:
    if getattr(handler, "allow_host_path", False):
        return
    volumes = {v.get("name"): v for v in pod.get("spec", {}).get("volumes") or []}
    for mount in (container.get("volumeMounts") or []) + (container.get("volumeDevices") or []):
        name = mount.get("name", "")
        if "hostPath" in (volumes.get(name) or {}):
            raise CreateContainerConfigError(
                f"{_where(pod, container)}: volume {name!r} is a hostPath, which runtime handler "
                f"{handler.name!r} does not allow; set allow_host_path = true on the handler or use another volume type"
            )


def _localhost_profile(handler: Any, relative: str, where: str) -> JSON:
    base = Path(getattr(handler, "options", {}).get("seccomp_dir", DEFAULT_SECCOMP_DIR))
    path = (base / relative).resolve()
    if not relative or not path.is_relative_to(base.resolve()):
        raise CreateContainerConfigError(f"{where}: localhostProfile {relative!r} must be a path inside {base}")
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CreateContainerConfigError(
            f"{where}: seccomp profile {relative!r} (Localhost) is not on this node"
        ) from None
    except (OSError, ValueError) as exc:
        raise CreateContainerConfigError(f"{where}: cannot read seccomp profile {path}: {exc}") from exc


def _seccomp(pod_sc: Mapping[str, Any], c_sc: Mapping[str, Any], caps: list[str], handler: Any, where: str):
    kind, relative = profile_type(pod_sc, c_sc)
    if kind == "Unconfined":
        return kind, None
    if kind == "RuntimeDefault":
        profile = runtime_default(caps)
    elif kind == "Localhost":
        profile = _localhost_profile(handler, relative, where)
    else:
        raise CreateContainerConfigError(f"{where}: unknown seccompProfile type {kind!r}")
    try:
        return kind, compile_profile(profile)
    except SeccompError as exc:
        raise CreateContainerConfigError(f"{where}: seccomp profile {kind}: {exc}") from exc


def resolve(pod: Mapping[str, Any], container: Mapping[str, Any], handler: Any, hidden_paths: Iterable[str]) -> JSON:
    """The `security` entry of a process container's spec.json. Blocking (reads a Localhost
    profile, compiles BPF): call it in a thread."""
    where = _where(pod, container)
    pod_sc = pod.get("spec", {}).get("securityContext") or {}
    c_sc = container.get("securityContext") or {}
    sc = {**pod_sc, **c_sc}  # the container's own settings win

    privileged = bool(c_sc.get("privileged"))
    if privileged and not getattr(handler, "allow_privileged", False):
        raise CreateContainerConfigError(
            f"{where}: privileged containers are not allowed on runtime handler {handler.name!r}; "
            "set allow_privileged = true on the handler or drop securityContext.privileged"
        )
    _check_host_paths(pod, container, handler)

    default_uid = getattr(handler, "default_run_as_user", DEFAULT_RUN_AS_USER)
    default_gid = getattr(handler, "default_run_as_group", DEFAULT_RUN_AS_GROUP)
    uid = sc.get("runAsUser")
    verify_run_as_non_root(pod, container, sc, default_uid if uid is None else uid)
    if sc.get("runAsGroup") is not None:
        gid = sc["runAsGroup"]
    elif uid is not None:
        primary = _primary_group(uid)
        gid = default_gid if primary is None else primary
    else:
        gid = default_gid
    uid = default_uid if uid is None else uid
    groups = list(pod_sc.get("supplementalGroups") or [])
    if pod_sc.get("fsGroup") is not None:
        groups.append(pod_sc["fsGroup"])
    groups = sorted({int(g) for g in groups if g != gid})

    caps = capabilities(c_sc, privileged)
    numbers = sorted(ALL_CAPABILITIES.index(c) for c in caps if c in ALL_CAPABILITIES)
    escalation = c_sc.get("allowPrivilegeEscalation")
    no_new_privs = escalation is False or (escalation is None and not privileged and "CAP_SYS_ADMIN" not in caps)
    kind, program = (None, None) if privileged else _seccomp(pod_sc, c_sc, caps, handler, where)
    return {
        "uid": int(uid),
        "gid": int(gid),
        "groups": groups,
        "capabilities": numbers,
        "privileged": privileged,
        "no_new_privs": no_new_privs,
        "seccomp": kind or "Unconfined",
        "seccomp_bpf": base64.b64encode(program).decode() if program else None,
        "mount_view": True,
        "hidden_paths": sorted(set(hidden_paths)),
    }


def seccomp_program(security: Mapping[str, Any] | None) -> bytes | None:
    encoded = (security or {}).get("seccomp_bpf")
    return base64.b64decode(encoded) if encoded else None


# Directories that hold files of many kinds: a credential file in one of them is hidden alone.
_SHARED_DIRS = {
    "/", "/etc", "/etc/ssl", "/etc/ssl/certs", "/etc/ssl/private", "/etc/pki", "/etc/pki/tls", "/usr", "/usr/share",
    "/usr/local", "/opt", "/srv", "/tmp", "/var", "/var/tmp", "/var/lib", "/home", "/root", "/run",
}  # fmt: skip


def node_credential_paths(kubeconfig: str | None, files: Iterable[str | None] = ()) -> list[str]:
    """What a process container must not see of the node's credentials: the kubeconfig, the
    files it names (client certificate and key, CA, token file) and `files` (the kubelet API's
    certificate and key), each with its directory unless that is a shared one like /etc."""
    paths: list[str] = []
    named: list[str] = [f for f in files if f]
    if kubeconfig:
        named.append(kubeconfig)
        base = Path(kubeconfig).resolve().parent
        try:
            doc = yaml.safe_load(Path(kubeconfig).read_text()) or {}
        except (OSError, ValueError, yaml.YAMLError):
            doc = {}
        if not isinstance(doc, dict):
            doc = {}
        entries = [e.get("cluster") or {} for e in doc.get("clusters") or [] if isinstance(e, dict)]
        entries += [e.get("user") or {} for e in doc.get("users") or [] if isinstance(e, dict)]
        for entry in entries:
            for key in ("certificate-authority", "client-certificate", "client-key", "tokenFile"):
                if isinstance(entry, dict) and isinstance(entry.get(key), str):
                    named.append(str(base / entry[key]))
    for name in named:
        path = Path(name).resolve()
        paths.append(str(path))
        if str(path.parent) not in _SHARED_DIRS:
            paths.append(str(path.parent))
    return sorted(set(paths))

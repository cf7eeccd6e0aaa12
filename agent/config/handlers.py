"""The [runtimes.NAME] tables, the handlers imported from containerd and CRI-O configs (`import`),
and their validation. A handler itself is runtimes.handler.Handler.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config.tables import ConfigError, _q, _read_toml, _Table
from runtimes.emulated import profile
from runtimes.handler import Handler

DEFAULT_BACKENDS = frozenset({"emulated", "process", "oci"})


# A RuntimeClass handler must be a DNS label, so any other name could never be selected.
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


_HANDLER_KEYS = {
    "backend",
    "runtime_path",
    "runtime_root",
    "runtime_args",
    "allow_host_path",
    "allow_privileged",
    "default_run_as_user",
    "default_run_as_group",
    "features",
    "options",
}


_FEATURE_KEYS = {"user_namespaces", "recursive_read_only_mounts"}


# containerd's CRI plugin id per config version (1.x writes version 2, 2.x writes version 3).
_CONTAINERD_CRI_PLUGIN = {2: "io.containerd.grpc.v1.cri", 3: "io.containerd.cri.v1.runtime"}


_CONTAINERD_DEFAULT_TYPE = "io.containerd.runc.v2"


# Sandboxed shims: their OCI binary is never plain runc, so no PATH fallback for them.
_SANDBOX_SHIM_MARKERS = ("kata", "runsc", "gvisor")


_CRIO_RUNTIME_TYPES = ("oci", "vm", "pod")


@dataclass
class _Candidate:
    """A handler before validation, with what is needed to point at its table when it is wrong."""

    handler: Handler
    table: _Table
    path_key: str = "runtime_path"  # the key runtime_path was read from, for the message
    no_binary: str = 'runtime_path is required for backend "oci"; set it to the runtime binary, e.g. /usr/sbin/runc'
    override: str = ""  # for imports: how to fix it from the agent config instead of another tool's file


# What one import yields: its handlers, the table holding its default, and that default.
_Imported = tuple[list[_Candidate], _Table | None, str | None]


def _id(t: _Table, key: str) -> int:
    """A uid or gid; 65534 (nobody, nogroup) when not set."""
    value = t.int_(key, 65534)
    if not 0 <= value < 2**32 - 1:
        raise t.error(f"{key} must be a uid/gid from 0 to 4294967294, not {value}")
    return value


def _parse_native(t: _Table, name: str, warnings: list[str]) -> _Candidate:
    t.warn_unknown(_HANDLER_KEYS, warnings)
    features = t.table("features")
    features.warn_unknown(_FEATURE_KEYS, warnings)
    path = t.str_("runtime_path") or None
    if path and "/" not in path:  # a bare name means "the one on PATH", as a shell would read it
        path = shutil.which(path) or path
    handler = Handler(
        name=name,
        backend=t.str_("backend") or "",
        runtime_path=path,
        runtime_root=t.str_("runtime_root") or None,
        runtime_args=tuple(t.str_list("runtime_args")),
        allow_host_path=t.bool_("allow_host_path", False),
        allow_privileged=t.bool_("allow_privileged", False),
        default_run_as_user=_id(t, "default_run_as_user"),
        default_run_as_group=_id(t, "default_run_as_group"),
        user_namespaces=features.bool_("user_namespaces", False),
        recursive_read_only_mounts=features.bool_("recursive_read_only_mounts", False),
        options=t.table("options").data,  # free-form for other backends: they check their own
        source=t.file,
    )
    if handler.backend == "emulated":
        _check_emulation_profile(t.table("options"), warnings)
    return _Candidate(handler, t)


def _check_emulation_profile(options: _Table, warnings: list[str]) -> None:
    """An emulated handler's options are its profile (runtimes/emulated/profile.py): checked here,
    so a typo stops the agent at start rather than at the first Pod."""
    options.warn_unknown(set(profile.KEYS), warnings)
    try:
        profile.parse_profile(options.data)
    except profile.ProfileError as exc:
        raise options.error(str(exc)) from None


def _from_containerd(root: _Table, agent_file: str) -> _Imported:
    version = root.data["version"]
    plugin = _CONTAINERD_CRI_PLUGIN.get(version) if isinstance(version, int) else None
    if plugin is None:
        raise root.error(
            f"containerd config version {version!r} is not supported; use version 2 or 3 "
            "(`containerd config migrate` converts older files)"
        )
    cri = root.table("plugins").table(plugin).table("containerd")
    runtimes = cri.table("runtimes")
    found = []
    for name in runtimes.data:
        t = runtimes.table(name)
        runtime_type = t.str_("runtime_type") or _CONTAINERD_DEFAULT_TYPE
        options = t.table("options")
        binary, key = options.str_("BinaryName"), "options.BinaryName"
        if not binary:
            binary, key = t.str_("runtime_path"), "runtime_path"
        if not binary and "runc" in runtime_type and not _is_sandbox(runtime_type):
            binary = shutil.which("runc")
            no_binary = '"runc" is not on PATH and options.BinaryName is not set; set options.BinaryName'
        else:
            no_binary = f"runtime_type {_q(runtime_type)} names no OCI runtime binary; set options.BinaryName"
        override = f" or override it with [runtimes.{name}] runtime_path in {agent_file}"
        handler = Handler(
            name=name,
            backend="oci",
            runtime_path=binary or None,
            runtime_root=options.str_("Root") or None,
            source=root.file,
        )
        found.append(_Candidate(handler, t, key, no_binary + override, override))
    return found, cri, cri.str_("default_runtime_name") or None


def _is_sandbox(runtime_type: str) -> bool:
    return any(marker in runtime_type.lower() for marker in _SANDBOX_SHIM_MARKERS)


def _from_crio(file: str, main: dict[str, Any], agent_file: str) -> _Imported:
    # CRI-O applies X.d/*.conf after X in lexical order; a key set later wins.
    dropins = sorted(str(p) for p in Path(file + ".d").glob("*.conf") if p.is_file())
    merged: dict[str, tuple[dict[str, Any], str, str]] = {}  # name -> (keys, last file, table name)
    default: str | None = None
    default_table: _Table | None = None
    for path in [file, *dropins]:
        contents = main if path == file else _read_toml(path, f"{path}: file not found")
        runtime = _Table(contents, path).table("crio").table("runtime")
        if "default_runtime" in runtime.data:
            default, default_table = runtime.str_("default_runtime") or None, runtime
        runtimes = runtime.table("runtimes")
        for name in runtimes.data:
            earlier = merged.get(name, ({}, path, ""))[0]
            table = runtimes.table(name)
            merged[name] = ({**earlier, **table.data}, path, table.name)
    found = []
    for name, (data, path, table_name) in merged.items():
        t = _Table(data, path, table_name)
        runtime_type = t.str_("runtime_type") or "oci"
        if runtime_type not in _CRIO_RUNTIME_TYPES:
            raise t.error(f"unknown runtime_type {_q(runtime_type)}; CRI-O knows {', '.join(_CRIO_RUNTIME_TYPES)}")
        # Like CRI-O, an empty runtime_path means the handler's name looked up on PATH.
        binary = t.str_("runtime_path") or shutil.which(name)
        override = f" or override it with [runtimes.{name}] runtime_path in {agent_file}"
        no_binary = f"runtime_path is empty and {_q(name)} is not on PATH; set runtime_path{override}"
        handler = Handler(
            name=name,
            backend="oci",
            runtime_path=binary or None,
            runtime_root=t.str_("runtime_root") or None,
            source=path,
        )
        found.append(_Candidate(handler, t, "runtime_path", no_binary, override))
    return found, default_table, default


def _import(file: str, agent: _Table) -> _Imported:
    missing = f"{agent.file}: top level: import {_q(file)}: file not found; fix the path or remove it from import"
    data = _read_toml(file, missing)
    if "crio" in data:
        return _from_crio(file, data, agent.file)
    if "version" in data:
        return _from_containerd(_Table(data, file), agent.file)
    raise ConfigError(
        f"{file}: top level: neither a containerd config (version = 2 or 3) nor a CRI-O config "
        f"([crio] table); fix the import list in {agent.file}"
    )


def _validate(c: _Candidate, known: frozenset[str], check_paths: bool = True) -> None:
    h, t = c.handler, c.table
    if not h.backend:
        raise t.error(f"backend is missing; set backend to one of: {', '.join(sorted(known))}")
    if h.backend not in known:
        raise t.error(f"unknown backend {_q(h.backend)}; use one of: {', '.join(sorted(known))}")
    if h.runtime_path is None:
        if h.backend == "oci" and check_paths:
            raise t.error(c.no_binary)
        return
    if not check_paths:
        return
    path = f"{c.path_key} {_q(h.runtime_path)}"
    if not os.path.isfile(h.runtime_path):
        raise t.error(f"{path} does not exist or is not a file; install the runtime or fix the path{c.override}")
    if not os.access(h.runtime_path, os.X_OK):
        raise t.error(f"{path} is not executable; chmod +x it or point it at the runtime binary{c.override}")

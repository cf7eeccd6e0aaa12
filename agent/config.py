"""The agent's TOML configuration: read it, import handlers from containerd/CRI-O configs, validate.

Everything wrong is reported before the agent starts, as a ConfigError with one line that names the
file, the table, the problem and the fix. Unknown keys are only warnings, so a config written for a
newer agent still starts.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import shutil
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Any

DEFAULT_BACKENDS = frozenset({"emulated", "process", "oci"})
MISSING_HANDLER_POLICIES = ("fail", "retry")
TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")

# A RuntimeClass handler must be a DNS label, so any other name could never be selected.
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")

_TOP_KEYS = {
    "default_runtime",
    "missing_handler",
    "events",
    "import",
    "node",
    "runtimes",
    "network",
    "images",
    "kubelet_api",
}
_NETWORK_KEYS = {"enabled", "pod_cidr", "bridge", "masquerade"}
_IMAGES_KEYS = {"mirrors", "insecure_registries", "gc_high_percent", "gc_low_percent"}
EVENT_POLICIES = ("all", "warnings", "none")
_NODE_KEYS = {
    "labels",
    "taints",
    "max_pods",
    "handler_labels",
    "pod_pids_limit",
    "reserved",
    "cgroup_root",
    "cgroup_driver",
    "container_log_max_size",
    "container_log_max_files",
}
CGROUP_DRIVERS = ("cgroupfs", "systemd")
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
_KUBELET_API_KEYS = {
    "enabled",
    "address",
    "port",
    "tls_cert_file",
    "tls_key_file",
    "client_ca_file",
    "anonymous",
    "authorization_mode",
    "serving_cert",
}
AUTHORIZATION_MODES = ("Webhook", "AlwaysAllow")
SERVING_CERT_SOURCES = ("self-signed", "csr")

# containerd's CRI plugin id per config version (1.x writes version 2, 2.x writes version 3).
_CONTAINERD_CRI_PLUGIN = {2: "io.containerd.grpc.v1.cri", 3: "io.containerd.cri.v1.runtime"}
_CONTAINERD_DEFAULT_TYPE = "io.containerd.runc.v2"
# Sandboxed shims: their OCI binary is never plain runc, so no PATH fallback for them.
_SANDBOX_SHIM_MARKERS = ("kata", "runsc", "gvisor")
_CRIO_RUNTIME_TYPES = ("oci", "vm", "pod")


class ConfigError(Exception):
    """The configuration cannot be used; the message is one line meant for the operator."""

    def __init__(self, message: str) -> None:
        super().__init__(message.replace("\n", " "))  # callers log it as one line


@dataclass(frozen=True)
class Handler:
    name: str
    backend: str
    runtime_path: str | None = None
    runtime_root: str | None = None
    runtime_args: tuple[str, ...] = ()
    allow_host_path: bool = False
    allow_privileged: bool = False
    # process backend: the user and group of containers whose securityContext names none (nobody).
    default_run_as_user: int = 65534
    default_run_as_group: int = 65534
    user_namespaces: bool = False
    recursive_read_only_mounts: bool = False
    # Compared but not hashed (a dict is not hashable). Plain dicts, copied on construction, so
    # dataclasses.asdict, json and deepcopy work (e.g. for /configz); treat them as read-only.
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)
    source: str = ""  # file the table came from ("<built-in>" for the built-in default)

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", dict(self.options))
        object.__setattr__(self, "runtime_args", tuple(self.runtime_args))


@dataclass(frozen=True)
class Taint:
    key: str
    value: str
    effect: str


@dataclass(frozen=True)
class NodeSettings:
    labels: Mapping[str, str] = field(hash=False)
    taints: tuple[Taint, ...]
    max_pods: int = 110
    handler_labels: bool = True
    pod_pids_limit: int = -1
    reserved_cpu_millis: int = 0
    reserved_memory_bytes: int = 0
    cgroup_root: str = "kubepods"  # the Pod cgroups' parent in every hierarchy
    cgroup_driver: str = "cgroupfs"  # "systemd": the kubelet's systemd slice naming
    container_log_max_size: int = 10 * 1024 * 1024
    container_log_max_files: int = 5

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", dict(self.labels))
        object.__setattr__(self, "taints", tuple(self.taints))


@dataclass(frozen=True)
class KubeletAPISettings:
    """[kubelet_api]: the HTTPS server on the kubelet port (logs, pods, health)."""

    enabled: bool = True
    address: str = "0.0.0.0"
    port: int | None = None  # None: 10250, or a free port when 10250 is taken; 0: always a free port
    tls_cert_file: str | None = None  # None: a self-signed certificate kept in the state dir
    tls_key_file: str | None = None
    client_ca_file: str | None = None  # None: the cluster CA from the node kubeconfig
    anonymous: bool = False
    authorization_mode: str = "Webhook"  # "Webhook" (SubjectAccessReview) | "AlwaysAllow"
    serving_cert: str = "self-signed"  # without tls_cert_file: "self-signed" | "csr" (signed by the cluster)


@dataclass(frozen=True)
class NetworkSettings:
    """Pod networking: a bridge on the node, a namespace, veth and IP per Pod."""

    enabled: bool = True
    pod_cidr: str | None = None  # None: the Node's spec.podCIDR, allocated by the controller-manager
    bridge: str | None = None  # None: "emu-" + a hash of the node name (several agents may share a host)
    masquerade: bool = False  # SNAT traffic leaving the node from Pod IPs


@dataclass(frozen=True)
class ImageSettings:
    mirrors: Mapping[str, tuple[str, ...]] = field(default_factory=dict, hash=False)  # registry host -> URLs
    insecure_registries: tuple[str, ...] = ()  # hosts reached over plain http (127.0.0.1 always is)
    gc_high_percent: int = 85  # the kubelet's imageGCHighThresholdPercent
    gc_low_percent: int = 80

    def __post_init__(self) -> None:
        object.__setattr__(self, "mirrors", {k: tuple(v) for k, v in self.mirrors.items()})
        object.__setattr__(self, "insecure_registries", tuple(self.insecure_registries))


@dataclass(frozen=True)
class AgentConfig:
    handlers: Mapping[str, Handler] = field(hash=False)
    default_runtime: str | None
    missing_handler: str  # "fail" | "retry"
    node: NodeSettings
    source: str | None  # path, or None for the built-in default
    warnings: tuple[str, ...]
    events: str = "all"  # "all" | "warnings" (failures only: cheap at scale) | "none"
    network: NetworkSettings = field(default_factory=NetworkSettings)
    images: ImageSettings = field(default_factory=ImageSettings)
    kubelet_api: KubeletAPISettings = field(default_factory=KubeletAPISettings)

    def __post_init__(self) -> None:
        object.__setattr__(self, "handlers", dict(self.handlers))
        object.__setattr__(self, "warnings", tuple(self.warnings))


# ---------------------------------------------------------------------------------------------
# Quantities (kubernetes_asyncio ships no parse_quantity, so this follows apimachinery's grammar)

_QUANTITY = re.compile(r"([+-]?(?:\d+\.?\d*|\.\d+))(?:[eE]([+-]?\d+)|(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]))?")
_DECIMAL_SI = {"n": -9, "u": -6, "m": -3, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_BINARY_SI = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}


def parse_quantity(value: str | int | float | Decimal) -> Decimal:
    """Parse a Kubernetes quantity ("100m", "1.5", "256Mi", "1e3", "2G") to a Decimal; ValueError if not one."""
    if isinstance(value, bool):  # TOML true is an int to Python, not a quantity
        raise ValueError(f"not a quantity: {value!r}")
    if isinstance(value, int | Decimal):
        number = Decimal(value)
    elif isinstance(value, float):
        number = Decimal(repr(value))  # repr avoids the binary expansion of e.g. 0.1
    elif isinstance(value, str) and (m := _QUANTITY.fullmatch(value)):
        number, exponent, suffix = Decimal(m[1]), m[2], m[3]
        try:
            if exponent is not None:
                number = number.scaleb(int(exponent))
            elif suffix in _BINARY_SI:
                number *= 1024 ** _BINARY_SI[suffix]
            elif suffix:
                number = number.scaleb(_DECIMAL_SI[suffix])
        except (ArithmeticError, ValueError):
            raise ValueError(f"quantity out of range: {value!r}") from None
    else:
        raise ValueError(f"not a quantity: {value!r}")
    if not number.is_finite():
        raise ValueError(f"not a quantity: {value!r}")
    return number


def _ceil(number: Decimal) -> int:
    return int(number.to_integral_value(rounding=ROUND_CEILING))


def cpu_millis(value: str | int | float | Decimal) -> int:
    return _ceil(parse_quantity(value) * 1000)


def memory_bytes(value: str | int | float | Decimal) -> int:
    return _ceil(parse_quantity(value))


# ---------------------------------------------------------------------------------------------
# Reading tables with messages that say where things are


def _q(text: str) -> str:
    """Quote for messages; escapes newlines so a message stays on one line."""
    return json.dumps(text, ensure_ascii=False)


def _kind(value: Any) -> str:
    kinds = {bool: "a boolean", int: "an integer", float: "a float", str: "a string"}
    kinds.update({list: "an array", dict: "a table"})
    return kinds.get(type(value), "a date/time")


class _Table:
    """One TOML table and where it lives, so every error and warning can name file and table."""

    def __init__(self, data: Mapping[str, Any], file: str, name: str = "") -> None:
        self.data, self.file, self.name = data, file, name

    @property
    def where(self) -> str:
        return f"[{self.name}]" if self.name else "top level"

    def error(self, problem: str) -> ConfigError:
        return ConfigError(f"{self.file}: {self.where}: {problem}")

    def child_name(self, key: str) -> str:
        part = key if _BARE_KEY.fullmatch(key) else _q(key)
        return f"{self.name}.{part}" if self.name else part

    def _typed(self, key: str, kinds: tuple[type, ...], what: str, default: Any) -> Any:
        if key not in self.data:
            return default
        value = self.data[key]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise self.error(f"{key} must be {what}, not {_kind(value)}")
        return value

    def str_(self, key: str, default: str | None = None) -> str | None:
        return self._typed(key, (str,), "a string", default)

    def bool_(self, key: str, default: bool) -> bool:
        return self._typed(key, (bool,), "true or false", default)

    def int_(self, key: str, default: int) -> int:
        return self._typed(key, (int,), "an integer", default)

    def list_(self, key: str) -> list[Any]:
        return self._typed(key, (list,), "an array", [])

    def str_list(self, key: str) -> list[str]:
        values = self.list_(key)
        if not all(isinstance(v, str) for v in values):
            raise self.error(f'{key} must be an array of strings, e.g. {key} = ["--debug"]')
        return values

    def table(self, key: str) -> _Table:
        value = self._typed(key, (dict,), "a table", {})
        return _Table(value, self.file, self.child_name(key))

    def warn_unknown(self, known: set[str], warnings: list[str]) -> None:
        for key in self.data:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {_q(close[0])}?)" if close else ""
                warnings.append(f"{self.file}: {self.where}: unknown key {_q(key)} ignored{hint}")


def _read_toml(file: str, missing: str) -> dict[str, Any]:
    try:
        with open(file, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(missing) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{file}: malformed TOML: {e}; fix the syntax") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{file}: malformed TOML: not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"{file}: cannot read: {e.strerror or e}") from None


# ---------------------------------------------------------------------------------------------
# Handlers: native tables, containerd and CRI-O imports, and their validation


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
        options=t.table("options").data,  # free-form: the backend checks its own options
        source=t.file,
    )
    return _Candidate(handler, t)


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


# ---------------------------------------------------------------------------------------------
# Node settings


def _parse_node(t: _Table, warnings: list[str]) -> NodeSettings:
    t.warn_unknown(_NODE_KEYS, warnings)
    labels = t.table("labels")
    for key, value in labels.data.items():
        if not isinstance(value, str):
            raise labels.error(f"label {_q(key)} must be a string, not {_kind(value)}; quote it")
    taints = tuple(_parse_taint(t, i, item, warnings) for i, item in enumerate(t.list_("taints")))
    max_pods = t.int_("max_pods", 110)
    if max_pods <= 0:
        raise t.error(f"max_pods must be a positive integer, not {max_pods}")
    pids = t.int_("pod_pids_limit", -1)
    if pids == 0 or pids < -1:
        raise t.error(f"pod_pids_limit must be -1 (unlimited) or a positive integer, not {pids}")
    reserved = t.table("reserved")
    reserved.warn_unknown({"cpu", "memory"}, warnings)
    cgroup_root = t.str_("cgroup_root", "kubepods")
    if not cgroup_root or cgroup_root.startswith("/") or ".." in cgroup_root.split("/"):
        raise t.error(f'cgroup_root must be a relative path such as "kubepods", not {_q(cgroup_root)}')
    driver = t.str_("cgroup_driver", "cgroupfs")
    if driver not in CGROUP_DRIVERS:
        raise t.error(f'cgroup_driver must be "cgroupfs" or "systemd", not {_q(driver)}')
    log_files = t.int_("container_log_max_files", 5)
    if log_files < 2:
        raise t.error(f"container_log_max_files must be at least 2, not {log_files}")
    raw_size = t.data.get("container_log_max_size", "10Mi")
    try:
        log_size = memory_bytes(raw_size)
    except (ValueError, TypeError, ArithmeticError):
        raise t.error(f'container_log_max_size {_q(str(raw_size))} is not a size such as "10Mi"') from None
    return NodeSettings(
        cgroup_root=cgroup_root,
        cgroup_driver=driver,
        container_log_max_size=log_size,
        container_log_max_files=log_files,
        labels=labels.data,
        taints=taints,
        max_pods=max_pods,
        handler_labels=t.bool_("handler_labels", True),
        pod_pids_limit=pids,
        reserved_cpu_millis=_reserved(reserved, "cpu", cpu_millis, '"100m" or "0.5"'),
        reserved_memory_bytes=_reserved(reserved, "memory", memory_bytes, '"256Mi" or "1G"'),
    )


def _parse_network(t: _Table, warnings: list[str]) -> NetworkSettings:
    t.warn_unknown(_NETWORK_KEYS, warnings)
    cidr = t.str_("pod_cidr")
    if cidr is not None:
        try:
            net = ipaddress.ip_network(cidr, strict=True)
        except ValueError:
            raise t.error(f'pod_cidr {_q(cidr)} is not a network such as "10.244.0.0/24"') from None
        if net.version != 4 or net.num_addresses < 4:
            raise t.error(f"pod_cidr {_q(cidr)} must be an IPv4 network with room for Pods (at most /30)")
    bridge = t.str_("bridge")
    if bridge is not None and not _IFNAME.fullmatch(bridge):
        raise t.error(f"bridge {_q(bridge)} is not an interface name (1-15 letters, digits, '-', '_', '.')")
    return NetworkSettings(
        enabled=t.bool_("enabled", True), pod_cidr=cidr, bridge=bridge, masquerade=t.bool_("masquerade", False)
    )


def _parse_images(t: _Table, warnings: list[str]) -> ImageSettings:
    t.warn_unknown(_IMAGES_KEYS, warnings)
    mirrors = t.table("mirrors")
    parsed: dict[str, tuple[str, ...]] = {}
    for host, urls in mirrors.data.items():
        if isinstance(urls, str):
            urls = [urls]
        schemes = ("http://", "https://")
        urls_ok = isinstance(urls, list) and all(isinstance(u, str) and u.startswith(schemes) for u in urls)
        if not urls_ok:
            raise mirrors.error(f'mirrors for {_q(host)} must be URLs, e.g. "{host}" = ["http://127.0.0.1:5000"]')
        parsed[host] = tuple(urls)
    high, low = t.int_("gc_high_percent", 85), t.int_("gc_low_percent", 80)
    if not 0 < low <= high <= 100:
        raise t.error(f"need 0 < gc_low_percent <= gc_high_percent <= 100, not {low} and {high}")
    return ImageSettings(
        mirrors=parsed,
        insecure_registries=tuple(t.str_list("insecure_registries")),
        gc_high_percent=high,
        gc_low_percent=low,
    )


def _parse_taint(node: _Table, index: int, item: Any, warnings: list[str]) -> Taint:
    t = _Table(item, node.file, f"node.taints[{index}]")
    if not isinstance(item, dict):
        raise t.error(f"a taint must be a table like {{ key = ..., effect = ... }}, not {_kind(item)}")
    t.warn_unknown({"key", "value", "effect"}, warnings)
    key, effect = t.str_("key"), t.str_("effect")
    if not key:
        raise t.error('taint key is missing; set key, e.g. key = "example.com/dedicated"')
    if effect not in TAINT_EFFECTS:
        got = f"is {_q(effect)}" if effect is not None else "is missing"
        raise t.error(f"taint effect {got}; use one of: {', '.join(TAINT_EFFECTS)}")
    return Taint(key=key, value=t.str_("value", "") or "", effect=effect)


def _reserved(t: _Table, key: str, convert: Any, example: str) -> int:
    if key not in t.data:
        return 0
    value = t.data[key]
    try:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ValueError
        amount = convert(value)
    except ValueError:
        raise t.error(f"{key} = {_q(str(value))} is not a Kubernetes quantity; use e.g. {example}") from None
    if amount < 0:
        raise t.error(f"{key} = {_q(str(value))} is negative; reserve zero or more")
    return amount


def _parse_kubelet_api(t: _Table, base: Path, warnings: list[str]) -> KubeletAPISettings:
    t.warn_unknown(_KUBELET_API_KEYS, warnings)
    port = t.data.get("port")
    if port is not None:
        port = t.int_("port", 0)
        if not 0 <= port <= 65535:
            raise t.error(f"port must be between 0 (any free port) and 65535, not {port}")
    mode = t.str_("authorization_mode", "Webhook")
    if mode not in AUTHORIZATION_MODES:
        raise t.error(f'authorization_mode must be "Webhook" or "AlwaysAllow", not {_q(str(mode))}')

    def path(key: str) -> str | None:
        value = t.str_(key)
        if not value:
            return None
        full = base / value  # relative to the config file, like import
        if not full.is_file():
            raise t.error(f"{key} {_q(value)} does not exist or is not a file; fix the path or remove the key")
        return str(full)

    serving_cert = t.str_("serving_cert", "self-signed")
    if serving_cert not in SERVING_CERT_SOURCES:
        raise t.error(f'serving_cert must be "self-signed" or "csr", not {_q(str(serving_cert))}')
    cert, key = path("tls_cert_file"), path("tls_key_file")
    if bool(cert) != bool(key):
        raise t.error("tls_cert_file and tls_key_file go together; set both, or neither for a self-signed certificate")
    return KubeletAPISettings(
        enabled=t.bool_("enabled", True),
        address=t.str_("address", "0.0.0.0") or "0.0.0.0",
        port=port,
        tls_cert_file=cert,
        tls_key_file=key,
        client_ca_file=path("client_ca_file"),
        anonymous=t.bool_("anonymous", False),
        authorization_mode=mode or "Webhook",
        serving_cert=serving_cert or "self-signed",
    )


# ---------------------------------------------------------------------------------------------
# Entry points


def _built_in() -> AgentConfig:
    handler = Handler(name="default", backend="emulated", source="<built-in>")
    return AgentConfig(
        handlers={"default": handler},
        default_runtime="default",
        missing_handler="fail",
        node=NodeSettings(labels={}, taints=()),
        source=None,
        warnings=(),
    )


def load_config(
    path: str | os.PathLike[str] | None, known_backends: Iterable[str] = DEFAULT_BACKENDS, check_paths: bool = True
) -> AgentConfig:
    """Read and validate the agent config; None gives the built-in default. Raises ConfigError.
    `check_paths` False leaves the runtime binaries unchecked (`doctor` reports them itself)."""
    if path is None:
        return _built_in()
    file = os.fspath(path)
    known = frozenset(known_backends)
    warnings: list[str] = []
    root = _Table(_read_toml(file, f"{file}: file not found; pass an existing file to --config"), file)
    root.warn_unknown(_TOP_KEYS, warnings)

    missing_handler = root.str_("missing_handler", "fail")
    if missing_handler not in MISSING_HANDLER_POLICIES:
        raise root.error(f'missing_handler must be "fail" or "retry", not {_q(str(missing_handler))}')
    events = root.str_("events", "all")
    if events not in EVENT_POLICIES:
        raise root.error(f'events must be "all", "warnings" or "none", not {_q(str(events))}')
    node = _parse_node(root.table("node"), warnings)
    network = _parse_network(root.table("network"), warnings)
    images = _parse_images(root.table("images"), warnings)
    kubelet_api = _parse_kubelet_api(root.table("kubelet_api"), Path(file).parent, warnings)

    candidates: dict[str, _Candidate] = {}
    import_defaults: list[tuple[str, _Table]] = []
    base = Path(file).parent
    imports = root.list_("import")
    if not all(isinstance(i, str) for i in imports):
        raise root.error('import must be an array of file paths, e.g. import = ["/etc/crio/crio.conf"]')
    for entry in imports:
        found, default_table, default = _import(str(base / entry), root)  # relative to this file
        for c in found:
            if not _DNS_LABEL.fullmatch(c.handler.name) or len(c.handler.name) > 63:
                # Not fatal: the file belongs to another tool and no RuntimeClass could name it anyway.
                warnings.append(f"{c.table.file}: {c.table.where}: handler name is not a DNS label; skipped")
                continue
            if c.handler.name in candidates:
                earlier = candidates[c.handler.name].handler.source
                warnings.append(
                    f"{c.table.file}: {c.table.where}: handler {_q(c.handler.name)} "
                    f"replaces the one imported from {earlier}"
                )
            candidates[c.handler.name] = c
        if default and default_table is not None:
            import_defaults.append((default, default_table))

    runtimes = root.table("runtimes")
    for name in runtimes.data:
        table = runtimes.table(name)
        if not _DNS_LABEL.fullmatch(name) or len(name) > 63:
            raise table.error(
                f"handler name {_q(name)} is not a DNS label (lowercase letters, digits and '-', at most 63 characters)"
            )
        candidates[name] = _parse_native(table, name, warnings)  # native beats imported

    for c in candidates.values():
        _validate(c, known, check_paths)
    handlers = {name: c.handler for name, c in candidates.items()}
    if not handlers:
        warnings.append(f"{file}: top level: no runtime handlers configured; every Pod will be refused")

    default_runtime = root.str_("default_runtime")
    if default_runtime is not None and default_runtime not in handlers:
        names = ", ".join(sorted(handlers)) or "none defined"
        raise root.error(
            f"default_runtime {_q(default_runtime)} names no handler; define "
            f"[runtimes.{default_runtime}] or use one of: {names}"
        )
    if default_runtime is None:
        for name, table in import_defaults:
            if name in handlers:
                default_runtime = name
                break
            warnings.append(f"{table.file}: {table.where}: default runtime {_q(name)} has no handler; not used")

    return AgentConfig(
        handlers=handlers,
        default_runtime=default_runtime,
        missing_handler=missing_handler,
        node=node,
        source=file,
        warnings=tuple(warnings),
        events=events,
        network=network,
        images=images,
        kubelet_api=kubelet_api,
    )


def format_handler_table(cfg: AgentConfig) -> str:
    """The `kubelet-emu handlers` listing: aligned NAME BACKEND RUNTIME_PATH SOURCE, then warnings."""
    rows = [("NAME", "BACKEND", "RUNTIME_PATH", "SOURCE")]
    for name in sorted(cfg.handlers):
        h = cfg.handlers[name]
        label = f"{name} (default)" if name == cfg.default_runtime else name
        rows.append((label, h.backend, h.runtime_path or "-", h.source))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join([*(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True)), row[3]]) for row in rows]
    lines += [f"warning: {w}" for w in cfg.warnings]
    return "\n".join(lines)

"""The agent's TOML configuration: read it, import handlers from containerd/CRI-O configs, validate.

Everything wrong is reported before the agent starts, as a ConfigError with one line that names the
file, the table, the problem and the fix. Unknown keys are only warnings, so a config written for a
newer agent still starts.

The file's tables are read by the modules named after them: node.py ([node]), network.py
([network]), images.py ([images]), kubelet_api.py ([kubelet_api]), handlers.py ([runtimes.NAME]
and the containerd/CRI-O imports), with tables.py for reading any table; this module reads the
top level and puts the AgentConfig together.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agent.config.fleet import FleetSettings, parse_fleet
from agent.config.handlers import _DNS_LABEL, DEFAULT_BACKENDS, _Candidate, _import, _parse_native, _validate
from agent.config.images import ImageSettings, _parse_images
from agent.config.kubelet_api import AUTHORIZATION_MODES, SERVING_CERT_SOURCES, KubeletAPISettings, _parse_kubelet_api
from agent.config.network import NetworkSettings, _parse_network
from agent.config.node import CGROUP_DRIVERS, TAINT_EFFECTS, NodeSettings, Taint, _parse_node
from agent.config.tables import ConfigError, _q, _read_toml, _Table
from cgroups.quantity import cpu_millis, memory_bytes, parse_quantity
from runtimes.handler import Handler

__all__ = [
    "AUTHORIZATION_MODES",
    "CGROUP_DRIVERS",
    "DEFAULT_BACKENDS",
    "EVENT_POLICIES",
    "MISSING_HANDLER_POLICIES",
    "SERVING_CERT_SOURCES",
    "TAINT_EFFECTS",
    "AgentConfig",
    "ConfigError",
    "Handler",
    "ImageSettings",
    "KubeletAPISettings",
    "NetworkSettings",
    "NodeSettings",
    "Taint",
    "cpu_millis",
    "format_handler_table",
    "load_config",
    "memory_bytes",
    "parse_quantity",
]

MISSING_HANDLER_POLICIES = ("fail", "retry")


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
    "fleet",
}


EVENT_POLICIES = ("all", "warnings", "none")


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
    fleet: FleetSettings | None = None  # [fleet]: only `kubelet-emu fleet` reads it

    def __post_init__(self) -> None:
        object.__setattr__(self, "handlers", dict(self.handlers))
        object.__setattr__(self, "warnings", tuple(self.warnings))


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

    fleet = parse_fleet(root.table("fleet"), handlers, warnings) if "fleet" in root.data else None
    return AgentConfig(
        fleet=fleet,
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

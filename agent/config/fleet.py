"""The [fleet] table: many emulated nodes from one `kubelet-emu fleet` process.

    [fleet]
    name = "emu"                      # label kubelet-emu.io/fleet=emu on every node
    count = 50                        # without groups: one group of `count` nodes
    node_name = "emu-{index}"
    [fleet.labels]
    "topology.kubernetes.io/zone" = "zone-{index % 3}"
    [fleet.capacity]
    cpu = "4"
    memory = "8Gi"

    [fleet.groups.large]              # with groups: each has its own count and name pattern
    count = 10
    node_name = "emu-large-{index}"
    handlers = ["fast", "kata"]       # a subset of [runtimes]: the others are missing on these nodes
    capacity = { cpu = "32", memory = "128Gi" }

Labels, taints and capacity of a group are added to (and override) the fleet-wide ones. `index`
counts from 0 within a group, so changing one group's count adds or removes only its last nodes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.config.node import TAINT_EFFECTS
from agent.config.tables import _kind, _q, _Table
from agent.config.template import Template, TemplateError, parse_template
from cgroups.quantity import cpu_millis, memory_bytes

FLEET_LABEL = "kubelet-emu.io/fleet"
_COMMON_KEYS = {"count", "node_name", "labels", "taints", "capacity", "handlers"}
_CAPACITY_KEYS = {"cpu", "memory", "pods", "ephemeral-storage"}
DEFAULT_CAPACITY = {"cpu": "4", "memory": "16Gi", "pods": "110", "ephemeral-storage": "100Gi"}


@dataclass(frozen=True)
class FleetTaint:
    key: Template
    value: Template
    effect: str


@dataclass(frozen=True)
class FleetGroup:
    name: str
    count: int
    node_name: Template
    labels: Mapping[str, Template] = field(hash=False)
    taints: tuple[FleetTaint, ...]
    capacity: Mapping[str, Template] = field(hash=False)
    handlers: tuple[str, ...] | None  # None: every configured handler


@dataclass(frozen=True)
class FleetSettings:
    name: str
    groups: tuple[FleetGroup, ...]
    source: str = "<fleet>"  # the config file, for messages

    @property
    def count(self) -> int:
        return sum(g.count for g in self.groups)


@dataclass(frozen=True)
class FleetNode:
    """One node of the fleet, templates filled in."""

    name: str
    group: str
    index: int
    labels: Mapping[str, str] = field(hash=False)
    taints: tuple[tuple[str, str, str], ...]
    cpu_millis: int
    memory_bytes: int
    storage_bytes: int
    max_pods: int
    handlers: tuple[str, ...] | None


def _template(t: _Table, key: str, value: Any) -> Template:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise t.error(f"{key} must be a string, not {_kind(value)}")
    try:
        return parse_template(value)
    except TemplateError as exc:
        raise t.error(f"{key}: {exc}") from None


def _templates(t: _Table, allowed: set[str] | None = None) -> dict[str, Template]:
    if allowed is not None:
        for key in t.data:
            if key not in allowed:
                raise t.error(f"unknown key {_q(key)}; use one of: {', '.join(sorted(allowed))}")
    return {key: _template(t, key, value) for key, value in t.data.items()}


def _taints(t: _Table) -> tuple[FleetTaint, ...]:
    out = []
    for i, item in enumerate(t.list_("taints")):
        tt = _Table(item, t.file, f"{t.name}.taints[{i}]")
        if not isinstance(item, dict):
            raise tt.error(f"a taint must be a table like {{ key = ..., effect = ... }}, not {_kind(item)}")
        effect = tt.str_("effect")
        if effect not in TAINT_EFFECTS:
            raise tt.error(f"taint effect is {_q(str(effect))}; use one of: {', '.join(TAINT_EFFECTS)}")
        if not tt.str_("key"):
            raise tt.error('taint key is missing; set key, e.g. key = "example.com/dedicated"')
        key, value = _template(tt, "key", item["key"]), _template(tt, "value", item.get("value", ""))
        out.append(FleetTaint(key, value, effect))
    return tuple(out)


def _group(t: _Table, name: str, default_name: str, base: FleetGroup | None, handlers: Mapping[str, Any]) -> FleetGroup:
    count = t.int_("count", 0)
    if count < 0:
        raise t.error(f"count must be zero or more, not {count}")
    pattern = _template(t, "node_name", t.str_("node_name", default_name))
    if pattern.constant and count > 1:
        raise t.error(f"node_name {_q(pattern.text)} names every node the same; put {{index}} in it")
    names = t.data.get("handlers")
    chosen: tuple[str, ...] | None = None
    if names is not None:
        names = t.str_list("handlers")
        unknown = [n for n in names if n not in handlers]
        if unknown:
            raise t.error(f"handlers names {_q(unknown[0])}, which is no [runtimes.NAME]; have: {', '.join(handlers)}")
        chosen = tuple(names)
    labels = t.table("labels")
    capacity = _templates(t.table("capacity"), _CAPACITY_KEYS)
    if base is not None:
        return FleetGroup(
            name=name,
            count=count,
            node_name=pattern,
            labels={**base.labels, **_templates(labels)},
            taints=base.taints + _taints(t),
            capacity={**base.capacity, **capacity},
            handlers=chosen if chosen is not None else base.handlers,
        )
    return FleetGroup(name, count, pattern, _templates(labels), _taints(t), capacity, chosen)


def parse_fleet(t: _Table, handlers: Mapping[str, Any], warnings: list[str]) -> FleetSettings:
    t.warn_unknown(_COMMON_KEYS | {"name", "groups"}, warnings)
    name = t.str_("name", "emu") or "emu"
    groups_table = t.table("groups")
    fleet_wide = _group(t, "", name + "-{index}", None, handlers)
    if not groups_table.data:
        groups = (FleetGroup(name, fleet_wide.count, *_rest(fleet_wide)),)
    else:
        if "count" in t.data or "node_name" in t.data:
            raise t.error("count and node_name belong in each [fleet.groups.NAME] once groups are defined")
        groups = tuple(
            _group(groups_table.table(g), g, f"{name}-{g}-{{index}}", fleet_wide, handlers) for g in groups_table.data
        )
    settings = FleetSettings(name, groups, t.file)
    _check_nodes(t, settings)
    return settings


def _rest(g: FleetGroup) -> tuple[Any, ...]:
    return (g.node_name, g.labels, g.taints, g.capacity, g.handlers)


def _check_nodes(t: _Table, settings: FleetSettings) -> None:
    """Every node's name unique and every quantity valid, so a bad template fails at load."""
    seen: dict[str, str] = {}
    for node in fleet_nodes(settings):
        if node.name in seen:
            raise t.error(f"node name {_q(node.name)} is made by groups {seen[node.name]} and {node.group}")
        seen[node.name] = node.group


def _quantity(t: _Table, key: str, template: Template, index: int, convert: Any) -> int:
    text = template.render(index)
    try:
        value = convert(text)
    except (ValueError, ArithmeticError):
        what = "a whole number of cpus" if key == "cpu" else "a Kubernetes quantity"
        raise t.error(f"capacity {key} = {_q(text)} (node {index}) is not {what}") from None
    if value < 0:
        raise t.error(f"capacity {key} = {_q(text)} (node {index}) is negative")
    return int(value)


def _whole_cpus(text: str) -> int:
    millis = cpu_millis(text)
    if millis % 1000:
        raise ValueError("whole cpus only")  # the Node's capacity is a count of cpus
    return millis


def fleet_nodes(settings: FleetSettings) -> list[FleetNode]:
    """Raises ConfigError when a template makes a bad quantity."""
    t = _Table({}, settings.source, "fleet")
    out = []
    for g in settings.groups:
        capacity = {**{k: parse_template(v) for k, v in DEFAULT_CAPACITY.items()}, **g.capacity}
        for i in range(g.count):
            labels = {k: v.render(i) for k, v in g.labels.items()}
            out.append(
                FleetNode(
                    name=g.node_name.render(i),
                    group=g.name,
                    index=i,
                    labels=labels,
                    taints=tuple((x.key.render(i), x.value.render(i), x.effect) for x in g.taints),
                    cpu_millis=_quantity(t, "cpu", capacity["cpu"], i, _whole_cpus),
                    memory_bytes=_quantity(t, "memory", capacity["memory"], i, memory_bytes),
                    storage_bytes=_quantity(t, "ephemeral-storage", capacity["ephemeral-storage"], i, memory_bytes),
                    max_pods=_quantity(t, "pods", capacity["pods"], i, int),
                    handlers=g.handlers,
                )
            )
    return out

"""What one fleet node is made of: its AgentConfig and host facts, from the [fleet] table (pure)."""

from __future__ import annotations

import dataclasses
import uuid

from agent.config import AgentConfig, ConfigError, Taint
from agent.config.fleet import FLEET_LABEL, FleetNode
from agent.hostinfo import HostInfo
from agent.node_status import NodeFacts

# The only backend a fleet runs: one process cannot give a thousand nodes real processes or containers.
FLEET_BACKENDS = ("emulated",)


def check_fleet_config(config: AgentConfig) -> None:
    """Raises ConfigError when the config cannot run as a fleet."""
    where = config.source or "<built-in>"
    if config.fleet is None:
        raise ConfigError(f"{where}: no [fleet] table; add one with count and node_name (see README, fleet mode)")
    for name, handler in sorted(config.handlers.items()):
        if handler.backend not in FLEET_BACKENDS:
            raise ConfigError(
                f"{where}: [runtimes.{name}] uses backend {handler.backend!r}: fleet mode runs only emulated "
                f"handlers (one process cannot host the processes or containers of many nodes); "
                f'set backend = "emulated" or run this handler with `kubelet-emu run`'
            )


def node_config(base: AgentConfig, node: FleetNode, fleet_name: str) -> AgentConfig:
    handlers = base.handlers if node.handlers is None else {h: base.handlers[h] for h in node.handlers}
    default = base.default_runtime if base.default_runtime in handlers else None
    settings = dataclasses.replace(
        base.node,
        labels={**base.node.labels, **node.labels, FLEET_LABEL: fleet_name},
        taints=base.node.taints + tuple(Taint(k, v, e) for k, v, e in node.taints),
        max_pods=node.max_pods,
    )
    return dataclasses.replace(base, handlers=handlers, default_runtime=default, node=settings, fleet=None)


def node_facts(base: AgentConfig, node: FleetNode, fleet_name: str, host: HostInfo, ip: str, port: int) -> NodeFacts:
    # Stable per-node identities, so a restarted fleet reports the same machine for each node.
    ident = uuid.uuid5(uuid.NAMESPACE_DNS, f"{node.name}.{fleet_name}.kubelet-emu.io")
    node_host = dataclasses.replace(
        host,
        hostname=node.name,
        cpus=node.cpu_millis // 1000,
        memory_bytes=node.memory_bytes,
        ephemeral_storage_bytes=node.storage_bytes,
        machine_id=ident.hex,
        system_uuid=str(ident),
    )
    return NodeFacts(
        name=node.name, host=node_host, config=node_config(base, node, fleet_name), internal_ip=ip, kubelet_port=port
    )

"""Unit tests of the Node object and status the agent builds (pure functions, no cluster)."""

from __future__ import annotations

import dataclasses
import logging
from datetime import UTC, datetime, timedelta

from agent.config import AgentConfig, Handler, NodeSettings, Taint
from agent.hostinfo import HostInfo, go_arch
from agent.lease import kept
from agent.node_status import (
    NodeFacts,
    allocatable,
    capacity,
    node_labels,
    node_object,
    node_status,
    reservation_warnings,
    runtime_handlers,
    slim_node,
    status_fingerprint,
)

HOST = HostInfo(
    hostname="box",
    cpus=4,
    memory_bytes=8 * 1024**3,
    ephemeral_storage_bytes=100 * 1024**3,
    kernel="6.1.0",
    os_image="Debian GNU/Linux 12 (bookworm)",
    arch="amd64",
    machine_id="m",
    boot_id="b",
    system_uuid="u",
)


def facts(**node: object) -> NodeFacts:
    settings = NodeSettings(
        labels=node.pop("labels", {}),
        taints=node.pop("taints", ()),
        **node,
    )
    config = AgentConfig(
        handlers={
            "fast": Handler(name="fast", backend="emulated"),
            "secure": Handler(name="secure", backend="oci", runtime_path="/bin/true", user_namespaces=True),
        },
        default_runtime="fast",
        missing_handler="fail",
        node=settings,
        source=None,
        warnings=(),
    )
    return NodeFacts(name="n1", host=HOST, config=config, internal_ip="10.1.2.3", kubelet_port=10250)


NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_labels_include_well_known_handler_and_configured():
    labels = node_labels(facts(labels={"team": "a"}))
    assert labels["kubernetes.io/hostname"] == "n1"
    assert labels["kubernetes.io/arch"] == "amd64"
    assert labels["runtime.kubelet-emu.io/fast"] == "true"
    assert labels["runtime.kubelet-emu.io/secure"] == "true"
    assert labels["team"] == "a"


def test_handler_labels_can_be_turned_off():
    labels = node_labels(facts(handler_labels=False))
    assert not any(k.startswith("runtime.kubelet-emu.io/") for k in labels)


def test_capacity_and_allocatable_subtract_reserved():
    f = facts(max_pods=300, reserved_cpu_millis=250, reserved_memory_bytes=512 * 1024**2)
    assert capacity(f) == {"cpu": "4", "memory": "8388608Ki", "ephemeral-storage": "104857600Ki", "pods": "300"}
    alloc = allocatable(f)
    assert alloc["cpu"] == "3750m"
    assert alloc["memory"] == f"{8388608 - 524288}Ki"
    assert alloc["pods"] == "300"


def test_allocatable_never_negative_and_whole_cpus_stay_whole():
    f = facts(reserved_cpu_millis=1000)
    assert allocatable(f)["cpu"] == "3"
    f = facts(reserved_cpu_millis=99000, reserved_memory_bytes=10**15)
    assert allocatable(f)["cpu"] == "0" and allocatable(f)["memory"] == "0Ki"


def test_runtime_handlers_list_default_first_with_features():
    handlers = runtime_handlers(facts().config)
    assert [h["name"] for h in handlers] == ["", "fast", "secure"]
    assert handlers[2]["features"] == {"recursiveReadOnlyMounts": False, "userNamespaces": True}


def test_status_conditions_addresses_and_info():
    status = node_status(facts(), NOW)
    by_type = {c["type"]: c for c in status["conditions"]}
    assert by_type["Ready"]["status"] == "True" and by_type["Ready"]["reason"] == "KubeletReady"
    assert by_type["MemoryPressure"]["status"] == "False"
    assert by_type["Ready"]["lastHeartbeatTime"] == "2026-01-02T03:04:05Z"
    assert status["addresses"] == [
        {"type": "InternalIP", "address": "10.1.2.3"},
        {"type": "Hostname", "address": "box"},
    ]
    assert status["nodeInfo"]["kubeletVersion"].startswith("kubelet-emu/")
    assert "swap" not in status["nodeInfo"]  # swap off: left out (the API server refuses capacity 0)
    with_swap = node_status(dataclasses.replace(facts(), host=dataclasses.replace(HOST, swap_bytes=2 * 1024**3)), NOW)
    assert with_swap["nodeInfo"]["swap"] == {"capacity": 2 * 1024**3}
    assert status["daemonEndpoints"] == {"kubeletEndpoint": {"Port": 10250}}


def test_transition_time_kept_while_status_unchanged_and_reset_on_change():
    first = node_status(facts(), NOW)
    later = node_status(facts(), NOW + timedelta(seconds=30), first["conditions"])
    ready = next(c for c in later["conditions"] if c["type"] == "Ready")
    assert ready["lastTransitionTime"] == "2026-01-02T03:04:05Z"
    assert ready["lastHeartbeatTime"] == "2026-01-02T03:04:35Z"
    unknown = [{"type": "Ready", "status": "Unknown", "lastTransitionTime": "2020-01-01T00:00:00Z"}]
    recovered = node_status(facts(), NOW, unknown)
    ready = next(c for c in recovered["conditions"] if c["type"] == "Ready")
    assert ready["lastTransitionTime"] == "2026-01-02T03:04:05Z"


def test_fingerprint_ignores_heartbeats_only():
    first = node_status(facts(), NOW)
    later = node_status(facts(), NOW + timedelta(seconds=10), first["conditions"])
    assert status_fingerprint(first) == status_fingerprint(later)
    other = node_status(facts(max_pods=5), NOW + timedelta(seconds=10), first["conditions"])
    assert status_fingerprint(first) != status_fingerprint(other)


def test_node_object_carries_taints_only_at_creation():
    obj = node_object(facts(taints=(Taint("k", "", "NoSchedule"), Taint("k2", "v", "NoExecute"))), NOW)
    assert obj["spec"]["taints"] == [
        {"key": "k", "effect": "NoSchedule"},
        {"key": "k2", "value": "v", "effect": "NoExecute"},
    ]
    assert node_object(facts(), NOW)["spec"] == {}


def test_go_arch_names():
    assert go_arch("x86_64") == "amd64"
    assert go_arch("aarch64") == "arm64"
    assert go_arch("riscv64") == "riscv64"


def test_node_address_prefers_a_proxyable_address_for_a_local_api_server() -> None:
    """The API server refuses to proxy to a loopback node address (nodes/proxy, metrics-server):
    with the API server on this host, the host's outgoing address is advertised when there is one."""
    import ipaddress

    from agent.hostinfo import _route_source, address_toward

    outgoing = _route_source("192.0.2.123", 9)
    got = address_toward("https://127.0.0.1:6443")
    if outgoing and not ipaddress.ip_address(outgoing).is_loopback:
        assert got == outgoing
    else:
        assert got == "127.0.0.1"


def test_reserved_beyond_capacity_is_warned_with_the_values(caplog):
    assert reservation_warnings(facts(reserved_cpu_millis=4000, reserved_memory_bytes=8 * 1024**3)) == []
    f = facts(reserved_cpu_millis=6500, reserved_memory_bytes=9 * 1024**3)
    cpu, memory = reservation_warnings(f)
    assert "[node.reserved] cpu (6500m)" in cpu and "capacity (4000m, 4 cpus)" in cpu and "allocatable cpu is 0" in cpu
    assert f"memory ({9 * 1024**2}Ki)" in memory and f"({8 * 1024**2}Ki)" in memory
    from agent.node import NodeAgent

    with caplog.at_level(logging.WARNING, logger="agent.node"):
        NodeAgent(None, f)  # type: ignore[arg-type]  # warned when the agent starts (and on reload)
    assert [r.getMessage() for r in caplog.records] == [cpu, memory]


async def test_a_reload_while_a_status_post_is_in_flight_is_posted_too():
    """A SIGHUP that lands during a status PATCH (found in CI: right after registration) must not
    count as posted: the next post sends the new handlers, not a fingerprint of them."""
    import asyncio

    from agent.node import NodeAgent

    class SlowKube:
        def __init__(self) -> None:
            self.sent: list[dict] = []
            self.gate = asyncio.Event()
            self.node = {"metadata": {"labels": {}}, "spec": {}, "status": {"conditions": []}}

        async def request(self, method: str, path: str, body: dict, **_: object) -> dict:
            self.sent.append(body["status"])
            await self.gate.wait()
            self.node = {**self.node, "status": body["status"]}  # what a GET returns from now on
            return self.node

        async def get(self, path: str) -> dict:
            return self.node

        async def patch(self, path: str, body: dict) -> dict:
            return self.node

    kube = SlowKube()
    first = facts()
    agent = NodeAgent(kube, first, own_watch=False)  # type: ignore[arg-type]
    agent.node = kube.node
    in_flight = asyncio.create_task(agent.post_status())
    await asyncio.sleep(0)
    handlers = {**first.config.handlers, "procs": Handler(name="procs", backend="process")}
    agent.set_config(dataclasses.replace(first.config, handlers=handlers))  # the SIGHUP
    kube.gate.set()
    assert await in_flight
    assert await agent.post_status()  # the reload is still to be posted
    assert "procs" not in {h["name"] for h in kube.sent[0]["runtimeHandlers"]}
    assert "procs" in {h["name"] for h in kube.sent[1]["runtimeHandlers"]}
    assert not await agent.post_status()  # and then nothing new


def test_the_node_kept_in_memory_is_slim_but_has_what_admission_and_status_read() -> None:
    node = {
        "metadata": {
            "name": "n",
            "uid": "u",
            "resourceVersion": "7",
            "labels": {"team": "a"},
            "managedFields": [{"manager": "x", "fieldsV1": {"f:status": {}}}],
        },
        "spec": {"taints": [{"key": "k", "effect": "NoSchedule"}], "podCIDR": "10.0.0.0/24"},
        "status": {"conditions": [{"type": "Ready", "status": "True"}], "images": [{"names": ["a"]}], "nodeInfo": {}},
    }
    slim = slim_node(node)
    assert slim == {
        "metadata": {"name": "n", "uid": "u", "resourceVersion": "7", "labels": {"team": "a"}},
        "spec": node["spec"],
        "status": {"conditions": node["status"]["conditions"]},
    }


def test_a_renewed_lease_is_kept_without_its_managed_fields() -> None:
    lease = {"metadata": {"name": "n", "resourceVersion": "3", "managedFields": [{}]}, "spec": {"holderIdentity": "n"}}
    assert kept(lease) == {"metadata": {"name": "n", "resourceVersion": "3"}, "spec": {"holderIdentity": "n"}}

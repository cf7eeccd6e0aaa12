"""Issue 20 item 6: events recorded as the kubelet's recorder does, through the real agent.

Repeats of an event (same object, reason, message, type and source) are one Event object whose
count and lastTimestamp grow, as client-go's EventCorrelator makes them; a failing probe reports
Unhealthy for every failed attempt. The process backend runs the containers (events do not depend
on the backend).
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from conftest import Kubectl, delete_node_pods, eventually, ready_node
from helpers import needs_root, process_config, unique

pytestmark = [pytest.mark.cluster, needs_root]

CGROUP_ROOT = f"kubelet-emu-test-{uuid.uuid4().hex[:6]}"
CONFIG = process_config(CGROUP_ROOT)


@pytest.fixture
async def node(kubectl, start_agent, tmp_path):
    name = unique("emu-events")
    await ready_node(kubectl, start_agent, name, CONFIG, tmp_path / "state")
    yield name
    await delete_node_pods(kubectl, name)


def pod_yaml(name: str, node: str, command: str, container_extra: str = "") -> str:
    return f"""
apiVersion: v1
kind: Pod
metadata:
  name: {name}
spec:
  nodeName: {node}
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: busybox
    command: ["sh", "-c", {command!r}]
{container_extra}
"""


async def events_of(kubectl: Kubectl, name: str, reason: str) -> list[dict[str, Any]]:
    out = await kubectl.json("get", "events", "--field-selector", f"involvedObject.name={name},reason={reason}")
    return out["items"]


async def test_repeated_events_are_one_object_with_a_growing_count(kubectl, node):
    looping, unready = unique("crashloop"), unique("unready")
    probe = "    readinessProbe: {exec: {command: [sh, -c, 'exit 1']}, periodSeconds: 1}"
    await kubectl.apply(pod_yaml(looping, node, "exit 1") + "---\n" + pod_yaml(unready, node, "exec sleep 3600", probe))

    async def counted(name: str, reason: str, count: int) -> list[dict[str, Any]] | None:
        items = await events_of(kubectl, name, reason)
        return items if items and max(e.get("count", 1) for e in items) >= count else None

    # A failing readiness probe: Unhealthy for each failed attempt, folded into one Event.
    items = await eventually(lambda: counted(unready, "Unhealthy", 4), 30, what="Unhealthy with count >= 4")
    assert len(items) == 1, [(e["metadata"]["name"], e.get("count")) for e in items]
    event = items[0]
    assert event["type"] == "Warning"
    assert event["message"].startswith("Readiness probe failed:")
    assert event["firstTimestamp"] < event["lastTimestamp"]
    assert event["involvedObject"]["fieldPath"] == "spec.containers{main}"

    # A crash-looping container: one BackOff Event whose count grows with each back-off.
    items = await eventually(lambda: counted(looping, "BackOff", 2), 60, what="BackOff with count >= 2")
    assert len(items) == 1, [(e["metadata"]["name"], e.get("count")) for e in items]
    assert items[0]["message"].startswith("Back-off restarting failed container main in pod ")
    for reason in ("Started", "Created"):  # the same wording each time: one object, counted
        started = await events_of(kubectl, looping, reason)
        assert len(started) == 1 and started[0]["count"] >= 2, started

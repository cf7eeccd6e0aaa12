"""The Pod network helper process (network/helper.py) through its client, on this host: a real
child process making real namespaces, veths and a bridge. Killing the helper must cost a Pod a
retry, never its network or its address."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers import free_test_cidr

from network.helper_client import NetworkHelper
from network.podnet import PodNetworkError
from network.pods import PodNetworks

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2 for network namespaces"
)

TAG = uuid.uuid4().hex[:5]
BRIDGE = f"emuh{TAG}"
PREFIX = f"emuh{TAG}-"


CIDR = free_test_cidr("10.251", int(TAG, 16))


def netns_addr(ns: str) -> list[str]:
    out = subprocess.run(["ip", "-j", "-n", ns, "-4", "addr", "show", "eth0"], capture_output=True, text=True)
    return [a["local"] for link in json.loads(out.stdout or "[]") for a in link.get("addr_info", [])]


@pytest.fixture
async def helper(tmp_path: Path) -> AsyncIterator[NetworkHelper]:
    client = NetworkHelper(tmp_path / "network", bridge=BRIDGE, netns_prefix=PREFIX)
    await client.start(CIDR)
    try:
        yield client
    finally:
        await client.close()
        cleanup = PodNetworks(tmp_path / "network", bridge=BRIDGE, netns_prefix=PREFIX)  # removes what is left
        await cleanup.start(CIDR)
        await cleanup.cleanup_orphans(set())
        await cleanup.stop(remove_bridge=True)


async def test_setup_and_teardown_through_the_helper(helper: NetworkHelper) -> None:
    uid = str(uuid.uuid4())
    net = await helper.setup(uid, "default", "web")
    assert net.netns_path == f"/run/netns/{PREFIX}{uid}"
    assert netns_addr(f"{PREFIX}{uid}") == [net.ip]
    assert net.gateway == CIDR.replace(".0/24", ".1")
    assert (await helper.setup(uid, "default", "web")).ip == net.ip  # idempotent: same address
    await helper.teardown(uid)
    assert not os.path.exists(net.netns_path)


async def test_errors_come_back_named_and_the_helper_carries_on(helper: NetworkHelper) -> None:
    with pytest.raises(PodNetworkError, match=r"pod default/bad: invalid pod UID 'a/b'"):
        await helper.setup("a/b", "default", "bad")
    uid = str(uuid.uuid4())
    assert (await helper.setup(uid, "default", "after")).ip  # the same helper still serves
    await helper.teardown(uid)


async def test_a_killed_helper_is_restarted_and_pods_keep_their_addresses(helper: NetworkHelper) -> None:
    first = str(uuid.uuid4())
    net = await helper.setup(first, "default", "before")
    assert helper._proc is not None
    old_pid = helper._proc.pid
    os.kill(old_pid, signal.SIGKILL)
    await helper._proc.wait()

    second = str(uuid.uuid4())
    net2 = await helper.setup(second, "default", "after")  # a new helper, started again with the CIDR
    assert helper._proc is not None and helper._proc.pid != old_pid
    assert net2.ip != net.ip
    assert netns_addr(f"{PREFIX}{first}") == [net.ip]  # the first Pod's network outlived the helper
    assert (await helper.setup(first, "default", "before")).ip == net.ip
    removed = await helper.cleanup_orphans({second})
    assert removed == [first]
    assert not os.path.exists(net.netns_path)

"""network.pods and network.netns on this host: real namespaces, veths, a bridge and iptables.

Each test gets its own PodNetworks on a bridge, netns prefix and pod CIDR unique to this module,
and the fixture removes everything it made (even when the test fails). Checks look at the host
the way a person would: `ip netns list`, `ip -n NAME addr/route`, `ip link`, `iptables -t nat -S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import free_test_cidr

from network import fresh_pod, iptables
from network.netns import connect_in_netns, enter_netns_preexec, list_netns, remove_netns_sync
from network.pods import PodNetworkError, PodNetworks

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2 for network namespaces"
)

TAG = uuid.uuid4().hex[:5]
BRIDGE = f"emut{TAG}"  # unique to this module (and this run)
PREFIX = f"emut{TAG}-"
BUSYBOX = "/bin/busybox" if os.path.exists("/bin/busybox") else None


CIDR = free_test_cidr("10.250", int(TAG, 16))


def _forward_policy() -> str:
    if not shutil.which("iptables"):
        return "ACCEPT"
    out = subprocess.run(["iptables", "-w", "5", "-S", "FORWARD"], capture_output=True, text=True).stdout
    return next((line.split()[2] for line in out.splitlines() if line.startswith("-P FORWARD")), "ACCEPT")


FORWARD_POLICY = _forward_policy()  # the host's, restored after the tests
GATEWAY = CIDR.replace(".0/24", ".1")


def ip_json(*args: str) -> Any:
    out = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=True).stdout
    return json.loads(out or "[]")


def netns_list() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def our_links() -> list[str]:
    """Host interfaces that are ours: the bridge and its ports."""
    names = []
    for link in ip_json("link", "show"):
        if link["ifname"] == BRIDGE or link.get("master") == BRIDGE:
            names.append(link["ifname"])
    return names


def nat_rules(table: str = "nat") -> list[str]:
    """This module's rules in `table`, as `iptables -S` prints them."""
    out = subprocess.run(["iptables", "-w", "5", "-t", table, "-S"], capture_output=True, text=True, check=True)
    return [line for line in out.stdout.splitlines() if BRIDGE in line]


def forward_rules() -> list[str]:
    return nat_rules("filter")


def scrub_host() -> None:
    """Remove whatever this module may have left: namespaces, bridge ports, the bridge, NAT rules."""
    for name in list_netns(PREFIX):
        remove_netns_sync(f"/run/netns/{name}")
    for name in our_links():
        if name != BRIDGE:
            subprocess.run(["ip", "link", "del", name], capture_output=True)
    subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)
    if iptables.iptables_binary():
        for rule in [iptables.masquerade_rule(CIDR, BRIDGE), *iptables.forward_rules(BRIDGE)]:
            delete = ["iptables", "-w", "5", "-t", rule.table, "-D", rule.chain, *rule.match]
            while subprocess.run(delete, capture_output=True).returncode == 0:
                pass


@pytest.fixture(scope="module", autouse=True)
def host_state() -> Iterator[None]:
    """Leave the host as found: no leftovers, and ip_forward as it was."""
    forward = Path("/proc/sys/net/ipv4/ip_forward")
    before = forward.read_text()
    try:
        yield
    finally:
        scrub_host()
        forward.write_text(before)
        if iptables.iptables_binary():  # test_pods_talk_through_a_forward_drop_policy may have been interrupted
            subprocess.run(["iptables", "-w", "5", "-P", "FORWARD", FORWARD_POLICY], capture_output=True)


@pytest.fixture
async def net(tmp_path: Path) -> AsyncIterator[PodNetworks]:
    networks = PodNetworks(tmp_path / "net", bridge=BRIDGE, netns_prefix=PREFIX)
    try:
        await networks.start(CIDR)
        yield networks
    finally:
        with contextlib.suppress(Exception):
            await networks.cleanup_orphans(set())
        with contextlib.suppress(Exception):
            await networks.stop(remove_bridge=True)
        scrub_host()


async def run(*argv: str, check: bool = True) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL
    )
    out, err = await proc.communicate()
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(argv)} failed ({proc.returncode}): {err.decode()}")
    return out.decode()


@contextlib.asynccontextmanager
async def http_server_in(netns: str, bind: str, port: int, root: Path) -> AsyncIterator[None]:
    """A static HTTP server inside a Pod's namespace, started as a user would (`ip netns exec`)."""
    if BUSYBOX:
        argv = [BUSYBOX, "httpd", "-f", "-p", f"{bind}:{port}", "-h", str(root)]
    else:
        argv = [sys.executable, "-m", "http.server", str(port), "--bind", bind, "--directory", str(root)]
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", netns, *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while f":{port} " not in await run("ip", "netns", "exec", netns, "ss", "-Hltn", check=False):
            assert proc.returncode is None, "the HTTP server in the Pod exited"
            assert time.monotonic() < deadline, f"HTTP server in {netns} did not start listening on {bind}:{port}"
            await asyncio.sleep(0.05)
        yield
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def http_get_in(netns: str, url: str) -> str:
    """Fetch `url` from inside a Pod's namespace."""
    if BUSYBOX:
        # (no -T: this busybox's wget crashes with a timeout option; `timeout` bounds it instead)
        return await run("ip", "netns", "exec", netns, "timeout", "10", BUSYBOX, "wget", "-q", "-O", "-", url)
    code = f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=5).read().decode(), end='')"
    return await run("ip", "netns", "exec", netns, sys.executable, "-c", code)


async def http_get(host: str, port: int, reader_writer: Any = None) -> str:
    reader, writer = reader_writer or await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    writer.write(f"GET /index.html HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
    await writer.drain()
    body = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return body.decode(errors="replace")


def pod_uid() -> str:
    return str(uuid.uuid4())


# --- tests ----------------------------------------------------------------------------------


async def test_bridge_has_the_gateway_and_forwarding_is_on(net: PodNetworks) -> None:
    assert (net.pod_cidr, net.gateway, net.prefix_len) == (CIDR, GATEWAY, 24)
    (bridge,) = ip_json("addr", "show", "dev", BRIDGE)
    assert "UP" in bridge["flags"]
    assert [(a["local"], a["prefixlen"]) for a in bridge["addr_info"] if a["family"] == "inet"] == [(GATEWAY, 24)]
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "1"
    # start() again (an agent restart) adopts the bridge as it is.
    again = PodNetworks(net.state_dir, bridge=BRIDGE, netns_prefix=PREFIX)
    await again.start(CIDR)
    (bridge,) = ip_json("addr", "show", "dev", BRIDGE)
    assert [a["local"] for a in bridge["addr_info"] if a["family"] == "inet"] == [GATEWAY]


async def test_two_pods_get_their_own_namespace_address_and_route(net: PodNetworks) -> None:
    a, b = pod_uid(), pod_uid()
    net_a = await net.setup(a, "default", "pod-a")
    net_b = await net.setup(b, "default", "pod-b")
    assert net_a.ip != net_b.ip
    for uid, pod in ((a, net_a), (b, net_b)):
        name = f"{PREFIX}{uid}"
        assert name in netns_list()
        assert pod.netns_path == f"/run/netns/{name}"
        assert (pod.gateway, pod.prefix_len) == (GATEWAY, 24)
        links = {link["ifname"]: link for link in ip_json("-n", name, "addr", "show")}
        assert set(links) == {"lo", "eth0"}
        assert "UP" in links["lo"]["flags"]
        assert "UP" in links["eth0"]["flags"]
        assert [(i["local"], i["prefixlen"]) for i in links["eth0"]["addr_info"] if i["family"] == "inet"] == [
            (pod.ip, 24)
        ]
        routes = ip_json("-n", name, "route", "show")
        assert any(r["dst"] == "default" and r.get("gateway") == GATEWAY and r["dev"] == "eth0" for r in routes)
        # The host end is a port of the bridge, named for the Pod, with an alias saying whose it is.
        (veth,) = ip_json("link", "show", "dev", pod.host_veth)
        assert len(pod.host_veth) <= 15
        assert veth["master"] == BRIDGE and "UP" in veth["flags"]
        assert uid in veth.get("ifalias", "")
        assert_one_queue_each_way(pod.host_veth, name)


def assert_one_queue_each_way(host_veth: str, netns: str) -> None:
    """Both ends of a Pod's veth are made with one queue each way. (The kernel's default is one per
    CPU, cut to one after creation, which waits for an RCU grace period under the rtnl lock.)"""
    for where in ([], ["-n", netns]):
        (link,) = ip_json(*where, "-d", "link", "show", "dev", host_veth if not where else "eth0")
        assert (link["num_tx_queues"], link["num_rx_queues"]) == (1, 1), link["ifname"]


async def test_pod_to_pod_and_host_to_pod(net: PodNetworks, tmp_path: Path) -> None:
    a, b = pod_uid(), pod_uid()
    net_a = await net.setup(a, "default", "server")
    await net.setup(b, "default", "client")
    root = tmp_path / "www"
    root.mkdir()
    (root / "index.html").write_text("hello from pod a\n")
    async with http_server_in(f"{PREFIX}{a}", net_a.ip, 8080, root):
        assert await http_get_in(f"{PREFIX}{b}", f"http://{net_a.ip}:8080/index.html") == "hello from pod a\n"
        assert "hello from pod a" in await http_get(net_a.ip, 8080)  # from the host, by Pod IP


async def test_connect_in_netns_reaches_a_pods_loopback(net: PodNetworks, tmp_path: Path) -> None:
    uid = pod_uid()
    pod = await net.setup(uid, "default", "loopback-only")
    root = tmp_path / "www"
    root.mkdir()
    (root / "index.html").write_text("only on the pod's loopback\n")
    with socket.socket() as s:  # a port nothing on the host listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with http_server_in(f"{PREFIX}{uid}", "127.0.0.1", port, root):
        with pytest.raises(OSError):
            await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
        body = await http_get("127.0.0.1", port, await connect_in_netns(pod.netns_path, "127.0.0.1", port))
        assert "only on the pod's loopback" in body


async def test_connect_in_a_missing_netns_names_it() -> None:
    with pytest.raises(OSError, match=r"network namespace /run/netns/emu-no-such-pod does not exist"):
        await connect_in_netns("/run/netns/emu-no-such-pod", "127.0.0.1", 80)


async def test_enter_netns_preexec_runs_a_process_in_the_pod(net: PodNetworks) -> None:
    uid = pod_uid()
    pod = await net.setup(uid, "default", "proc")
    proc = await asyncio.create_subprocess_exec(
        "ip", "-j", "addr", "show", "dev", "eth0", stdout=asyncio.subprocess.PIPE,
        preexec_fn=enter_netns_preexec(pod.netns_path),
    )  # fmt: skip
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    (eth0,) = json.loads(out)
    assert pod.ip in [a["local"] for a in eth0["addr_info"]]


async def test_setup_is_idempotent_and_survives_an_agent_restart(net: PodNetworks) -> None:
    a, b = pod_uid(), pod_uid()
    first = await net.setup(a, "default", "a")
    assert await net.setup(a, "default", "a") == first
    second = await net.setup(b, "default", "b")

    restarted = PodNetworks(net.state_dir, bridge=BRIDGE, netns_prefix=PREFIX)
    await restarted.start(CIDR)
    assert await restarted.pods() == {a: first.ip, b: second.ip}
    assert await restarted.get(a) == first
    assert await restarted.setup(a, "default", "a") == first
    assert await restarted.setup(b, "default", "b") == second
    # A Pod whose veth was lost (deleted by hand) is repaired, keeping its address.
    await run("ip", "link", "del", first.host_veth)
    assert await restarted.setup(a, "default", "a") == first
    assert_one_queue_each_way(first.host_veth, f"{PREFIX}{a}")
    (eth0,) = ip_json("-n", f"{PREFIX}{a}", "addr", "show", "dev", "eth0")
    assert first.ip in [i["local"] for i in eth0["addr_info"]]

    # A stray address on eth0 (a lost state file, or a person) is replaced by the Pod's own.
    await run("ip", "-n", f"{PREFIX}{b}", "addr", "add", CIDR.replace(".0/24", ".250/24"), "dev", "eth0")
    assert await restarted.setup(b, "default", "b") == second
    (eth0,) = ip_json("-n", f"{PREFIX}{b}", "addr", "show", "dev", "eth0")
    assert [i["local"] for i in eth0["addr_info"] if i["family"] == "inet"] == [second.ip]

    assert await restarted.cleanup_orphans(keep={a}) == [b]
    assert f"{PREFIX}{b}" not in netns_list()
    assert second.host_veth not in our_links()
    assert await restarted.pods() == {a: first.ip}


async def test_setup_recreates_a_deleted_bridge(net: PodNetworks, tmp_path: Path) -> None:
    uid = pod_uid()
    pod = await net.setup(uid, "default", "survivor")
    await run("ip", "link", "del", BRIDGE)
    assert await net.setup(uid, "default", "survivor") == pod
    (veth,) = ip_json("link", "show", "dev", pod.host_veth)
    assert veth["master"] == BRIDGE
    root = tmp_path / "www"
    root.mkdir()
    (root / "index.html").write_text("still here\n")
    async with http_server_in(f"{PREFIX}{uid}", pod.ip, 8080, root):
        assert "still here" in await http_get(pod.ip, 8080)


async def test_setup_replaces_an_empty_leftover_netns_file(net: PodNetworks) -> None:
    uid = pod_uid()
    Path(net.netns_path(uid)).touch()  # as if a crash hit between creating the file and mounting on it
    pod = await net.setup(uid, "default", "after-crash")
    (eth0,) = ip_json("-n", f"{PREFIX}{uid}", "addr", "show", "dev", "eth0")
    assert [a["local"] for a in eth0["addr_info"] if a["family"] == "inet"] == [pod.ip]


async def test_teardown_is_idempotent(net: PodNetworks) -> None:
    await net.teardown("never-set-up")
    uid = pod_uid()
    pod = await net.setup(uid, "default", "gone")
    await net.teardown(uid)
    await net.teardown(uid)
    assert f"{PREFIX}{uid}" not in netns_list()
    assert pod.host_veth not in our_links()
    assert await net.pods() == {}


async def test_failed_setup_rolls_back(net: PodNetworks, monkeypatch: pytest.MonkeyPatch) -> None:
    uid = pod_uid()

    def fail_after_the_veth(*args: object) -> None:  # an injected fault once the veth pair exists
        assert net.host_veth(uid) in our_links()
        raise OSError("injected failure")

    monkeypatch.setattr(fresh_pod, "configure_pod_side", fail_after_the_veth)
    with pytest.raises(PodNetworkError, match=rf"pod default/doomed \({uid}\) failed: injected failure"):
        await net.setup(uid, "default", "doomed")
    assert f"{PREFIX}{uid}" not in netns_list()
    assert net.host_veth(uid) not in our_links()
    assert await net.pods() == {}


async def test_fresh_path_error_names_the_step_and_the_thread_comes_home(net: PodNetworks) -> None:
    """A request the kernel refuses (a gateway outside the Pod's subnet) fails with the step named;
    the thread that made the namespace is back in the host's; setup rolls back what it made."""
    uid = pod_uid()
    path = net.netns_path(uid)
    bridge_index = int(Path(f"/sys/class/net/{BRIDGE}/ifindex").read_text())
    host_ns = os.stat("/proc/self/ns/net").st_ino

    thread_ns_after: list[int] = []

    def attempt() -> None:
        try:
            fresh_pod.setup_fresh_pod_sync(path, net.host_veth(uid), bridge_index, "t", "10.9.9.9", 24, "192.0.2.1")
        finally:
            thread_ns_after.append(os.stat("/proc/thread-self/ns/net").st_ino)

    with pytest.raises(fresh_pod.FreshPodError, match=r"default route via 192\.0\.2\.1: Network is unreachable"):
        await asyncio.to_thread(attempt)
    assert thread_ns_after == [host_ns]  # the pooled thread can serve other work
    await net.teardown(uid)  # what the caller does after a failure
    assert f"{PREFIX}{uid}" not in netns_list()
    assert net.host_veth(uid) not in our_links()


async def test_fifty_pods_in_parallel_leave_nothing_behind(net: PodNetworks) -> None:
    uids = [pod_uid() for _ in range(50)]
    started = time.monotonic()
    pods = await asyncio.gather(*(net.setup(u, "load", f"p{i}") for i, u in enumerate(uids)))
    setup_seconds = time.monotonic() - started
    assert len({p.ip for p in pods}) == 50
    assert len([n for n in netns_list() if n.startswith(PREFIX)]) == 50
    assert len(our_links()) == 51  # the bridge and 50 ports

    started = time.monotonic()
    await asyncio.gather(*(net.teardown(u) for u in uids))
    teardown_seconds = time.monotonic() - started
    print(f"\n50 pods in parallel: setup {setup_seconds:.2f}s, teardown {teardown_seconds:.2f}s")

    assert [n for n in netns_list() if n.startswith(PREFIX)] == []
    assert our_links() == [BRIDGE]
    assert not [link for link in ip_json("link", "show") if link["ifname"] in {p.host_veth for p in pods}]
    assert json.loads((net.state_dir / "ipam.json").read_text())["allocations"] == {}


async def test_one_pod_setup_and_teardown_timing(net: PodNetworks) -> None:
    times = []
    for _ in range(5):
        uid = pod_uid()
        t0 = time.monotonic()
        await net.setup(uid, "default", "timed")
        t1 = time.monotonic()
        await net.teardown(uid)
        times.append((t1 - t0, time.monotonic() - t1))
    setup_ms = sorted(t[0] for t in times)[2] * 1000
    teardown_ms = sorted(t[1] for t in times)[2] * 1000
    print(f"\none pod (median of 5): setup {setup_ms:.0f} ms, teardown {teardown_ms:.0f} ms")
    assert setup_ms < 2000 and teardown_ms < 2000


@pytest.mark.skipif(iptables.iptables_binary() is None, reason="iptables is not installed")
async def test_masquerade_rule_added_once_and_removed_by_stop(tmp_path: Path) -> None:
    state = tmp_path / "masq"
    networks = PodNetworks(state, bridge=BRIDGE, masquerade=True, netns_prefix=PREFIX)
    try:
        await networks.start(CIDR)
        await PodNetworks(state, bridge=BRIDGE, masquerade=True, netns_prefix=PREFIX).start(CIDR)  # a restart
        rules = nat_rules()
        assert len(rules) == 1, rules
        assert f"-s {CIDR}" in rules[0] and f"! -o {BRIDGE}" in rules[0] and "-j MASQUERADE" in rules[0]
        assert len(forward_rules()) == 2
        await networks.stop()
        assert nat_rules() == []
        assert BRIDGE in our_links()  # the bridge (and its FORWARD rules) outlive the agent ...
        assert len(forward_rules()) == 2
        await networks.stop(remove_bridge=True)
        assert our_links() == []  # ... unless asked
        assert forward_rules() == []
    finally:
        scrub_host()


async def test_masquerade_off_removes_a_leftover_rule(tmp_path: Path) -> None:
    if iptables.iptables_binary() is None:
        pytest.skip("iptables is not installed")
    try:
        await PodNetworks(tmp_path, bridge=BRIDGE, masquerade=True, netns_prefix=PREFIX).start(CIDR)  # then a crash
        assert len(nat_rules()) == 1
        await PodNetworks(tmp_path, bridge=BRIDGE, masquerade=False, netns_prefix=PREFIX).start(CIDR)
        assert nat_rules() == []
    finally:
        scrub_host()


async def test_two_agents_on_one_host_do_not_interfere(net: PodNetworks, tmp_path: Path) -> None:
    other_bridge, other_prefix = f"emuo{TAG}", f"emuo{TAG}-"
    other_cidr = CIDR.replace(".0/24", ".128/25").replace("10.250.", "10.251.")
    other = PodNetworks(tmp_path / "other", bridge=other_bridge, netns_prefix=other_prefix)
    try:
        await other.start(other_cidr)
        mine, theirs = await net.setup(pod_uid(), "default", "mine"), await other.setup(pod_uid(), "x", "theirs")
        assert theirs.ip.startswith("10.251.")
        assert await net.cleanup_orphans(keep=set()) != []
        assert await other.pods() != {}, "cleanup of one agent must not touch the other's Pods"
        assert other_prefix + next(iter(await other.pods())) in netns_list()
        assert mine.host_veth not in our_links()
        # Same CIDR on another bridge: refused, since both would route it.
        clash = PodNetworks(tmp_path / "clash", bridge=f"emuc{TAG}", netns_prefix=f"emuc{TAG}-")
        with pytest.raises(PodNetworkError, match=r"already routed through interface " + other_bridge):
            await clash.start(other_cidr)
        assert not [link for link in ip_json("link", "show") if link["ifname"] == f"emuc{TAG}"]
    finally:
        with contextlib.suppress(Exception):
            await other.cleanup_orphans(set())
        await other.stop(remove_bridge=True)
        for name in list_netns(other_prefix):
            remove_netns_sync(f"/run/netns/{name}")
        await run("ip", "link", "del", other_bridge, check=False)


@pytest.mark.skipif(iptables.iptables_binary() is None, reason="iptables is not installed")
async def test_pods_talk_through_a_forward_drop_policy(net: PodNetworks, tmp_path: Path) -> None:
    """Hosts with Docker set FORWARD to DROP; with br_netfilter even bridged Pod-to-Pod traffic
    passes that chain. The bridge's FORWARD rules keep Pods reachable."""
    a, b = pod_uid(), pod_uid()
    net_a = await net.setup(a, "default", "server")
    await net.setup(b, "default", "client")
    root = tmp_path / "www"
    root.mkdir()
    (root / "index.html").write_text("through DROP\n")
    rules = forward_rules()
    assert len(rules) == 2 and f"-i {BRIDGE}" in rules[0] + rules[1] and f"-o {BRIDGE}" in rules[0] + rules[1]
    try:
        await run("iptables", "-w", "5", "-P", "FORWARD", "DROP")
        async with http_server_in(f"{PREFIX}{a}", net_a.ip, 8080, root):
            assert await http_get_in(f"{PREFIX}{b}", f"http://{net_a.ip}:8080/index.html") == "through DROP\n"
            # The rules are what lets it through: without them the same request is dropped.
            for rule in iptables.forward_rules(BRIDGE):
                await iptables.remove_rule(rule)
            fetch = ["ip", "netns", "exec", f"{PREFIX}{b}", "timeout", "2", sys.executable, "-c"]
            code = f"import urllib.request; urllib.request.urlopen('http://{net_a.ip}:8080/index.html', timeout=1.5)"
            proc = await asyncio.create_subprocess_exec(*fetch, code, stderr=asyncio.subprocess.DEVNULL)
            assert await proc.wait() != 0
    finally:
        await run("iptables", "-w", "5", "-P", "FORWARD", FORWARD_POLICY)

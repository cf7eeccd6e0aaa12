"""network.ipam: pure Python, on a temporary state file."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from network.ipam import IPAM, CIDRChangedError, IPAMError, IPAMExhaustedError, gateway_of, pod_cidr_from_node

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "ipam.json"


async def test_allocation_order_skips_network_gateway_broadcast(state: Path) -> None:
    ipam = IPAM(state, "10.244.3.0/29")  # hosts .1-.6; .1 is the gateway
    assert ipam.gateway == "10.244.3.1" == gateway_of("10.244.3.0/29")
    assert ipam.prefix_len == 29
    got = [await ipam.allocate(f"pod-{i}") for i in range(5)]
    assert got == ["10.244.3.2", "10.244.3.3", "10.244.3.4", "10.244.3.5", "10.244.3.6"]


async def test_allocate_is_idempotent_per_owner(state: Path) -> None:
    ipam = IPAM(state, "10.244.0.0/24")
    a = await ipam.allocate("uid-a")
    assert await ipam.allocate("uid-a") == a
    b = await ipam.allocate("uid-b")
    assert b != a
    assert await ipam.owners() == {"uid-a": a, "uid-b": b}
    assert await ipam.address_of("uid-b") == b
    assert await ipam.address_of("nobody") is None


async def test_persists_across_instances(state: Path) -> None:
    first = IPAM(state, "10.244.0.0/24")
    a = await first.allocate("uid-a")
    b = await first.allocate("uid-b")
    again = IPAM(state, "10.244.0.0/24")  # an agent restart
    assert await again.owners() == {"uid-a": a, "uid-b": b}
    assert await again.allocate("uid-a") == a
    c = await again.allocate("uid-c")
    assert c not in (a, b)
    on_disk = json.loads(state.read_text())
    assert on_disk["cidr"] == "10.244.0.0/24"
    assert on_disk["allocations"] == {a: "uid-a", b: "uid-b", c: "uid-c"}
    assert not list(state.parent.glob("*.tmp")), "no temp files left behind"


async def test_release_then_reuse_round_robin(state: Path) -> None:
    ipam = IPAM(state, "10.244.3.0/29")  # 5 Pod addresses
    a = await ipam.allocate("a")
    await ipam.allocate("b")
    assert await ipam.release("a") == a
    assert await ipam.release("a") is None  # idempotent
    assert await ipam.release("never-seen") is None
    # Not reused at once: the next address comes after the last one handed out ...
    assert await ipam.allocate("c") == "10.244.3.4"
    for owner in ("d", "e"):
        await ipam.allocate(owner)
    # ... until the range wraps around.
    assert await ipam.allocate("f") == a
    assert set((await ipam.owners()).keys()) == {"b", "c", "d", "e", "f"}


async def test_exhaustion_is_a_clear_error(state: Path) -> None:
    ipam = IPAM(state, "10.244.3.0/30")  # exactly one Pod address
    assert await ipam.allocate("only") == "10.244.3.2"
    with pytest.raises(IPAMExhaustedError, match=r"10\.244\.3\.0/30 is exhausted.*ipam\.json"):
        await ipam.allocate("one-too-many")
    await ipam.release("only")
    assert await ipam.allocate("one-too-many") == "10.244.3.2"


async def test_changed_cidr_refused_while_addresses_are_held(state: Path) -> None:
    old = IPAM(state, "10.244.1.0/24")
    await old.allocate("pod-x")
    new = IPAM(state, "10.244.2.0/24")
    with pytest.raises(CIDRChangedError, match=r"10\.244\.1\.0/24 to 10\.244\.2\.0/24.*ipam\.json.*pod-x"):
        await new.allocate("pod-y")
    await old.release("pod-x")
    # Nothing held any more: the new CIDR starts fresh.
    assert await new.allocate("pod-y") == "10.244.2.2"
    assert json.loads(state.read_text())["cidr"] == "10.244.2.0/24"


@pytest.mark.parametrize(
    ("cidr", "message"),
    [
        ("10.244.0.1/24", "not a valid network"),
        ("fd00::/64", "only IPv4"),
        ("10.244.0.0/31", "too small"),
        ("banana", "not a valid network"),
    ],
)
def test_bad_cidrs(state: Path, cidr: str, message: str) -> None:
    with pytest.raises(IPAMError, match=message):
        IPAM(state, cidr)


async def test_corrupt_state_file_names_the_file(state: Path) -> None:
    state.write_text("{not json")
    with pytest.raises(IPAMError, match=r"ipam\.json is unreadable"):
        await IPAM(state, "10.244.0.0/24").allocate("a")


async def test_concurrent_tasks_in_one_process(state: Path) -> None:
    ipam = IPAM(state, "10.244.0.0/24")
    other = IPAM(state, "10.244.0.0/24")  # a second instance on the same file: only the flock guards it
    ips = await asyncio.gather(*(i.allocate(f"pod-{n}") for n in range(60) for i in [(ipam, other)[n % 2]]))
    assert len(set(ips)) == 60
    assert len(await ipam.owners()) == 60


async def test_concurrent_requests_share_writes_and_fail_alone(state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ipam = IPAM(state, "10.244.5.0/28")  # 13 Pod addresses
    writes = 0
    real_write = ipam._write

    def counting_write(st: Any) -> None:
        nonlocal writes
        writes += 1
        real_write(st)

    monkeypatch.setattr(ipam, "_write", counting_write)
    results = await asyncio.gather(*(ipam.allocate(f"pod-{n}") for n in range(15)), return_exceptions=True)
    ips = [r for r in results if isinstance(r, str)]
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(set(ips)) == 13  # every address once
    assert len(errors) == 2 and all(isinstance(e, IPAMExhaustedError) for e in errors)  # only the two too many
    assert writes < 15  # requests that arrived together went out in shared writes
    assert sorted(json.loads(state.read_text())["allocations"]) == sorted(ips)  # nothing lost
    released = await asyncio.gather(*(ipam.release(f"pod-{n}") for n in range(15)))
    assert sorted(r for r in released if r) == sorted(ips)
    assert await ipam.owners() == {}


def test_concurrent_processes_do_not_double_allocate(state: Path) -> None:
    worker = textwrap.dedent(
        """
        import sys, time
        from pathlib import Path
        from network.ipam import IPAM
        ipam = IPAM(Path(sys.argv[1]), "10.244.0.0/22")
        while time.time() < float(sys.argv[3]):  # all start together, so they really contend
            time.sleep(0.002)
        for i in range(40):
            print(ipam.allocate_sync(f"{sys.argv[2]}-{i}"))
        """
    )
    start_at = time.time() + 1.5
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", worker, str(state), f"proc{n}", str(start_at)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        for n in range(4)
    ]
    outputs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    handed_out = [ip for out in outputs for ip in out]
    assert len(handed_out) == 160
    assert len(set(handed_out)) == 160, "an address was handed out twice"
    on_disk = json.loads(state.read_text())["allocations"]
    assert sorted(on_disk) == sorted(handed_out)


def test_pod_cidr_from_node() -> None:
    assert pod_cidr_from_node({"spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]}}) == "10.244.1.0/24"
    assert pod_cidr_from_node({"spec": {"podCIDRs": ["fd00:1::/64", "10.244.2.0/24"]}}) == "10.244.2.0/24"
    assert pod_cidr_from_node({"spec": {"podCIDR": "10.244.3.0/24"}}) == "10.244.3.0/24"
    assert pod_cidr_from_node({"spec": {}}) is None
    assert pod_cidr_from_node({}) is None

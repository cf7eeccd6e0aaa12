"""Pod IP addresses from the node's pod CIDR, recorded in a JSON state file.

The state file is the ledger of which Pod (owner = Pod UID) holds which address. It is
rewritten atomically (temp file, fsync, rename) under an exclusive flock on a sidecar lock
file, so two processes never hand out the same address, and an agent restart finds every
address still taken. Within one process the async calls are batched: requests that arrive while
the file is being written go out together in the next write (a group commit), so 100 Pods
starting at once cost a few fsyncs, not 100 one after the other.

Addresses go out round-robin after the last one handed out, so an address just released is
not reused at once (stale ARP and conntrack entries of the old Pod would hit the new one).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATE_VERSION = 1


class IPAMError(Exception):
    """The pod CIDR is unusable, exhausted, or the state file disagrees with it."""


class IPAMExhaustedError(IPAMError):
    pass


class CIDRChangedError(IPAMError):
    pass


@dataclass
class _State:
    cidr: str
    allocations: dict[str, str] = field(default_factory=dict)  # ip -> owner
    last: str | None = None  # the address handed out last (round-robin cursor)

    def to_json(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "cidr": self.cidr, "last": self.last, "allocations": self.allocations}


def parse_pod_cidr(cidr: str) -> ipaddress.IPv4Network:
    """The pod CIDR as a network; IPv4 with room for a gateway and at least one Pod."""
    try:
        net = ipaddress.ip_network(cidr, strict=True)
    except ValueError as e:
        raise IPAMError(f"pod CIDR {cidr!r} is not a valid network address: {e}") from e
    if not isinstance(net, ipaddress.IPv4Network):
        raise IPAMError(f"pod CIDR {cidr}: only IPv4 pod CIDRs are supported")
    if net.prefixlen > 30:
        raise IPAMError(f"pod CIDR {cidr} is too small: it needs a gateway and at least one Pod address (/30 or wider)")
    return net


def pod_cidr_from_node(node: dict[str, Any]) -> str | None:
    """The node's IPv4 pod CIDR as the controller-manager assigned it (spec.podCIDRs, or the older
    spec.podCIDR), or None when it has none yet."""
    spec = node.get("spec") or {}
    for cidr in [*(spec.get("podCIDRs") or []), spec.get("podCIDR")]:
        if cidr and ":" not in cidr:
            return str(cidr)
    return None


def gateway_of(cidr: str) -> str:
    """The gateway (bridge) address: the first host address of the CIDR."""
    return str(parse_pod_cidr(cidr).network_address + 1)


class IPAM:
    """Hands out Pod addresses from `cidr`: the network address, the gateway (first host) and the
    broadcast address are never handed out."""

    def __init__(self, state_file: Path, cidr: str):
        self.state_file = Path(state_file)
        self.network = parse_pod_cidr(cidr)
        self.cidr = str(self.network)
        self.gateway = str(self.network.network_address + 1)
        self.prefix_len = self.network.prefixlen
        self._lock_file = self.state_file.with_name(self.state_file.name + ".lock")
        self._lock = asyncio.Lock()
        self._queue: list[tuple[str, str, asyncio.Future[Any]]] = []
        self._drainer: asyncio.Task[None] | None = None

    # --- the async API (use these inside the event loop) -------------------------------------

    async def allocate(self, owner: str) -> str:
        """The address of `owner`; a new one the first time (the same one on every later call)."""
        return await self._submit("allocate", owner)

    async def release(self, owner: str) -> str | None:
        """Free the address of `owner`; returns it, or None when `owner` held none."""
        return await self._submit("release", owner)

    async def owners(self) -> dict[str, str]:
        """owner -> address, for every address handed out."""
        async with self._lock:
            return await asyncio.to_thread(self.owners_sync)

    async def address_of(self, owner: str) -> str | None:
        return await self._submit("get", owner)

    async def claim(self, owner: str) -> tuple[str, bool]:
        """As allocate(), and whether `owner` held the address already (one request, not two)."""
        ip, held = await self._submit("claim", owner)
        return ip, held

    async def _submit(self, op: str, owner: str) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((op, owner, future))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.ensure_future(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                async with self._lock:
                    results = await asyncio.to_thread(self.apply_sync, [(op, owner) for op, owner, _ in batch])
            except Exception as e:  # the file could not be read or written: every request of the batch fails
                results = [(False, e)] * len(batch)
            for (_, _, future), (ok, value) in zip(batch, results, strict=True):
                if not future.done():
                    if ok:
                        future.set_result(value)
                    else:
                        future.set_exception(value)

    # --- the same, blocking (for threads and other processes' tools) --------------------------

    def allocate_sync(self, owner: str) -> str:
        return self._one("allocate", owner)

    def release_sync(self, owner: str) -> str | None:
        return self._one("release", owner)

    def owners_sync(self) -> dict[str, str]:
        with self._locked_state() as state:
            return {owner: ip for ip, owner in state.allocations.items()}

    def _one(self, op: str, owner: str) -> Any:
        ((ok, value),) = self.apply_sync([(op, owner)])
        if not ok:
            raise value
        return value

    def apply_sync(self, ops: list[tuple[str, str]]) -> list[tuple[bool, Any]]:
        """Apply (op, owner) requests in order, op one of get/allocate/claim/release, under one lock
        and with one write; per request (True, result) or (False, IPAMError)."""
        results: list[tuple[bool, Any]] = []
        with self._locked_state() as state:
            changed = False
            by_owner: dict[str, list[str]] = {}
            for ip, holder in state.allocations.items():
                by_owner.setdefault(holder, []).append(ip)
            for op, owner in ops:
                try:
                    if not owner:
                        raise IPAMError("an address owner (the Pod UID) must not be empty")
                    held = by_owner.get(owner, [])
                    if op == "get":
                        results.append((True, held[0] if held else None))
                    elif op in ("allocate", "claim"):
                        had = bool(held)
                        if not held:
                            held = by_owner[owner] = [self._next_free(state)]
                            state.allocations[held[0]] = owner
                            state.last = held[0]
                            changed = True
                        results.append((True, held[0] if op == "allocate" else (held[0], had)))
                    elif op == "release":
                        for ip in by_owner.pop(owner, []):
                            del state.allocations[ip]
                        changed = changed or bool(held)
                        results.append((True, held[0] if held else None))
                    else:
                        raise ValueError(f"unknown IPAM operation {op!r}")
                except IPAMError as e:
                    results.append((False, e))
            if changed:
                self._write(state)
        return results

    # --- internals ----------------------------------------------------------------------------

    def _candidates(self, after: str | None) -> Iterator[str]:
        """Every Pod address once, starting after `after` and wrapping around."""
        first = int(self.network.network_address) + 2  # past the network address and the gateway
        last = int(self.network.broadcast_address) - 1
        count = last - first + 1
        start = first
        if after is not None:
            a = int(ipaddress.IPv4Address(after))
            if first <= a <= last:
                start = a + 1 if a < last else first
        for i in range(count):
            yield str(ipaddress.IPv4Address(first + (start - first + i) % count))

    def _next_free(self, state: _State) -> str:
        for ip in self._candidates(state.last):
            if ip not in state.allocations:
                return ip
        raise IPAMExhaustedError(
            f"pod CIDR {self.cidr} is exhausted: all {len(state.allocations)} addresses are taken "
            f"(state file {self.state_file}); delete Pods on this node or give it a larger pod CIDR"
        )

    @contextlib.contextmanager
    def _locked_state(self) -> Iterator[_State]:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield self._read()
        finally:
            os.close(fd)  # also drops the flock

    def _read(self) -> _State:
        try:
            raw = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return _State(cidr=self.cidr)
        except (OSError, ValueError) as e:
            raise IPAMError(
                f"IPAM state file {self.state_file} is unreadable ({e}); fix or remove it "
                "(removing it forgets which Pods hold which address)"
            ) from e
        try:
            state = _State(cidr=str(raw["cidr"]), allocations=dict(raw["allocations"]), last=raw.get("last"))
        except (KeyError, TypeError, ValueError) as e:
            raise IPAMError(
                f"IPAM state file {self.state_file} has an unexpected layout ({e}); fix or remove it"
            ) from e
        if state.cidr != self.cidr:
            if state.allocations:
                owners = ", ".join(sorted(set(state.allocations.values()))[:5])
                raise CIDRChangedError(
                    f"pod CIDR changed from {state.cidr} to {self.cidr}, but IPAM state file {self.state_file} "
                    f"still has {len(state.allocations)} addresses of the old CIDR (owners: {owners}); "
                    "tear those Pods down (or remove the file once they are gone), then restart"
                )
            return _State(cidr=self.cidr)  # nothing allocated: start fresh with the new CIDR
        return state

    def _write(self, state: _State) -> None:
        tmp = self.state_file.with_name(f".{self.state_file.name}.{os.getpid()}.tmp")
        data = json.dumps(state.to_json(), indent=1, sort_keys=True).encode()
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # Not followed by a directory fsync: a power loss that undid the rename would leave the
        # previous (whole) file, and the namespaces and veths it describes do not survive a power
        # loss either. The file's own fsync stays: a torn file would stop every Pod's network.
        os.rename(tmp, self.state_file)

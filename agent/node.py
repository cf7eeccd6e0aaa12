"""Registers this host as a Node and keeps its status current."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from agent.config import AgentConfig
from agent.informer import Informer
from agent.kube import STRATEGIC_MERGE_PATCH, ApiError, Kube, sleep_backoff
from agent.lease import RENEW_TIMEOUT, NodeLease
from agent.node_status import (
    NodeFacts,
    conditions,
    node_labels,
    node_object,
    node_status,
    node_taints,
    reservation_warnings,
    slim_node,
    status_fingerprint,
)
from agent.status_reconcile import newer_or_same, node_status_drifted
from common.logfmt import kv

log = logging.getLogger(__name__)

STATUS_INTERVAL = 10.0  # the shortest wait between two looks when nothing woke the loop
STATUS_MAX_SILENCE = 300.0  # post at least every 5 min otherwise
STATUS_RETRY = 2.0  # after a failed post


def explain(exc: ApiError, node: str) -> str:
    """One line a user can act on."""
    if exc.unreachable:
        return f"API server unreachable ({exc.message}); retrying"
    if exc.status == 401:
        return "API server rejected the credentials (401 Unauthorized): check the kubeconfig's certificate or token"
    if exc.forbidden:
        return (
            f"API server forbids this for node {node} ({exc.message}): use a node identity "
            f"(CN system:node:{node}, O system:nodes) or grant the permission; retrying"
        )
    return exc.describe()


class NodeAgent:
    def __init__(
        self,
        kube: Kube,
        facts: NodeFacts,
        *,
        own_watch: bool = True,
        spread: bool = False,
        heartbeat: Kube | None = None,
    ):
        """`own_watch` False: the Node's watch events come from outside (the fleet's one Node watch
        calls node_seen). `spread`: heartbeats start at a random phase, and the first periodic
        status post at a random point of its 5 min, so a fleet registered in a burst does not
        write in bursts ever after. `heartbeat`: the client for Lease renewals and status posts
        (a fleet's small pool, Kube.sibling); by default `kube`."""
        self.kube = kube
        self.heartbeat = heartbeat or kube
        self.spread = spread
        # None: healthy. "not-ready": posts Ready=False. "silent": no Lease renewals and no status
        # posts, so the node lifecycle controller marks the node Unknown (`kubelet-emu fleet ctl`).
        self.health: str | None = None
        self.facts = facts
        self.name = facts.name
        self.path = f"/api/v1/nodes/{facts.name}"
        self._node: dict[str, Any] | None = None  # slimmed: see `node`
        self.lease: NodeLease | None = None
        self.registered = asyncio.Event()
        self._last_fingerprint: Any = None
        self._labels_dirty = False
        self.wakeup = asyncio.Event()  # post now instead of at the next tick
        self._last_post = 0.0
        # Called when the API server answers again after an outage (watches retry at once).
        self.recovery_hooks: list[Callable[[], None]] = []
        self.shared_recovery: Callable[[], None] | None = None
        # The Node as the API server holds it: a change by someone else (the node lifecycle
        # controller's Ready=Unknown) is seen here and corrected, as the kubelet's status loop does.
        self.watch: Informer | None = None
        if own_watch:
            self.watch = Informer(
                kube,
                "/api/v1/nodes",
                field_selector=f"metadata.name={self.name}",
                on_upsert=self.node_seen,
                on_delete=self.node_deleted,
                name="node",
                keep_objects=False,
            )
            self.recovery_hooks.append(self.watch.retry_now)
        self._warn_reservations()

    def _warn_reservations(self) -> None:
        for warning in reservation_warnings(self.facts):
            log.warning(warning, extra=kv(node=self.name))

    async def run(self) -> None:
        """Heartbeats; call register() first."""
        self.lease = NodeLease(
            self.heartbeat, self.name, self.node["metadata"]["uid"], on_recovered=self.api_recovered, spread=self.spread
        )
        self.lease.paused = lambda: self.health == "silent"
        if self.spread:
            # The status was posted with the Node a moment ago: the next periodic post is due at a
            # random point of the next 5 min rather than now for every node at once.
            self._last_post = time.monotonic() - random.uniform(0, STATUS_MAX_SILENCE)
            self._last_fingerprint = status_fingerprint(self._wanted_status(datetime.now(UTC)))
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.lease.run(), name="lease")
            tg.create_task(self._status_loop(), name="node-status")
            if self.watch is not None:
                tg.create_task(self.watch.run(), name="node-watch")

    def api_recovered(self) -> None:
        """The heartbeat works again after failing: post the status with it, and end the backoff
        sleeps of the watches. Connections made before the outage may be half dead (a dropped
        network never says so), so they are dropped and new ones made, as the kubelet does."""
        self._last_fingerprint = None
        self.wakeup.set()
        if self.shared_recovery is not None:
            self.shared_recovery()  # a fleet: its one connection pool and watches, debounced there
            return
        self.kube.reset_connections()
        for hook in self.recovery_hooks:
            hook()

    @property
    def node(self) -> dict[str, Any] | None:
        """The Node as last seen: what admission and the status loop read (labels, taints, spec,
        conditions). Kept slim: a whole Node (managedFields, images, nodeInfo) is ~10 KiB, which a
        fleet of 1000 nodes would hold 1000 times."""
        return self._node

    @node.setter
    def node(self, node: dict[str, Any] | None) -> None:
        self._node = slim_node(node) if node is not None else None

    def node_seen(self, node: dict[str, Any]) -> None:
        if not newer_or_same(node, self.node):
            return  # an echo older than the answer to our last post
        self.node = node
        if self.health != "silent" and node_status_drifted(node, conditions(datetime.now(UTC), ready=self.ready)):
            self.wakeup.set()  # post_status sees the difference and posts ours again

    @property
    def ready(self) -> bool:
        return self.health != "not-ready"

    def set_health(self, health: str | None) -> None:
        """`kubelet-emu fleet ctl`: make this node NotReady (or silent) on purpose, or healthy again."""
        if health == self.health:
            return
        log.info("node health set", extra=kv(node=self.name, health=health or "ok"))
        self.health = health
        self._last_fingerprint = None
        self.wakeup.set()

    def _wanted_status(self, now: datetime, facts: NodeFacts | None = None) -> dict[str, Any]:
        previous = (self.node or {}).get("status", {}).get("conditions") or []
        return node_status(facts or self.facts, now, previous, self.ready)

    async def reread(self) -> None:
        """Read the Node from the API server now (its watch may lag behind a change a moment old)."""
        try:
            node = await self.kube.get(self.path)
        except ApiError as exc:
            log.warning("cannot read the node", extra=kv(node=self.name, error=exc.describe()))
            return
        self.node_seen(node)

    def node_deleted(self, _: dict[str, Any]) -> None:
        log.warning("the Node object was deleted; restart the agent to register it again", extra=kv(node=self.name))

    def set_config(self, config: AgentConfig) -> None:
        """A reloaded configuration: new handler labels and runtimeHandlers go out at once."""
        self.facts = dataclasses.replace(self.facts, config=config)
        self._warn_reservations()
        self._last_fingerprint = None
        self._labels_dirty = True
        self.wakeup.set()

    async def register(self) -> None:
        """Create the Node, or adopt an existing one; retry with backoff until it works."""
        attempt = 0
        last_error = ""
        while True:
            try:
                self.node = await self._register_once()
                self.registered.set()
                log.info("node registered", extra=kv(node=self.name, uid=self.node["metadata"]["uid"]))
                return
            except ApiError as exc:
                message = explain(exc, self.name)
                if message != last_error:  # say it once, not on every retry
                    log.error(message, extra=kv(node=self.name))
                    last_error = message
            await sleep_backoff(attempt)
            attempt += 1

    async def _register_once(self) -> dict[str, Any]:
        now = datetime.now(UTC)
        try:
            return await self.kube.create("/api/v1/nodes", node_object(self.facts, now))
        except ApiError as exc:
            if exc.conflict and exc.reason == "AlreadyExists":
                return await self._adopt()
            raise

    async def _adopt(self) -> dict[str, Any]:
        existing = await self.kube.get(self.path)
        wanted = node_labels(self.facts)
        labels = existing["metadata"].get("labels") or {}
        missing = {k: v for k, v in wanted.items() if labels.get(k) != v}
        if missing:
            existing = await self.kube.patch(self.path, {"metadata": {"labels": missing}})
        current_taints = {(t["key"], t.get("value", ""), t["effect"]) for t in existing["spec"].get("taints") or []}
        for taint in node_taints(self.facts):
            if (taint["key"], taint.get("value", ""), taint["effect"]) not in current_taints:
                # NodeRestriction forbids a node to change its own taints after creation.
                log.warning(
                    "configured taint is missing on the existing node; an admin must add it "
                    "(or delete the Node so the agent re-creates it)",
                    extra=kv(node=self.name, taint=taint["key"]),
                )
        log.info("adopting existing node", extra=kv(node=self.name))
        return existing

    async def post_status(self, force: bool = False) -> bool:
        """Patch status/ when it changed, or when the last post is too old. Returns whether it posted."""
        if self._labels_dirty:
            self._labels_dirty = False  # cleared first: a reload during _adopt() stays pending
            try:
                self.node = await self._adopt()
            except BaseException:
                self._labels_dirty = True
                raise
        now = datetime.now(UTC)
        # The facts this post sends: a reload during the PATCH must not count as posted.
        facts = self.facts
        status = self._wanted_status(now, facts)
        fingerprint = status_fingerprint(status)
        silent_for = time.monotonic() - self._last_post
        drifted = node_status_drifted(self.node, status["conditions"])
        if not force and not drifted and fingerprint == self._last_fingerprint and silent_for < STATUS_MAX_SILENCE:
            return False
        if drifted and self._last_fingerprint is not None:
            held = {c.get("type"): c.get("status") for c in (self.node or {}).get("status", {}).get("conditions") or ()}
            log.info(
                "node status changed by someone else; posting it again",
                extra=kv(node=self.name, ready=held.get("Ready")),
            )
        # The heartbeat's timeout, not the default 30 s: a post stuck on a dead connection is retried.
        self.node = await self.heartbeat.request(
            "PATCH",
            self.path + "/status",
            body={"status": status},
            content_type=STRATEGIC_MERGE_PATCH,
            timeout=RENEW_TIMEOUT,
        )
        self._last_fingerprint = status_fingerprint(
            node_status(facts, now, self.node["status"]["conditions"], self.ready)
        )
        self._last_post = time.monotonic()
        return True

    async def _status_loop(self) -> None:
        failing = ""
        while True:
            self.wakeup.clear()
            try:
                if self.health != "silent":
                    await self.post_status()
                if failing:
                    log.info("node status posted again", extra=kv(node=self.name))
                failing = ""
            except ApiError as exc:
                message = explain(exc, self.name)
                if message != failing:
                    log.warning("cannot post node status: " + message, extra=kv(node=self.name))
                failing = message
                self._last_fingerprint = None  # post as soon as the API server is back
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wakeup.wait(), self._status_wait(failing))

    def _status_wait(self, failing: str) -> float:
        """Seconds until the status loop looks again. The status is made of the node's facts and
        health only, and every change of those (a reload, `fleet ctl`, a drift seen on the Node)
        sets `wakeup`; so between changes the loop sleeps until the periodic post is due instead
        of rebuilding the status every 10 s (a fleet of 1000 nodes did that 100 times a second)."""
        if failing:
            return STATUS_RETRY
        if self.health == "silent":
            return STATUS_INTERVAL
        return max(1.0, self._last_post + STATUS_MAX_SILENCE - time.monotonic() + 0.05)

"""Housekeeping: remove what belongs to no current Pod, as the kubelet's housekeeping and
container garbage collection do.

A Pod worker removes everything of the Pod it deletes at once; what it cannot see is what happened
while the agent was down or died half-way: Pods deleted (gracefully or with --force) meanwhile,
a removal that failed. Each backend lists what it keeps on disk (runtimes/base.py
list_sandboxes: Pod UID, namespace and name as recorded); every record whose Pod has no worker is
purged (processes and shims killed, cgroups, network namespace, state directory removed) and
logged once.

When: right after the first Pod list is synced (so every Pod bound to the node has a worker),
then every HOUSEKEEPING_INTERVAL seconds. The kubelet runs its container GC every minute; the
same interval fits here, because normal deletions never wait for the sweep (the worker purges at
once) and a round reads one small file per Pod directory, which adds up on nodes with thousands
of Pods.

Cgroups, shims and namespaces are only removed through a record of this agent's state directory:
several agents may share a host and a cgroup root (tests, the demo), and a cgroup or namespace
without a record of ours may be another agent's.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from agent.logs import kv
from runtimes.base import Backend, SandboxRecord

if TYPE_CHECKING:
    from agent.pods import PodController

log = logging.getLogger(__name__)

HOUSEKEEPING_INTERVAL = 60.0


class Housekeeping:
    def __init__(self, pods: PodController, interval: float = HOUSEKEEPING_INTERVAL):
        self.pods = pods
        self.interval = interval
        self.removed = 0  # Pods whose leftovers were removed, over the agent's life
        self._failed: set[str] = set()  # UIDs whose removal failed and was reported (reported once)

    async def run(self) -> None:
        await self.pods.pods.synced.wait()
        while True:
            try:
                await self.sweep()
            except Exception:
                log.exception("housekeeping round failed; trying again next round")
            await asyncio.sleep(self.interval)

    def _backends(self) -> list[Backend]:
        backends = []
        for name in sorted(self.pods.config.handlers):
            try:
                backends.append(self.pods.backend_for(name))
            except Exception as exc:  # a plugin that cannot be made: its Pods fail on their own
                log.debug("housekeeping skips handler", extra=kv(handler=name, error=str(exc)))
        return backends

    async def sweep(self) -> list[SandboxRecord]:
        """One round; returns the records purged."""
        found: list[tuple[Backend, SandboxRecord]] = []
        for backend in self._backends():
            found += [(backend, record) for record in await backend.list_sandboxes()]
        # Read after the listing: a sandbox made meanwhile belongs to a worker already in here.
        current = set(self.pods.workers)
        purged = []
        for backend, record in found:
            if record.pod_uid in current:
                continue
            try:
                killed = await backend.purge_sandbox(record)
            except Exception as exc:
                if record.pod_uid not in self._failed:
                    self._failed.add(record.pod_uid)
                    log.warning(
                        "cannot remove the leftovers of a pod no longer on this node; trying again next round",
                        extra=kv(**_fields(record), error=str(exc)),
                    )
                continue
            self._failed.discard(record.pod_uid)
            self.removed += 1
            purged.append(record)
            log.info(
                "removed the leftovers of a pod no longer on this node",
                extra=kv(**_fields(record), processes_killed=killed),
            )
        network = self.pods.network
        if network is not None and network.ready.is_set():
            await network.cleanup_orphans(set(self.pods.workers))
        return purged


def _fields(record: SandboxRecord) -> dict[str, str]:
    return {
        "pod_uid": record.pod_uid,
        "namespace": record.namespace,
        "name": record.name,
        "handler": record.handler,
        "path": record.path,
    }

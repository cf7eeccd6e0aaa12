"""Pod cgroups through systemd (cgroup_driver = "systemd"): slices and one delegated scope per Pod.

Set up, as the kubelet's systemd driver does:
  1. the root and QoS slices (kubepods.slice, kubepods-burstable.slice, ...), once each;
  2. the Pod's slice (kubepods-burstable-pod<uid_>.slice) with the Pod's limits as unit properties,
     then the same limits written to the cgroup files (runc's Set does both: systemd rounds a CPU
     quota to 10 ms per second, the file keeps the kubelet's exact value);
  3. the Pod's container scope (<pod slice stem>-containers.scope, Delegate=yes) around a holder
     process (`sleep infinity`, moved to the scope's `holder` leaf): a scope needs a process to
     exist and lives as long as one is inside, so the containers' cgroups (made by the agent below
     the scope, which systemd then leaves alone) survive container restarts, with their OOM counts.
Torn down: every process killed (cgroup.kill), the scope and the slice stopped, leftovers removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from cgroups.detect import CgroupError
from cgroups.resources import ResourceConfig
from cgroups.systemd_units import (
    expand_slice,
    resource_properties,
    scope_for,
    scope_properties,
    slice_of_path,
    slice_properties,
)

if TYPE_CHECKING:
    from cgroups.systemd_bus import Systemd

HOLDER = "holder"  # the leaf under the Pod's scope the holder process lives in
_HOLDER_COMMAND = "sleep infinity </dev/null >/dev/null 2>&1 & echo $!"


def _pod_name(pod: Mapping[str, Any]) -> str:
    meta = pod.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


class SystemdDriver:
    """The systemd half of a CgroupManager (`manager`: its paths, modes and file writes)."""

    def __init__(self, manager: Any, systemd: Systemd | None = None):
        self.manager = manager
        if systemd is None:
            # Imported here: dbus-fast is ~10 MiB that hosts on the cgroupfs driver never need.
            from cgroups.systemd_bus import Systemd

            systemd = Systemd()
        self.systemd = systemd
        self._parents: set[str] = set()  # root/QoS slices known to be running
        self._lock = asyncio.Lock()

    @property
    def _version(self) -> int:
        return int(self.manager.mode.version)

    async def _ensure_parents(self, pod_slice: str) -> None:
        path = expand_slice(pod_slice).split("/")
        async with self._lock:  # many Pods start at once: each parent is started once
            for unit in path[:-1]:
                if unit in self._parents:
                    continue
                what = "Pods" if unit == path[0] else f"{unit.removesuffix('.slice').rsplit('-', 1)[-1]} Pods"
                properties = slice_properties(unit, f"kubelet-emu: {what}", self._version)
                await self.systemd.start_transient_unit(unit, properties)
                self._parents.add(unit)

    async def setup_pod(self, pod: Mapping[str, Any], config: ResourceConfig) -> None:
        relative = self.manager.pod_path(pod)
        pod_slice = slice_of_path(relative)
        await self._ensure_parents(pod_slice)
        resources = resource_properties(config, self._version, await self.systemd.version())
        description = f"kubelet-emu: Pod {_pod_name(pod)} ({(pod.get('metadata') or {}).get('uid', '')})"
        started = await self.systemd.start_transient_unit(
            pod_slice, [*slice_properties(pod_slice, description, self._version), *resources]
        )
        if not started:  # it was there (agent restart, resize): bring its limits up to date
            await self.systemd.set_unit_properties(pod_slice, resources)
        await asyncio.to_thread(self.manager.write_limits, relative, config)
        await self._ensure_scope(pod, relative, pod_slice)

    async def update_pod(self, pod: Mapping[str, Any], config: ResourceConfig) -> None:
        """New limits for a running Pod (in-place resize)."""
        relative = self.manager.pod_path(pod)
        resources = resource_properties(config, self._version, await self.systemd.version())
        await self.systemd.set_unit_properties(slice_of_path(relative), resources)
        await asyncio.to_thread(self.manager.write_limits, relative, config)

    async def _ensure_scope(self, pod: Mapping[str, Any], relative: str, pod_slice: str) -> None:
        scope = scope_for(pod_slice)
        scope_rel = f"{relative}/{scope}"
        if all(os.path.isdir(path) for path in self.manager.absolute_paths(scope_rel)):
            return
        holder = await self._spawn_holder()
        try:
            description = f"kubelet-emu: containers of Pod {_pod_name(pod)}"
            properties = scope_properties(pod_slice, description, holder, self._version)
            await self.systemd.start_transient_unit(scope, properties)
            await asyncio.to_thread(self._move_holder, f"{scope_rel}/{HOLDER}", holder)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.kill(holder, signal.SIGKILL)
            raise

    @staticmethod
    async def _spawn_holder() -> int:
        # Through a shell that exits at once: the holder is reparented to init, which reaps it,
        # and it is in no session of the agent's, so it outlives an agent restart.
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", _HOLDER_COMMAND, stdout=asyncio.subprocess.PIPE, start_new_session=True
        )
        out, _ = await proc.communicate()
        try:
            return int(out.decode().strip())
        except ValueError as exc:
            raise CgroupError(f"cannot start the Pod scope's holder process (`sleep infinity`): {out!r}") from exc

    def _move_holder(self, holder_rel: str, pid: int) -> None:
        # v2 lets only leaves hold processes: out of the scope's own cgroup, so that the scope may
        # enable controllers for the containers' cgroups.
        for path in self.manager.absolute_paths(holder_rel):
            os.makedirs(path, exist_ok=True)
        self.manager.add_process(holder_rel, pid)

    async def remove_pod(self, relative: str) -> None:
        pod_slice = slice_of_path(relative)
        await asyncio.to_thread(self.manager.kill, relative)
        await self.systemd.stop_unit(scope_for(pod_slice))
        await self.systemd.stop_unit(pod_slice)
        # systemd removes its own cgroups; what the agent made below the scope may be left.
        await asyncio.to_thread(self.manager.remove, relative, False)

    def unit_names(self, relative: str) -> list[str]:
        """The units behind a Pod cgroup path, for `kubelet-emu cgroups`."""
        pod_slice = slice_of_path(relative)
        return [pod_slice, scope_for(pod_slice)]

    async def close(self) -> None:
        await self.systemd.close()

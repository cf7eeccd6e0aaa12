"""The emulated backend: nothing runs, the lifecycle is played from the Pod spec.

Containers start at once and stay running, unless the Pod's annotations ask
them to exit after some time with some code, which lets Jobs complete and
crash loops be played at scale:

    emulated.kubelet-emu.io/exit-after: "2s"        every app container exits after 2 s
    emulated.kubelet-emu.io/exit-code: "1"          ... with this code (default 0)
    emulated.kubelet-emu.io/exit-after.<container>  per-container overrides
    emulated.kubelet-emu.io/exit-code.<container>

Init containers exit at once with code 0 unless annotated the same way. The handler's profile
(profile.py, `[runtimes.NAME.options]`) sets the defaults for every Pod of the handler: start
latency, image pull time, failures, run time and usage.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Mapping
from datetime import UTC, datetime

from runtimes.base import (
    JSON,
    Backend,
    BackendContext,
    ContainerExit,
    ContainerHandle,
    CreateContainerConfigError,
    Sandbox,
    SandboxRecord,
)
from runtimes.emulated.profile import Profile, parse_duration, parse_profile
from runtimes.handler import Handler

PREFIX = "emulated.kubelet-emu.io/"


def _annotation(pod: JSON, key: str, container: str) -> str | None:
    annotations = pod.get("metadata", {}).get("annotations") or {}
    return annotations.get(f"{PREFIX}{key}.{container}", annotations.get(PREFIX + key))


def planned_exit(
    pod: JSON, container: JSON, init: bool, default_after: float | None = None, default_code: int = 0
) -> tuple[float | None, int]:
    """(seconds until exit or None for never, exit code) as the annotations ask; for an app
    container without them, the handler profile's defaults."""
    name = container["name"]
    after = _annotation(pod, "exit-after", name)
    code = _annotation(pod, "exit-code", name)
    try:
        seconds = parse_duration(after) if after is not None else (0.0 if init else default_after)
        exit_code = int(code) if code is not None else (0 if init else default_code)
    except ValueError as exc:
        raise CreateContainerConfigError(f"annotation {PREFIX}exit-after/exit-code: {exc}") from exc
    return seconds, exit_code


class EmulatedBackend(Backend):
    name = "emulated"
    runs_probes = False

    _ids = itertools.count(1)

    def __init__(self, handler: Handler, context: BackendContext):
        super().__init__(handler, context)
        self.profile: Profile = parse_profile(handler.options)  # validated when the config was read
        self._rng = random.Random(self.profile.seed)
        self._pulled: set[str] = set()  # images "on the node", when pulls take time

    @property
    def final_status_write(self) -> bool:
        return self.profile.final_status

    async def resize(
        self, sandbox: Sandbox, before: JSON, after: JSON, containers: Mapping[str, ContainerHandle]
    ) -> None:
        """Nothing to apply: an emulated Pod has no cgroups; the resize is state (status) only."""

    async def create_sandbox(self, pod: JSON) -> Sandbox:
        if self.profile.start_latency is not None:  # the sandbox (a VM, say) takes this long to come up
            await asyncio.sleep(self.profile.start_latency.draw(self._rng))
        return Sandbox(id=f"sandbox-{pod['metadata']['uid']}", pod_uid=pod["metadata"]["uid"])

    async def remove_sandbox(self, sandbox: Sandbox, pod: JSON) -> None:
        return None

    # Nothing on disk: nothing to list, purge or adopt from records (the API status is all there is).

    async def list_sandboxes(self) -> list[SandboxRecord]:
        return []

    async def has_sandbox(self, pod: JSON) -> bool:
        return False

    async def create_container(
        self, sandbox: Sandbox, pod: JSON, container: JSON, restart_count: int
    ) -> ContainerHandle:
        if self.profile.image_pull is not None:
            await self._pull(container)
        return self._handle(pod, container, restart_count, fresh=True)

    def _handle(self, pod: JSON, container: JSON, restart_count: int, fresh: bool) -> ContainerHandle:
        """A new container, or (not `fresh`) one already running that is taken over: no failure
        is drawn for that one, it started well."""
        init = any(c["name"] == container["name"] for c in pod["spec"].get("initContainers") or [])
        profile = self.profile
        default_after, default_code = None, 0
        if profile.run_time is not None:
            default_after = profile.run_time.draw(self._rng)
        if fresh and profile.failure_probability and self._rng.random() < profile.failure_probability:
            default_after, default_code = 0.0, profile.failure_exit_code
        seconds, code = planned_exit(
            pod, container, init and container.get("restartPolicy") != "Always", default_after, default_code
        )
        handle = ContainerHandle(
            # The handler's name leads the id, so `kubectl get pod -o yaml` shows which handler ran it.
            id=f"{self.handler.name}-{pod['metadata']['uid'][:8]}-{container['name']}-{restart_count}-{next(self._ids)}",
            name=container["name"],
            image=container.get("image", ""),
        )
        # A future, not an asyncio.Event (which carries a deque): one per container, thousands of them.
        stopped = asyncio.get_running_loop().create_future()
        handle.extra.update(exit_after=seconds, exit_code=code, stopped=stopped, stop_code=None)
        if profile.usage is not None and not init:
            handle.extra["usage"] = profile.usage  # (millicores, bytes) for /stats/summary
        return handle

    async def create_ephemeral_container(
        self, sandbox: Sandbox, pod: JSON, container: JSON, target: ContainerHandle | None
    ) -> ContainerHandle:
        """Reported running, like any emulated container (the exit-after annotations apply by name)."""
        return await self.create_container(sandbox, pod, container, 0)

    async def _pull(self, container: JSON) -> None:
        """Pull time for an image not on the "node" yet, or every time with imagePullPolicy Always."""
        assert self.profile.image_pull is not None
        image = container.get("image", "")
        if image in self._pulled and container.get("imagePullPolicy") != "Always":
            return
        await asyncio.sleep(self.profile.image_pull.draw(self._rng))
        self._pulled.add(image)

    async def start_container(self, handle: ContainerHandle) -> None:
        handle.started_at = datetime.now(UTC)

    async def wait_container(self, handle: ContainerHandle) -> ContainerExit:
        stopped: asyncio.Future[None] = handle.extra["stopped"]
        seconds = handle.extra["exit_after"]
        if seconds is None:
            await asyncio.shield(stopped)
        elif seconds > 0:
            await asyncio.wait([stopped], timeout=seconds)
        if stopped.done():
            # Stopped by the agent: a well-behaved process exits on SIGTERM.
            return ContainerExit(exit_code=handle.extra["stop_code"], finished_at=handle.extra["stopped_at"])
        return ContainerExit(exit_code=handle.extra["exit_code"], finished_at=datetime.now(UTC))

    async def stop_container(self, handle: ContainerHandle, grace_seconds: float) -> None:
        stopped: asyncio.Future[None] = handle.extra["stopped"]
        if not stopped.done():
            handle.extra.update(stop_code=143, stopped_at=datetime.now(UTC))  # 128 + SIGTERM
            stopped.set_result(None)

    async def remove_container(self, handle: ContainerHandle) -> None:
        return None

    async def adopt_container(
        self, sandbox: Sandbox, pod: JSON, container: JSON, status: JSON
    ) -> ContainerHandle | None:
        """Nothing really ran, so a restarted agent simply carries on where the status says."""
        running = (status.get("state") or {}).get("running")
        if not running:
            return None
        handle = self._handle(pod, container, status.get("restartCount", 0), fresh=False)
        handle.id = status["containerID"].split("://", 1)[1]
        handle.started_at = datetime.fromisoformat(running["startedAt"].replace("Z", "+00:00"))
        if handle.extra["exit_after"] is not None:
            elapsed = (datetime.now(UTC) - handle.started_at).total_seconds()
            handle.extra["exit_after"] = max(0.0, handle.extra["exit_after"] - elapsed)
        return handle

"""The interface every runtime backend implements, and the errors it may raise.

A backend runs the containers of Pods for one runtime handler. The agent
drives it: one sandbox per Pod, then containers inside it. Backends speak in
plain dicts for Pod and container specs (the API server's JSON) and in the
small dataclasses below for what they report back.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

from runtimes.handler import Handler

JSON = dict[str, Any]


# --- errors: each maps to the waiting/terminated reason the kubelet would show -----------------


class BackendError(Exception):
    """A runtime operation failed. `reason` is what the container status shows."""

    reason: ClassVar[str] = "RunContainerError"


class SandboxError(BackendError):
    reason = "FailedCreatePodSandBox"


class CreateContainerConfigError(BackendError):
    """The Pod spec cannot be turned into a container (a missing Secret key, say)."""

    reason = "CreateContainerConfigError"


class CreateContainerError(BackendError):
    reason = "CreateContainerError"


class RunContainerError(BackendError):
    reason = "RunContainerError"


class ImagePullError(BackendError):
    reason = "ErrImagePull"


class InvalidImageNameError(BackendError):
    reason = "InvalidImageName"


class ResizeError(BackendError):
    """A resize could not be applied yet (a memory limit below current usage, a failed write):
    the Pod stays PodResizeInProgress with this message and the agent tries again."""

    reason = "Error"


class NotSupportedError(BackendError):
    """The backend does not offer this optional operation (exec on the emulated backend, say)."""

    reason = "NotSupported"


# --- what backends report ----------------------------------------------------------------------


@dataclass(frozen=True)
class Sandbox:
    id: str
    pod_uid: str
    ips: tuple[str, ...] = ()  # empty: the Pod uses the host's IP
    netns: str | None = None  # path of the Pod's network namespace (/run/netns/...); None: the host's


@dataclass(frozen=True)
class ContainerExit:
    exit_code: int
    finished_at: datetime
    signal: int | None = None
    reason: str | None = None  # None: the agent derives Completed/Error from the code; or "OOMKilled"
    message: str | None = None


@dataclass(frozen=True)
class SandboxRecord:
    """What a backend keeps on disk about one Pod's sandbox, readable without the Pod object: the
    agent's housekeeping lists these to find what belongs to no current Pod (deleted while the
    agent was down, say) and hands them back to purge_sandbox()."""

    pod_uid: str
    namespace: str
    name: str
    handler: str
    path: str = ""  # the Pod's state directory, when the backend has one
    cgroup: str | None = None  # the Pod's cgroup (relative to the hierarchy roots), when it has one


@dataclass(slots=True)
class ContainerHandle:
    """A created container. `id` is unique within the backend; `started_at` is set by start()."""

    id: str
    name: str
    image: str
    image_id: str = ""
    started_at: datetime | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class StreamingProcess(abc.ABC):
    """A process started by exec (or a container attached to), as the streaming server sees it.
    With a TTY, stdout carries both streams and stderr is None."""

    stdin: Any = None  # asyncio.StreamWriter, or None when the caller asked for no stdin
    stdout: Any = None  # asyncio.StreamReader
    stderr: Any = None  # asyncio.StreamReader, or None with a TTY

    @abc.abstractmethod
    async def wait(self) -> int:
        """The exit code (128 + signal when killed by a signal)."""

    async def resize(self, width: int, height: int) -> None:  # noqa: B027 - no TTY: nothing to do
        """Set the TTY's window size."""

    @abc.abstractmethod
    async def kill(self) -> None:
        """Stop it (the client went away)."""


Lookup = Callable[[str, str, str], Awaitable[JSON | None]]  # (kind, namespace, name) -> object or None
ServiceLister = Callable[[str], Awaitable[list[JSON]]]  # namespace -> its Services


@dataclass(frozen=True)
class BackendContext:
    """What the agent hands every backend."""

    node_name: str
    state_dir: Path  # the backend's own directory under the agent's state dir
    pods_dir: Path  # <state>/pods: per-Pod directories with container logs (shared by all backends)
    host_ip: str = "127.0.0.1"
    lookup: Lookup | None = None  # reads ConfigMaps and Secrets for container environments
    cgroups: Any = None  # cgroups.manager.CgroupManager, or None when cgroups are unavailable
    pod_pids_limit: int = -1
    log_max_size: int = 10 * 1024 * 1024
    log_max_files: int = 5
    images: Any = None  # images.service.ImageService: pulls and unpacks images (oci backend)
    network: Any = None  # network.pods.PodNetworks: per-Pod namespaces and IPs, or None when off
    node_credentials: tuple[str, ...] = ()  # files and directories Pods must not see (process backend)
    # The node's allocatable resources now (the downward API's default for a limit a container
    # does not set), and the Services whose variables a container's environment gets.
    allocatable: Callable[[], Mapping[str, str]] | None = None
    services: ServiceLister | None = None


class Backend(abc.ABC):
    """One handler's backend. Subclasses set `name`, the containerID scheme (`<name>://<id>`)."""

    name: ClassVar[str]
    runs_probes: ClassVar[bool] = True  # the emulated backend has nothing to probe
    uses_images: ClassVar[bool] = False  # True: the agent pulls each container's image before creating it
    uses_pod_network: ClassVar[bool] = False  # True: its Pods may get network namespaces (setup_pod_network)

    def __init__(self, handler: Handler, context: BackendContext):
        self.handler = handler
        self.context = context

    @property
    def final_status_write(self) -> bool:
        """False: a deleted Pod goes without its terminated status written first (the emulated
        backend's `final_status = false`, for scale runs). The kubelet always writes it."""
        return True

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release backend-wide resources when the agent stops (running containers stay)."""

    @abc.abstractmethod
    async def create_sandbox(self, pod: JSON) -> Sandbox: ...

    # --- pod networking, for backends whose Pods get their own network namespace -------------------

    def wants_pod_network(self, pod: JSON) -> bool:
        """A namespace and IP of its own, unless the Pod uses the host's network, networking is off
        on this node, or the handler says `pod_network = false`."""
        if self.context.network is None or (pod.get("spec") or {}).get("hostNetwork"):
            return False
        return bool(self.handler.options.get("pod_network", True))

    async def setup_pod_network(self, pod: JSON) -> tuple[tuple[str, ...], str | None]:
        """(pod IPs, network namespace path); ((), None) for the host's network."""
        if not self.wants_pod_network(pod):
            return (), None
        meta = pod["metadata"]
        try:
            net = await self.context.network.setup(meta["uid"], meta["namespace"], meta["name"])
        except Exception as exc:  # the network package's errors name the Pod and the interface
            raise SandboxError(f"pod network for {meta['namespace']}/{meta['name']}: {exc}") from exc
        return (net.ip,), net.netns_path

    async def teardown_pod_network(self, pod: JSON) -> None:
        if self.wants_pod_network(pod):
            await self.context.network.teardown(pod["metadata"]["uid"])

    @abc.abstractmethod
    async def remove_sandbox(self, sandbox: Sandbox, pod: JSON) -> None:
        """Stop whatever is left of the sandbox and free it. Must be idempotent."""

    @abc.abstractmethod
    async def create_container(
        self, sandbox: Sandbox, pod: JSON, container: JSON, restart_count: int
    ) -> ContainerHandle: ...

    @abc.abstractmethod
    async def start_container(self, handle: ContainerHandle) -> None:
        """Start it and set handle.started_at."""

    @abc.abstractmethod
    async def wait_container(self, handle: ContainerHandle) -> ContainerExit:
        """Resolve when the container exits (it may be cancelled; that must not stop the container)."""

    @abc.abstractmethod
    async def stop_container(self, handle: ContainerHandle, grace_seconds: float) -> None:
        """Soft stop (SIGTERM or the like), then hard stop once the grace period ends."""

    @abc.abstractmethod
    async def remove_container(self, handle: ContainerHandle) -> None:
        """Forget a stopped container. Must be idempotent."""

    async def create_ephemeral_container(
        self, sandbox: Sandbox, pod: JSON, container: JSON, target: ContainerHandle | None
    ) -> ContainerHandle:
        """An ephemeral container (`kubectl debug`): `container` is its spec.ephemeralContainers
        entry; `target` the running container its targetContainerName names (None: none named),
        whose namespaces it shares as far as the backend can. Started with start_container and
        never restarted. Backends that cannot run one keep this default: the agent shows the
        message in the container's waiting state."""
        raise NotSupportedError(
            f"the {self.name} backend of handler {self.handler.name!r} cannot run ephemeral containers"
        )

    async def adopt_container(
        self, sandbox: Sandbox, pod: JSON, container: JSON, status: JSON
    ) -> ContainerHandle | None:
        """After an agent restart: take over the running container that `status` (a
        containerStatuses entry) describes, or return None when it is gone."""
        return None

    async def recorded_containers(self, pod: JSON) -> dict[str, int]:
        """Container name -> the highest restart count the backend has a record of on disk for this
        Pod (started or not). The agent adopts those before it starts anything: after a crash the
        API status may not mention a container that runs. {} for backends with nothing on disk."""
        return {}

    # --- what the backend holds on disk, for the agent's housekeeping ----------------------------

    async def list_sandboxes(self) -> list[SandboxRecord]:
        """Every Pod sandbox this handler has on disk (running or not). [] when it keeps nothing."""
        return []

    async def has_sandbox(self, pod: JSON) -> bool:
        """Whether anything of this Pod may exist (False: a Pod deleted before it started here gets
        no sandbox at all). The default cannot know, so it says True."""
        return True

    async def purge_sandbox(self, record: SandboxRecord) -> int:
        """Remove everything the backend holds for the Pod of `record`: its processes (shims too),
        cgroups, network and state directory; returns how many processes it killed. Works from the
        record alone (the Pod object may be gone). Must be idempotent."""
        return 0

    async def exec(
        self, handle: ContainerHandle, command: list[str], timeout: float | None = None
    ) -> tuple[int, bytes]:
        raise NotSupportedError(f"the {self.name} backend cannot exec into containers")

    # --- streaming (the kubelet API's /exec, /attach and /portForward) ---------------------------

    async def exec_stream(
        self, sandbox: Sandbox, handle: ContainerHandle, command: list[str], tty: bool, stdin: bool
    ) -> StreamingProcess:
        """Start `command` inside the running container, its stdio wired to the returned object."""
        raise NotSupportedError(f"the {self.name} backend cannot exec into containers")

    async def attach(self, sandbox: Sandbox, handle: ContainerHandle, tty: bool, stdin: bool) -> StreamingProcess:
        raise NotSupportedError(f"the {self.name} backend cannot attach to containers")

    async def port_forward(self, sandbox: Sandbox, pod: JSON, port: int) -> tuple[Any, Any]:
        """Open a TCP connection to `port` on the Pod's loopback (inside its network namespace);
        returns an asyncio (StreamReader, StreamWriter) pair."""
        raise NotSupportedError(f"the {self.name} backend cannot forward ports")

    async def resize(
        self, sandbox: Sandbox, before: JSON, after: JSON, containers: Mapping[str, ContainerHandle]
    ) -> None:
        """Apply an admitted in-place resize to the running Pod: `before` and `after` are the Pod
        with the resources in force and the allocated ones; `containers` are the containers to
        update in place, by name. Raises ResizeError when it cannot be applied now."""
        raise ResizeError(f"in-place resize is not supported by the {self.name} backend")

    def container_id(self, handle: ContainerHandle) -> str:
        return f"{self.name}://{handle.id}"

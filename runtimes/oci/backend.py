"""The oci backend: each container is a real OCI container run by an OCI runtime's CLI
(runc by default; crun, youki, runsc... take the same `create/start/state/kill/delete/exec`).

Per Pod (create_sandbox): the Pod cgroup with its overhead-including limits (CgroupManager), a
namespace holder process (runtimes/oci/pause.py, the pause container's role) that owns the Pod's
IPC, UTS and, without a network plugin, its loopback-only network namespace, and with
shareProcessNamespace is pid 1 of the Pod's pid namespace; the Pod's /etc/hosts, /etc/hostname,
/etc/resolv.conf, a shared /dev/shm tmpfs and its volumes, all under the Pod directory.

Per container (create_container): a rootfs from the image store, config.json from
runtimes/oci/spec.py, and a shim (runtimes/oci/shim.py) that runs `<runtime> create` with the
container's stdio pipes, writes the CRI log and records the exit status. start is
`<runtime> start`. Containers and shims survive an agent restart; adopt_container finds them
again through the shim's files and `<runtime> state`.

Layout: <state>/pods/<ns>_<pod>_<uid>/
    sandbox.json, pod.json, etc/{hosts,hostname,resolv.conf}, shm/, volumes/<name>/
    <container>/<restartCount>.log                   the CRI log (rotated beside it)
    <container>/<restartCount>/{config.json,shim.json,state.json,exit.json,started.json,rootfs}
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import inspect
import json
import logging
import os
import shutil
import signal
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from cgroups.manager import CgroupError, CgroupManager
from cgroups.resize import POD, MemoryBelowUsageError, plan_resize
from cgroups.resources import ResourceConfig, container_resource_config, pod_resource_config
from common.logfmt import kv
from runtimes.base import (
    JSON,
    Backend,
    ContainerExit,
    ContainerHandle,
    CreateContainerConfigError,
    CreateContainerError,
    ResizeError,
    RunContainerError,
    Sandbox,
    SandboxError,
    SandboxRecord,
    StreamingProcess,
)
from runtimes.container_env import EnvError, container_env, env_context
from runtimes.hostproc import alive, parse_time, pod_dir_name, process_exit, shim_exit
from runtimes.oci.cgroups import remove_everywhere
from runtimes.oci.seccomp import profile_type
from runtimes.oci.spec import (
    PodNamespaces,
    SpecInput,
    build_spec,
    hosts_file,
    pod_hostname,
    resolv_conf,
    update_resources,
)
from runtimes.oci.stream import AttachProcess, ExecProcess, connect_in_netns, exec_with_tty
from runtimes.oci.volumes import prepare_pod_volumes, remove_pod_volumes
from runtimes.private_files import private_dir, remove_tree, write_private
from runtimes.sandbox_records import (
    kill_recorded_processes,
    read_owner,
    recorded_containers,
    remove_pod_dir,
    scan,
    write_owner,
)
from runtimes.termination import termination_message

log = logging.getLogger("runtimes.oci")  # the name it logged under as runtimes/oci.py

SHIM_START_TIMEOUT = 30.0  # `runc create` on a loaded 2-core host can take seconds
PAUSE_CGROUP = "_pause"  # not a valid container name (DNS label), so it cannot clash with one
RUNTIME_TIMEOUT = 30.0
HOST_RESOLV_CONF = "/etc/resolv.conf"
DEFAULT_SECCOMP_DIR = "/var/lib/kubelet/seccomp"


class ImageLike(Protocol):
    """What the backend needs of an image (images.service.Image)."""

    digest: str
    image_id: str
    config: Mapping[str, Any]  # the OCI image config (its "config" object: Entrypoint, Cmd, Env, ...)
    rootfs: Path


class ImageStore(Protocol):
    """What the backend needs of the image service (images.service.ImageService); the Pod worker
    pulls each image before create_container, so `present` finds it."""

    def present(self, ref: Any) -> Any: ...  # ImageLike | None, or an awaitable of it
    async def prepare_rootfs(self, image: Any, container_dir: Path) -> Path: ...
    async def release_rootfs(self, container_dir: Path) -> None: ...


class PodNetwork(Protocol):
    """What the backend needs of context.network (network.pods.PodNetworks): setup returns the
    Pod's namespace and address (an object with `netns_path` and `ip`); teardown is idempotent."""

    async def setup(self, pod_uid: str, namespace: str, name: str) -> Any: ...
    async def teardown(self, pod_uid: str) -> None: ...


def _now() -> datetime:
    return datetime.now(UTC)


def _image_config(image: Any) -> Mapping[str, Any]:
    config = getattr(image, "config", None) or {}
    if "config" in config and not any(k in config for k in ("Entrypoint", "Cmd", "Env")):
        config = config["config"] or {}  # the whole image config document was given
    return config


def _node_memory() -> int | None:
    """MemTotal in bytes."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


CAP_SYS_RESOURCE = 24


@functools.cache
def oom_score_adj_floor() -> int:
    """-1000 where this process may lower oom_score_adj (CAP_SYS_RESOURCE), else its own value: the
    same restriction containerd applies with restrict_oom_score_adj in user namespaces."""
    try:
        status = Path("/proc/self/status").read_text()
        caps = int(next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff:")), 16)
        if caps & (1 << CAP_SYS_RESOURCE):
            return -1000
        own = int(Path("/proc/self/oom_score_adj").read_text())
    except (OSError, ValueError, StopIteration):
        return -1000
    log.warning(
        "no CAP_SYS_RESOURCE: containers' oom_score_adj is kept at or above the agent's own",
        extra=kv(floor=own),
    )
    return own


def _read_text(path: Path) -> str | None:
    try:
        if path.is_symlink():  # never follow links out of an image's rootfs
            return None
        return path.read_text(errors="replace")
    except OSError:
        return None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class OciBackend(Backend):
    name = "oci"
    uses_pod_network = True
    uses_images = True  # the agent pulls each container's image before create_container (image_for finds it)

    def __init__(self, handler: Any, context: Any):
        super().__init__(handler, context)
        self.cgroups: CgroupManager | None = context.cgroups
        self.pods_dir: Path = context.pods_dir
        self.runtime_path: str = handler.runtime_path or "runc"
        self.runtime_root: str = handler.runtime_root or str(Path(context.state_dir) / "runtime")
        self.runtime: list[str] = [self.runtime_path, "--root", self.runtime_root, *handler.runtime_args]
        self._repo = str(Path(__file__).resolve().parents[2])  # the checkout: runtimes/oci/ is two below
        self._launcher: asyncio.subprocess.Process | None = None
        self._launcher_lock = asyncio.Lock()
        # Containers of one Pod are created concurrently; its volumes are prepared one at a time.
        self._volume_locks: dict[str, asyncio.Lock] = {}

    # --- helpers -----------------------------------------------------------------------------------

    async def _run(self, *args: str, timeout: float = RUNTIME_TIMEOUT) -> tuple[int, str]:
        """Run the OCI runtime; (exit code, stderr+stdout)."""
        proc = await asyncio.create_subprocess_exec(
            *self.runtime, *args, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            return 124, f"{self.runtime_path} {args[0]} timed out after {timeout:.0f}s"
        return proc.returncode or 0, out.decode(errors="replace").strip()

    async def runtime_state(self, container_id: str) -> JSON | None:
        """`<runtime> state ID`, or None when the runtime does not know the container."""
        code, out = await self._run("state", container_id)
        if code != 0:
            return None
        try:
            return json.loads(out)
        except ValueError:
            return None

    async def _launch(self, command: JSON) -> None:
        """Have the launcher (runtimes/oci/shim.py --launcher, started once) fork a shim or a Pod
        holder: much cheaper than a new interpreter each time."""
        async with self._launcher_lock:
            if self._launcher is None or self._launcher.returncode is not None:
                self._launcher = await asyncio.create_subprocess_exec(
                    sys.executable, "-S", "-m", "runtimes.oci.shim", "--launcher", cwd=self._repo,
                    env={"PYTHONPATH": self._repo, "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")},
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
                    start_new_session=True,  # not in the agent's process group: what it starts outlives the agent
                )  # fmt: skip
            assert self._launcher.stdin is not None
            self._launcher.stdin.write(json.dumps(command).encode() + b"\n")
            await self._launcher.stdin.drain()

    async def close(self) -> None:
        if self._launcher is not None and self._launcher.stdin is not None:
            self._launcher.stdin.close()  # EOF: the launcher ends; shims, containers and Pod holders stay
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._launcher.wait(), 5)

    async def _wait_for_file(self, path: Path, timeout: float) -> JSON | None:
        """The JSON a launched child writes when it is ready (or failed), or None after `timeout`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if path.exists():
                return json.loads(path.read_text())
            if self._launcher is not None and self._launcher.returncode is not None:
                return None
            await asyncio.sleep(0.005)
        return None

    def _pod_dir(self, pod: JSON) -> Path:
        return self.pods_dir / pod_dir_name(pod)

    def _container_id(self, pod: JSON, name: str, restart_count: int) -> str:
        return f"{pod['metadata']['uid']}-{name}-{restart_count}"

    @staticmethod
    def _where(pod: JSON, name: str) -> str:
        return f"pod {pod['metadata'].get('namespace')}/{pod['metadata'].get('name')} container {name}"

    # --- images ------------------------------------------------------------------------------------

    async def image_for(self, container: JSON) -> Any:
        """The container's image from the image store (the Pod worker has pulled it already)."""
        images = self.context.images
        name = container.get("image") or ""
        if images is None:
            raise CreateContainerError(
                f"container {container.get('name')}: the oci backend needs the image service (context.images)"
            )
        try:
            from images.reference import parse_reference  # the images package, when merged

            ref: Any = parse_reference(name)
        except ImportError:
            ref = name
        except Exception as exc:
            from runtimes.base import InvalidImageNameError

            raise InvalidImageNameError(f"container {container.get('name')}: invalid image {name!r}: {exc}") from exc
        image = images.present(ref)
        if inspect.isawaitable(image):
            image = await image
        if image is None:
            raise CreateContainerError(
                f"container {container.get('name')}: image {name!r} is not present on this node; pull it first"
            )
        return image

    # --- sandbox -----------------------------------------------------------------------------------

    async def create_sandbox(self, pod: JSON) -> Sandbox:
        """The Pod's cgroup, namespaces, /etc files and /dev/shm. Idempotent: after an agent
        restart the running sandbox is found again."""
        if self.cgroups is None:
            raise SandboxError("the oci backend needs cgroups: run the agent as root on a cgroup v1 or v2 host")
        if not shutil.which(self.runtime_path):
            raise SandboxError(
                f"runtime {self.runtime_path!r} of handler {self.handler.name!r} is not installed or not executable"
            )
        uid = pod["metadata"]["uid"]
        spec = pod.get("spec", {})
        # First of all: whatever follows can be found and removed again without the Pod object.
        await asyncio.to_thread(write_owner, self._pod_dir(pod), pod, self.name, self.handler.name,
                                self.cgroups.pod_path(pod))  # fmt: skip
        try:
            await self.cgroups.setup_pod(pod, pod_resource_config(pod, self.context.pod_pids_limit))
            await asyncio.to_thread(self.cgroups.ensure_container, pod, PAUSE_CGROUP, ResourceConfig())
        except (CgroupError, OSError) as exc:
            raise SandboxError(f"cannot create the pod cgroup: {exc}") from exc
        pod_dir = private_dir(self._pod_dir(pod))  # config.json can hold Secret values
        (pod_dir / "etc").mkdir(parents=True, exist_ok=True)
        record = {"pod": pod, "handler": self.handler.name, "backend": self.name, "cgroup": self.cgroups.pod_path(pod)}
        (pod_dir / "pod.json").write_text(json.dumps(record))

        existing = self._load_sandbox(pod_dir)
        if existing and alive(existing["pause_pid"], existing["pause_start_ticks"]):
            return Sandbox(id=uid, pod_uid=uid, ips=tuple(existing["ips"]), netns=existing["netns"])
        if existing:  # the holder died (host reboot, OOM): its namespaces are gone, start again
            await self._stop_pause(existing)

        netns: str | None = None
        ips: tuple[str, ...] = ()
        host_network = bool(spec.get("hostNetwork"))
        # As the agent's other backends: no Pod network with hostNetwork, without a network on this
        # node, or with the handler option pod_network = false (then a loopback-only namespace).
        wants_network = self.context.network is not None and bool(self.handler.options.get("pod_network", True))
        if not host_network and wants_network:
            meta = pod["metadata"]
            try:
                network = await self.context.network.setup(uid, meta.get("namespace", ""), meta.get("name", ""))
            except Exception as exc:
                raise SandboxError(f"cannot set up the pod network: {exc}") from exc
            netns, ips = network.netns_path, (network.ip,)
        flags = "".join(
            flag
            for flag, wanted in (
                ("p", not spec.get("hostPID")),
                ("i", not spec.get("hostIPC")),
                ("n", not host_network and netns is None),
                ("u", not host_network),
            )
            if wanted
        )
        hostname = pod_hostname(pod)
        pause_state = pod_dir / "pause.json"
        pause_state.unlink(missing_ok=True)
        await self._launch({"pause": [str(pause_state), hostname, flags]})
        pause = await self._wait_for_file(pause_state, SHIM_START_TIMEOUT)
        if pause is None or "error" in pause:
            why = pause["error"] if pause else "no answer from the launcher"
            raise SandboxError(f"cannot create the pod's namespaces ({flags}): {why}")
        pid = pause["pid"]
        with contextlib.suppress(CgroupError, OSError):
            await asyncio.to_thread(self.cgroups.add_process, self.cgroups.container_path(pod, PAUSE_CGROUP), pid)
        if "n" in flags:
            netns = f"/proc/{pid}/ns/net"

        sandbox_record = {
            "pause_pid": pid,
            "pause_start_ticks": pause["start_ticks"],
            "namespaces": {
                "ipc": f"/proc/{pid}/ns/ipc" if "i" in flags else None,
                "uts": f"/proc/{pid}/ns/uts" if "u" in flags else None,
                "pid": f"/proc/{pid}/ns/pid" if "p" in flags else None,
                "network": netns,
            },
            "netns": netns,
            "ips": list(ips),
            "hostname": hostname,
            "shm": None,
        }
        try:
            await asyncio.to_thread(self._write_etc_files, pod, pod_dir, ips, hostname, host_network)
            if not spec.get("hostIPC"):
                sandbox_record["shm"] = await self._mount_shm(pod_dir / "shm")
        except (OSError, SandboxError) as exc:
            await self._stop_pause(sandbox_record)
            raise SandboxError(f"cannot prepare the pod directory {pod_dir}: {exc}") from exc
        _write_atomic(pod_dir / "sandbox.json", json.dumps(sandbox_record))
        return Sandbox(id=uid, pod_uid=uid, ips=ips, netns=netns)

    @staticmethod
    def _load_sandbox(pod_dir: Path) -> JSON | None:
        try:
            return json.loads((pod_dir / "sandbox.json").read_text())
        except (OSError, ValueError):
            return None

    def _write_etc_files(self, pod: JSON, pod_dir: Path, ips: tuple[str, ...], hostname: str, host_net: bool) -> None:
        etc = pod_dir / "etc"
        host_resolv = _read_text(Path(HOST_RESOLV_CONF)) or ""
        if host_net:  # the kubelet gives hostNetwork Pods the node's own hosts file
            hosts = _read_text(Path("/etc/hosts")) or hosts_file(pod, [self.context.host_ip], hostname)
            name = os.uname().nodename
        else:
            hosts = hosts_file(pod, list(ips), hostname)
            name = hostname
        _write_atomic(etc / "hosts", hosts)
        _write_atomic(etc / "hostname", name + "\n")
        _write_atomic(etc / "resolv.conf", resolv_conf(pod, host_resolv))

    async def _mount_shm(self, path: Path) -> str:
        if not os.path.ismount(path):
            path.mkdir(parents=True, exist_ok=True)
            proc = await asyncio.create_subprocess_exec(
                "mount", "-t", "tmpfs", "-o", "nosuid,nodev,noexec,mode=1777,size=65536k", "shm", str(path),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            out, _ = await proc.communicate()
            if proc.returncode != 0:
                raise SandboxError(f"mount the pod's /dev/shm at {path}: {out.decode().strip()}")
        return str(path)

    async def _stop_pause(self, record: JSON) -> None:
        pid, ticks = record.get("pause_pid"), record.get("pause_start_ticks")
        if pid and alive(pid, ticks):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            await process_exit(pid, timeout=2.0)

    async def remove_sandbox(self, sandbox: Sandbox, pod: JSON) -> None:
        """Every container of the Pod, the holder, the network, mounts, cgroups. Idempotent."""
        cgroup = self.cgroups.pod_path(pod) if self.cgroups is not None else None
        deleted = bool(pod["metadata"].get("deletionTimestamp"))  # a finished Pod keeps its logs until then
        await self._remove_sandbox_at(self._pod_dir(pod), pod["metadata"]["uid"], cgroup, deleted)

    async def _remove_sandbox_at(self, pod_dir: Path, uid: str, pod_cgroup: str | None, deleted: bool = True) -> None:
        for container_id in await self._runtime_ids(f"{uid}-"):
            await self._run("delete", "--force", container_id)
        for config in pod_dir.glob("*/*/config.json"):
            await self._release_rootfs(config.parent)
        record = self._load_sandbox(pod_dir)
        if record:
            await self._stop_pause(record)
        if self.context.network is not None:  # idempotent: nothing to do for Pods it never set up
            with contextlib.suppress(Exception):
                await self.context.network.teardown(uid)
        await asyncio.to_thread(self._remove_pod_files, pod_dir, deleted)
        self._volume_locks.pop(uid, None)
        if self.cgroups is not None and pod_cgroup:
            with contextlib.suppress(CgroupError, OSError):
                await self.cgroups.teardown_pod(pod_cgroup)
            with contextlib.suppress(OSError, ValueError):
                await asyncio.to_thread(remove_everywhere, pod_cgroup)

    # --- records on disk (agent housekeeping, adoption after a crash) ----------------------------

    async def list_sandboxes(self) -> list[SandboxRecord]:
        return await asyncio.to_thread(scan, self.pods_dir, self.name, self.handler.name)

    async def has_sandbox(self, pod: JSON) -> bool:
        return self._pod_dir(pod).is_dir()

    async def recorded_containers(self, pod: JSON) -> dict[str, int]:
        return await asyncio.to_thread(recorded_containers, self._pod_dir(pod))

    async def purge_sandbox(self, record: SandboxRecord) -> int:
        pod_dir = Path(record.path or self.pods_dir / f"{record.namespace}_{record.name}_{record.pod_uid}")
        cgroup = record.cgroup or (await asyncio.to_thread(read_owner, pod_dir) or {}).get("cgroup")
        killed = len(await self._runtime_ids(f"{record.pod_uid}-"))
        await self._remove_sandbox_at(pod_dir, record.pod_uid, cgroup)  # runtime delete, holder, mounts, cgroups
        killed += await asyncio.to_thread(kill_recorded_processes, pod_dir)  # shims whose container is gone
        if not await asyncio.to_thread(remove_pod_dir, pod_dir):
            raise OSError(f"{pod_dir}: something is still mounted inside; left in place")
        return killed

    async def _runtime_ids(self, prefix: str) -> list[str]:
        """IDs the runtime knows that start with `prefix`. runc, crun and youki keep one directory
        per container under --root, which also serves runtimes without `list --format json`."""
        code, out = await self._run("list", "--format", "json")
        try:
            ids = [str(c.get("id", "")) for c in json.loads(out or "null") or []] if code == 0 else []
        except ValueError:
            ids = []
        with contextlib.suppress(OSError):
            ids += os.listdir(self.runtime_root)
        return sorted({i for i in ids if i.startswith(prefix)})

    @staticmethod
    def _remove_pod_files(pod_dir: Path, deleted: bool = True) -> None:
        remove_pod_volumes(pod_dir)
        shm = pod_dir / "shm"
        if os.path.ismount(shm):
            import subprocess

            subprocess.run(["umount", "-l", str(shm)], capture_output=True, check=False)
        for name in ("shm", "etc"):
            shutil.rmtree(pod_dir / name, ignore_errors=True)
        for name in ("sandbox.json", "pause.json", "pod.json"):
            (pod_dir / name).unlink(missing_ok=True)
        if deleted:
            remove_tree(pod_dir)  # container specs (environments with Secret values) and logs go with the Pod
        else:  # finished, not deleted: its logs stay readable; specs (with Secret values) go now
            for config in pod_dir.glob("*/*/config.json"):
                config.unlink(missing_ok=True)

    # --- containers --------------------------------------------------------------------------------

    async def create_container(
        self, sandbox: Sandbox, pod: JSON, container: JSON, restart_count: int
    ) -> ContainerHandle:
        return await self._create_guarded(sandbox, pod, container, restart_count)

    async def create_ephemeral_container(
        self, sandbox: Sandbox, pod: JSON, container: JSON, target: ContainerHandle | None
    ) -> ContainerHandle:
        """As the kubelet asks containerd: with a target, the target container's pid namespace
        (unless the Pod shares one, or the host's); the Pod's network, IPC and UTS as any container."""
        target_pid = None
        if target is not None:
            state = target.extra.get("state") or {}
            pid, ticks = state.get("pid"), state.get("start_ticks")
            if not pid or not alive(pid, ticks) or self._exited(target):
                where = self._where(pod, container["name"])
                raise CreateContainerError(f"{where}: target container {target.name} is not running")
            target_pid = f"/proc/{pid}/ns/pid"
        return await self._create_guarded(sandbox, pod, container, 0, target_pid)

    async def _create_guarded(
        self, sandbox: Sandbox, pod: JSON, container: JSON, restart_count: int, target_pid: str | None = None
    ) -> ContainerHandle:
        """Make the container. A caller cancelled meanwhile (its Pod deleted) does not stop the
        making halfway: the shim, once launched, creates the runtime's container whoever waits, and
        a rootfs is mounted before its config.json exists. So the create runs to its end and is
        then undone here, and no container, shim, mount or cgroup of a deleted Pod stays behind."""
        create = asyncio.ensure_future(self._create_container(sandbox, pod, container, restart_count, target_pid))
        try:
            return await asyncio.shield(create)
        except asyncio.CancelledError:
            await asyncio.wait({create})  # cancelled again meanwhile: remove_sandbox still removes by ID
            if not create.cancelled() and create.exception() is None:
                await self._discard(create.result())
            raise

    async def _discard(self, handle: ContainerHandle) -> None:
        """Undo a create whose caller went away: stop the container (its shim then ends), remove it."""
        await self._run("kill", "--all", handle.id, "KILL")
        await self.remove_container(handle)
        log.info("removed a container made for a deleted pod", extra=kv(container=handle.id))

    async def _create_container(
        self, sandbox: Sandbox, pod: JSON, container: JSON, restart_count: int, target_pid: str | None = None
    ) -> ContainerHandle:
        name = container["name"]
        where = self._where(pod, name)
        pod_dir = self._pod_dir(pod)
        record = self._load_sandbox(pod_dir)
        if record is None or not alive(record["pause_pid"], record["pause_start_ticks"]):
            raise CreateContainerError(f"{where}: the pod sandbox is gone; the pod must be recreated")
        image = await self.image_for(container)
        pod_ip = sandbox.ips[0] if sandbox.ips else self.context.host_ip
        try:
            env = await container_env(
                pod, container, self.context.lookup, self.context.node_name, self.context.host_ip, pod_ip,
                pod_ips=list(sandbox.ips) or None, **env_context(self.context),
            )  # fmt: skip
        except EnvError as exc:
            raise CreateContainerConfigError(f"{where}: {exc}") from exc
        async with self._volume_locks.setdefault(pod["metadata"]["uid"], asyncio.Lock()):
            volumes = await prepare_pod_volumes(
                pod, pod_dir, self.context.lookup, self.context.node_name, self.context.host_ip,
                self.handler.allow_host_path,
            )  # fmt: skip

        container_id = self._container_id(pod, name, restart_count)
        run_dir = pod_dir / name / str(restart_count)
        if run_dir.exists():  # a create that failed before, or a start that never happened
            await self._run("delete", "--force", container_id)
            await self._release_rootfs(run_dir)
            await asyncio.to_thread(shutil.rmtree, run_dir, True)
        private_dir(run_dir.parent)
        run_dir.mkdir(mode=0o700)
        try:
            rootfs = Path(await self.context.images.prepare_rootfs(image, run_dir))
        except Exception as exc:
            raise CreateContainerError(f"{where}: cannot prepare the root filesystem: {exc}") from exc

        cgroup_rel = self.cgroups.container_path(pod, name) if self.cgroups else f"kubelet-emu/{name}"
        ns = record["namespaces"]
        termination_log = run_dir / "termination-log"
        termination_log.touch(mode=0o666)
        termination_log.chmod(0o666)  # whatever user the container runs as may write its last words
        spec_input = SpecInput(
            pod=pod,
            container=container,
            image_config=_image_config(image),
            env=env,
            rootfs=str(rootfs),
            hostname=record["hostname"],
            cgroups_path="/" + cgroup_rel,
            resources=container_resource_config(container, pod=pod),
            namespaces=PodNamespaces(
                network=ns["network"], ipc=ns["ipc"], uts=ns["uts"], pid=ns["pid"], target_pid=target_pid
            ),
            volumes=volumes,
            etc_files={f"/etc/{n}": str(pod_dir / "etc" / n) for n in ("hosts", "hostname", "resolv.conf")},
            # hostIPC: the node's /dev/shm, as the kubelet gives such Pods.
            termination_log=str(termination_log),
            node_memory=_node_memory(),
            oom_score_adj_floor=oom_score_adj_floor(),
            localhost_seccomp=await asyncio.to_thread(self._localhost_seccomp, pod, container, where),
            shm_path="/dev/shm" if pod.get("spec", {}).get("hostIPC") else record.get("shm"),
            passwd=_read_text(rootfs / "etc" / "passwd"),
            group=_read_text(rootfs / "etc" / "group"),
            allow_privileged=self.handler.allow_privileged,
            allow_host_path=self.handler.allow_host_path,
            handler_name=self.handler.name,
            annotations={
                "io.kubernetes.pod.name": pod["metadata"].get("name", ""),
                "io.kubernetes.pod.namespace": pod["metadata"].get("namespace", ""),
                "io.kubernetes.pod.uid": pod["metadata"]["uid"],
                "io.kubernetes.container.name": name,
            },
        )
        try:
            spec = build_spec(spec_input)
        except CreateContainerConfigError:
            await self._release_rootfs(run_dir)
            raise
        write_private(run_dir / "config.json", json.dumps(spec, indent=1))
        shim_spec = {
            "runtime": self.runtime,
            "id": container_id,
            "bundle": str(run_dir),
            "dir": str(run_dir),
            "pid_file": str(run_dir / "init.pid"),
            "log_path": str(pod_dir / name / f"{restart_count}.log"),
            "log_max_size": self.context.log_max_size,
            "log_max_files": self.context.log_max_files,
            "stdin": bool(container.get("stdin")),
            "stdin_once": bool(container.get("stdinOnce")),
            "attach_socket": self._attach_socket(container_id),
            "console_socket": self._attach_socket(container_id, ".tty") if container.get("tty") else None,
        }
        (run_dir / "shim.json").write_text(json.dumps(shim_spec))
        state = await self._start_shim(run_dir, where)
        handle = ContainerHandle(id=container_id, name=name, image=container.get("image", ""),
                                 image_id=getattr(image, "image_id", "") or "")  # fmt: skip
        handle.extra.update(run_dir=str(run_dir), pod=pod, container=container, state=state, cgroup=cgroup_rel)
        return handle

    def _attach_socket(self, container_id: str, suffix: str = ".sock") -> str:
        """Where the shim serves attach (and, with ".tty", receives a terminal from the runtime): a
        root-only directory, a short name (unix socket paths are limited to 107 bytes)."""
        directory = Path(self.context.state_dir) / "attach"
        if len(str(directory)) > 80:
            directory = Path("/run/kubelet-emu/attach")
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        return str(directory / (hashlib.sha256(container_id.encode()).hexdigest()[:20] + suffix))

    def _localhost_seccomp(self, pod: JSON, container: JSON, where: str) -> JSON | None:
        """A Localhost seccompProfile from the handler's `seccomp_dir` option (the kubelet's
        <root-dir>/seccomp by default), in the OCI/Docker profile format."""
        kind, relative = profile_type(pod.get("spec", {}).get("securityContext") or {},
                                      container.get("securityContext") or {})  # fmt: skip
        if kind != "Localhost":
            return None
        base = Path(self.handler.options.get("seccomp_dir", DEFAULT_SECCOMP_DIR))
        path = (base / relative).resolve()
        if not relative or not path.is_relative_to(base.resolve()):
            raise CreateContainerConfigError(f"{where}: localhostProfile {relative!r} must be a path inside {base}")
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None  # build_spec names the missing profile
        except (OSError, ValueError) as exc:
            raise CreateContainerConfigError(f"{where}: cannot read seccomp profile {path}: {exc}") from exc

    async def _start_shim(self, run_dir: Path, where: str) -> JSON:
        await self._launch({"shim": str(run_dir / "shim.json")})
        state = await self._wait_for_file(run_dir / "state.json", SHIM_START_TIMEOUT)
        if state is None:
            log = _read_text(run_dir / "shim.log")
            await self._release_rootfs(run_dir)
            raise CreateContainerError(f"{where}: the shim did not start: {(log or 'no output').strip()}")
        if "error" in state:
            await self._release_rootfs(run_dir)
            raise CreateContainerError(f"{where}: {self.runtime_path} create failed: {state['error']}")
        return state

    async def _release_rootfs(self, run_dir: Path) -> None:
        if self.context.images is not None:
            with contextlib.suppress(Exception):
                await self.context.images.release_rootfs(run_dir)

    async def start_container(self, handle: ContainerHandle) -> None:
        code, out = await self._run("start", handle.id)
        if code != 0:
            raise RunContainerError(f"container {handle.name}: {self.runtime_path} start failed: {out}")
        handle.started_at = _now()
        _write_atomic(Path(handle.extra["run_dir"]) / "started.json",
                      json.dumps({"started_at": handle.started_at.isoformat()}))  # fmt: skip

    def _oom_killed(self, handle: ContainerHandle) -> bool:
        if self.cgroups is None:
            return False
        try:
            return self.cgroups.oom_kills(handle.extra["cgroup"]) > 0
        except (CgroupError, OSError):
            return False

    async def wait_container(self, handle: ContainerHandle) -> ContainerExit:
        run_dir = Path(handle.extra["run_dir"])
        state = handle.extra["state"]
        result = await shim_exit(run_dir, state)
        if result is None:
            return ContainerExit(
                exit_code=137, finished_at=_now(), reason="Error",
                message="the container's shim disappeared; its exit status is unknown",
            )  # fmt: skip
        # The container's cgroup (a fresh one per container) stays until remove_container.
        reason = "OOMKilled" if self._oom_killed(handle) else None
        return ContainerExit(
            exit_code=result["exit_code"],
            signal=result.get("signal"),
            finished_at=parse_time(result["finished_at"]),
            reason=reason,
            message=await asyncio.to_thread(self._termination_message, handle, result["exit_code"]),
        )

    @staticmethod
    def _termination_message(handle: ContainerHandle, exit_code: int) -> str | None:
        run_dir = Path(handle.extra["run_dir"])
        log_path = run_dir.parent / f"{run_dir.name}.log"
        return termination_message(handle.extra["container"], run_dir / "termination-log", log_path, exit_code)

    def _exited(self, handle: ContainerHandle) -> bool:
        return (Path(handle.extra["run_dir"]) / "exit.json").exists()

    async def stop_container(self, handle: ContainerHandle, grace_seconds: float) -> None:
        if self._exited(handle):
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_seconds
        # The preStop hook is the agent's (agent/hooks.py), run before this, as the kubelet runs it.
        if not self._exited(handle):
            await self._run("kill", handle.id, "TERM")
        while not self._exited(handle) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if not self._exited(handle):
            await self._run("kill", "--all", handle.id, "KILL")
            end = loop.time() + 5.0
            while not self._exited(handle) and loop.time() < end:
                await asyncio.sleep(0.05)

    async def remove_container(self, handle: ContainerHandle) -> None:
        code, out = await self._run("delete", "--force", handle.id)
        if code != 0 and await self.runtime_state(handle.id) is not None:
            # Not raised: the Pod worker goes on; remove_sandbox tries again for every container.
            log.warning("runtime delete failed", extra=kv(container=handle.id, error=out))
        await self._release_rootfs(Path(handle.extra["run_dir"]))
        for suffix in (".sock", ".tty"):  # the shim's, had it died without cleaning up
            Path(self._attach_socket(handle.id, suffix)).unlink(missing_ok=True)
        with contextlib.suppress(OSError, ValueError):
            await asyncio.to_thread(remove_everywhere, handle.extra["cgroup"])

    async def adopt_container(
        self, sandbox: Sandbox, pod: JSON, container: JSON, status: JSON
    ) -> ContainerHandle | None:
        name = container["name"]
        restart = status.get("restartCount", 0)
        run_dir = self._pod_dir(pod) / name / str(restart)
        try:
            state = json.loads((run_dir / "state.json").read_text())
        except (OSError, ValueError):
            return None
        if "error" in state:
            return None
        container_id = self._container_id(pod, name, restart)
        exited = (run_dir / "exit.json").exists()
        runtime_state = None
        if not exited:
            runtime_state = await self.runtime_state(container_id)
            if runtime_state is None or not alive(state["shim_pid"], state["shim_start_ticks"]):
                return None
        try:
            started = json.loads((run_dir / "started.json").read_text())
        except (OSError, ValueError):
            # Killed between `start` and the record of it: the runtime knows whether it runs.
            if not exited and (runtime_state or {}).get("status") not in ("running", "paused"):
                return None  # created, never started: create_container makes it afresh
            started = {"started_at": state.get("created_at") or _now().isoformat()}
        handle = ContainerHandle(id=container_id, name=name, image=container.get("image", ""),
                                 image_id=status.get("imageID", ""))  # fmt: skip
        cgroup_rel = self.cgroups.container_path(pod, name) if self.cgroups else f"kubelet-emu/{name}"
        handle.extra.update(run_dir=str(run_dir), pod=pod, container=container, state=state, cgroup=cgroup_rel)
        handle.started_at = parse_time(started["started_at"])
        return handle

    # --- in-place resize ---------------------------------------------------------------------------

    async def resize(
        self, sandbox: Sandbox, before: JSON, after: JSON, containers: Mapping[str, ContainerHandle]
    ) -> None:
        """The Pod cgroup through the CgroupManager, each running container through
        `<runtime> update` (the runtime keeps its own record of the container's cgroup values),
        in the kubelet's order. An exited container takes the new values when it restarts."""
        if self.cgroups is None:
            raise ResizeError("no cgroups to resize")
        running = {name: h for name, h in containers.items() if not self._exited(h)}
        try:
            steps = await asyncio.to_thread(
                plan_resize, self.cgroups, before, after, running, self.context.pod_pids_limit
            )
        except (MemoryBelowUsageError, CgroupError, OSError) as exc:
            raise ResizeError(str(exc)) from exc
        for key, config in steps:
            if key == POD:
                try:
                    await self.cgroups.update_pod(after, config)
                except (CgroupError, OSError) as exc:
                    raise ResizeError(f"pod cgroup: {exc}") from exc
            else:
                await self._update(running[key], config)
        # `kubelet-emu cgroups` explains the values from this record: it follows the resize.
        record = {"pod": after, "handler": self.handler.name, "backend": self.name,
                  "cgroup": self.cgroups.pod_path(after)}  # fmt: skip
        await asyncio.to_thread(_write_atomic, self._pod_dir(after) / "pod.json", json.dumps(record))

    async def _update(self, handle: ContainerHandle, config: ResourceConfig) -> None:
        path = Path(handle.extra["run_dir"]) / "resources.json"
        await asyncio.to_thread(_write_atomic, path, json.dumps(update_resources(config)))
        code, out = await self._run("update", "--resources", str(path), handle.id)
        if code != 0:
            raise ResizeError(f"container {handle.name}: {self.runtime_path} update failed: {out}")

    # --- exec and streaming ------------------------------------------------------------------------

    async def exec(
        self, handle: ContainerHandle, command: list[str], timeout: float | None = None
    ) -> tuple[int, bytes]:
        """`<runtime> exec`: the container's user, environment, directory and namespaces; stdout
        and stderr together, as the exec probe reads them."""
        if not command:
            raise RunContainerError("exec: empty command")
        pid_file = Path(handle.extra["run_dir"]) / f"exec-{os.urandom(4).hex()}.pid"
        proc = await asyncio.create_subprocess_exec(
            *self.runtime, "exec", "--pid-file", str(pid_file), handle.id, *command,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except (TimeoutError, asyncio.CancelledError):
            # Killing the runtime's exec process would leave the command running in the container.
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        finally:
            pid_file.unlink(missing_ok=True)
        return proc.returncode or 0, out

    async def exec_stream(
        self, sandbox: Sandbox, handle: ContainerHandle, command: list[str], tty: bool, stdin: bool
    ) -> StreamingProcess:
        if not command:
            raise RunContainerError("exec: empty command")
        if tty:
            # containerd gives a TTY exec TERM=xterm; here only where the container sets no TERM.
            env = () if await asyncio.to_thread(self._sets_term, handle) else ("TERM=xterm",)
            return await exec_with_tty(self.runtime, handle.id, command, stdin, env)
        proc = await asyncio.create_subprocess_exec(
            *self.runtime, "exec", handle.id, *command,
            stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        return ExecProcess(proc)

    @staticmethod
    def _sets_term(handle: ContainerHandle) -> bool:
        """Whether the container's environment (image Env and its own, from its config.json) has TERM."""
        try:
            spec = json.loads((Path(handle.extra["run_dir"]) / "config.json").read_text())
        except (OSError, ValueError):
            return False
        return any(item.startswith("TERM=") for item in (spec.get("process") or {}).get("env") or ())

    async def attach(self, sandbox: Sandbox, handle: ContainerHandle, tty: bool, stdin: bool) -> StreamingProcess:
        """The container's output from now on (and its stdin, when the container has `stdin: true`),
        through its shim. A `tty: true` container has a terminal (resized through the shim); others
        run without one, and with `tty` their stderr comes merged."""
        if stdin and not handle.extra["container"].get("stdin"):
            raise RunContainerError(f"container {handle.name}: cannot attach stdin: the container does not set stdin")
        path = self._attach_socket(handle.id)
        try:
            reader, writer = await asyncio.open_unix_connection(path)
        except OSError as exc:
            raise RunContainerError(f"container {handle.name} is not running: cannot attach ({exc})") from exc

        async def exited() -> None:
            await self.wait_container(handle)

        terminal = bool(handle.extra["container"].get("tty"))
        return AttachProcess(reader, writer, tty, stdin, exited, terminal)

    async def port_forward(self, sandbox: Sandbox, pod: JSON, port: int) -> tuple[Any, Any]:
        if pod.get("spec", {}).get("hostNetwork") or not sandbox.netns:
            return await asyncio.open_connection("127.0.0.1", port)
        return await connect_in_netns(sandbox.netns, "127.0.0.1", port)

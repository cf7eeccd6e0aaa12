"""The process backend: each container is a host process in its own cgroup.

The image names no filesystem here (it is recorded in the status as given);
`command` + `args` run on the host with the container's environment, user
and working directory. Each container gets a shim (runtimes/process/shim.py) that
owns its pipes and exit status, so containers survive an agent restart and
are adopted again from their state directory.

State per container: <state>/pods/<ns>_<pod>_<uid>/<container>/<restartCount>/
and the CRI log at <state>/pods/<ns>_<pod>_<uid>/<container>/<restartCount>.log
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cgroups.manager import CgroupError, CgroupManager
from cgroups.resize import POD, MemoryBelowUsageError, plan_resize
from cgroups.resources import ResourceConfig, container_resource_config, pod_resource_config
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
from runtimes.container_env import EnvError, container_env, env_context, expand
from runtimes.hostproc import alive, parse_time, pod_dir_name, shim_exit
from runtimes.private_files import private_dir, remove_tree, write_private
from runtimes.process.exec import attach_to_container, connect_in_pod, exec_in_container, run_in_container
from runtimes.process.security import NODE_SECRET_PATHS, resolve
from runtimes.sandbox_records import (
    kill_recorded_processes,
    read_owner,
    recorded_containers,
    remove_pod_dir,
    scan,
    write_owner,
)
from runtimes.termination import DEFAULT_PATH, termination_message

SHIM_START_TIMEOUT = 10.0


class ProcessBackend(Backend):
    name = "process"
    uses_pod_network = True

    def __init__(self, handler: Any, context: Any):
        super().__init__(handler, context)
        self.cgroups: CgroupManager | None = context.cgroups
        self.pods_dir: Path = context.pods_dir
        self._shim_launcher: asyncio.subprocess.Process | None = None
        self._launcher_lock = asyncio.Lock()

    async def _launcher(self) -> asyncio.subprocess.Process:
        """The shim launcher (runtimes/process/shim.py --launcher), started once and kept."""
        async with self._launcher_lock:  # concurrent first starts must share one launcher
            return await self._start_launcher()

    async def _start_launcher(self) -> asyncio.subprocess.Process:
        if self._shim_launcher is None or self._shim_launcher.returncode is not None:
            repo = str(Path(__file__).resolve().parents[2])  # the checkout: runtimes/process/ is two below
            # -S skips site-packages: the shims need only the standard library and this package.
            self._shim_launcher = await asyncio.create_subprocess_exec(
                sys.executable, "-S", "-m", "runtimes.process.shim", "--launcher",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
                start_new_session=True,  # not in the agent's process group: its shims survive the agent
                cwd=repo, env={"PYTHONPATH": repo, "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            )  # fmt: skip
        return self._shim_launcher

    async def close(self) -> None:
        if self._shim_launcher is not None and self._shim_launcher.stdin is not None:
            self._shim_launcher.stdin.close()  # EOF: the launcher ends, the shims stay

    # --- sandbox: the Pod's cgroup and directory ---------------------------------------------------

    async def create_sandbox(self, pod: JSON) -> Sandbox:
        if self.cgroups is None:
            raise SandboxError("the process backend needs cgroups: run the agent as root on a cgroup v1 or v2 host")
        pod_dir = private_dir(self.pods_dir / pod_dir_name(pod))  # spec.json can hold Secret values
        # First of all: whatever follows can be found and removed again without the Pod object.
        await asyncio.to_thread(write_owner, pod_dir, pod, self.name, self.handler.name, self.cgroups.pod_path(pod))
        config = pod_resource_config(pod, self.context.pod_pids_limit)
        try:
            await self.cgroups.setup_pod(pod, config)
        except (CgroupError, OSError) as exc:
            raise SandboxError(f"cannot create the pod cgroup: {exc}") from exc
        # What `kubelet-emu cgroups` needs to explain the limits, even when the agent is not running.
        record = {"pod": pod, "handler": self.handler.name, "backend": self.name, "cgroup": self.cgroups.pod_path(pod)}
        (pod_dir / "pod.json").write_text(json.dumps(record))
        ips, netns = await self.setup_pod_network(pod)
        return Sandbox(id=pod["metadata"]["uid"], pod_uid=pod["metadata"]["uid"], ips=ips, netns=netns)

    async def remove_sandbox(self, sandbox: Sandbox, pod: JSON) -> None:
        await self.teardown_pod_network(pod)
        if self.cgroups is not None:
            with contextlib.suppress(CgroupError, OSError):
                await self.cgroups.teardown_pod(self.cgroups.pod_path(pod))
        pod_dir = self.pods_dir / pod_dir_name(pod)
        if pod["metadata"].get("deletionTimestamp"):
            await asyncio.to_thread(remove_tree, pod_dir)  # logs and specs go with the Pod
        else:  # finished, not deleted: its logs stay readable; specs (with Secret values) go now
            for spec in pod_dir.glob("*/*/spec.json"):
                spec.unlink(missing_ok=True)

    # --- records on disk (agent housekeeping, adoption after a crash) ----------------------------

    async def list_sandboxes(self) -> list[SandboxRecord]:
        return await asyncio.to_thread(scan, self.pods_dir, self.name, self.handler.name)

    async def has_sandbox(self, pod: JSON) -> bool:
        return (self.pods_dir / pod_dir_name(pod)).is_dir()

    async def recorded_containers(self, pod: JSON) -> dict[str, int]:
        return await asyncio.to_thread(recorded_containers, self.pods_dir / pod_dir_name(pod))

    async def purge_sandbox(self, record: SandboxRecord) -> int:
        pod_dir = Path(record.path or self.pods_dir / f"{record.namespace}_{record.name}_{record.pod_uid}")
        cgroup = record.cgroup or (await asyncio.to_thread(read_owner, pod_dir) or {}).get("cgroup")
        killed = await asyncio.to_thread(kill_recorded_processes, pod_dir)
        if self.cgroups is not None and cgroup:
            with contextlib.suppress(CgroupError, OSError, ValueError):
                killed += len(await asyncio.to_thread(self.cgroups.pids, cgroup))
                await self.cgroups.teardown_pod(cgroup)  # kills what is left, forks included
        if self.context.network is not None:
            await self.context.network.teardown(record.pod_uid)  # idempotent
        if not await asyncio.to_thread(remove_pod_dir, pod_dir):
            raise OSError(f"{pod_dir}: something is still mounted inside; left in place")
        return killed

    # --- containers --------------------------------------------------------------------------------

    def _container_dir(self, pod: JSON, name: str) -> Path:
        return self.pods_dir / pod_dir_name(pod) / name

    async def create_container(
        self, sandbox: Sandbox, pod: JSON, container: JSON, restart_count: int
    ) -> ContainerHandle:
        name = container["name"]
        if not container.get("command") and not container.get("args"):
            raise CreateContainerError(
                f"container {name}: the process backend runs `command`/`args` on the host and needs one "
                "(images are not unpacked by this backend)"
            )
        try:
            # The Pod's own IP when it has its own network namespace, as status.podIP says.
            pod_ip = sandbox.ips[0] if sandbox.ips else self.context.host_ip
            env_list = await container_env(
                pod, container, self.context.lookup, self.context.node_name, self.context.host_ip, pod_ip,
                pod_ips=list(sandbox.ips) or None, **env_context(self.context),
            )  # fmt: skip
        except EnvError as exc:
            raise CreateContainerConfigError(str(exc)) from exc
        env = dict(env_list)
        argv = [expand(part, env) for part in (container.get("command") or []) + (container.get("args") or [])]
        base_env = {"PATH": os.environ.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")}
        base_env["HOSTNAME"] = pod["metadata"]["name"]
        full_env = {**base_env, **env}
        if container.get("tty"):
            full_env.setdefault("TERM", "xterm")  # as containerd gives a `tty: true` container

        security = await asyncio.to_thread(resolve, pod, container, self.handler, self._hidden_paths())
        cdir = private_dir(self._container_dir(pod, name))
        run_dir = cdir / str(restart_count)
        if run_dir.exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        private_dir(run_dir)
        cwd = container.get("workingDir") or "/"  # as the kubelet: the image's, else /; never the agent's
        if not os.path.isdir(cwd):
            raise CreateContainerError(f"container {name}: workingDir {cwd} does not exist on this host")
        message_path = os.path.normpath(container.get("terminationMessagePath") or DEFAULT_PATH)
        if not message_path.startswith("/dev/") and (not os.path.isfile(message_path) or os.path.islink(message_path)):
            # Bound over an existing file in the container's mount view, or made in its own /dev;
            # anywhere else a new file would be made on the host's own file system.
            raise CreateContainerConfigError(
                f"container {name}: terminationMessagePath {message_path} is not a file on this host, and the "
                "process backend shares the host's file system and makes no file in it: use a path under /dev "
                "(each container has a /dev of its own) or an existing file"
            )

        cgroup_procs: list[str] = []
        oom_before = 0
        if self.cgroups is not None:
            try:
                rel, oom_before = await asyncio.to_thread(self._container_cgroup, pod, name, container)
            except (CgroupError, OSError) as exc:
                raise CreateContainerError(f"container {name}: cannot create its cgroup: {exc}") from exc
            cgroup_procs = self.cgroups.procs_paths(rel)
        # The container's own termination log, bound at its terminationMessagePath in its
        # mount view (runtimes/process/confine.py), never the host's /dev/termination-log.
        message_file = run_dir / "termination-log"
        message_file.touch(mode=0o666)
        message_file.chmod(0o666)  # whatever user the container runs as may write its last words
        security = {
            **security,
            "termination_log": [str(message_file), container.get("terminationMessagePath") or DEFAULT_PATH],
        }
        spec = {
            "argv": argv,
            "env": full_env,
            "cwd": cwd,
            "uid": security["uid"],
            "gid": security["gid"],
            "security": security,  # enforced by the child before exec: runtimes/process/confine.py
            "cgroup_procs": cgroup_procs,
            "netns": sandbox.netns,
            "stdin_fifo": str(run_dir / "stdin") if container.get("stdin") else None,  # for attach -i
            "stdin_once": bool(container.get("stdinOnce")),
            "tty": bool(container.get("tty")),  # a terminal as stdio, held by the shim
            "log_path": str(cdir / f"{restart_count}.log"),
            "log_max_size": self.context.log_max_size,
            "log_max_files": self.context.log_max_files,
        }
        write_private(run_dir / "spec.json", json.dumps(spec))
        handle = ContainerHandle(
            id=f"{pod['metadata']['uid'][:8]}-{name}-{restart_count}",
            name=name,
            image=container.get("image", ""),
        )
        handle.extra.update(run_dir=str(run_dir), pod=pod, container=container, spec=spec, oom_before=oom_before)
        return handle

    async def create_ephemeral_container(
        self, sandbox: Sandbox, pod: JSON, container: JSON, target: ContainerHandle | None
    ) -> ContainerHandle:
        """A process container like the others. Every process container shares the host's pid
        namespace (there is no per-Pod one on this backend), so the target's processes are visible
        with or without targetContainerName; the Pod's network namespace and cgroup as any
        container; a mount view and user of its own, from its own securityContext."""
        return await self.create_container(sandbox, pod, container, 0)

    def _container_cgroup(self, pod: JSON, name: str, container: JSON) -> tuple[str, int]:
        """The container's cgroup, made, and its OOM kill count so far (a restart reuses the
        cgroup): one thread hop for both, as a mass start makes many at once."""
        assert self.cgroups is not None
        rel = self.cgroups.ensure_container(pod, name, container_resource_config(container, pod=pod))
        try:
            return rel, self.cgroups.oom_kills(rel)
        except (CgroupError, OSError):
            return rel, 0

    async def start_container(self, handle: ContainerHandle) -> None:
        run_dir = Path(handle.extra["run_dir"])
        launcher = await self._launcher()
        assert launcher.stdin is not None
        launcher.stdin.write(f"{run_dir / 'spec.json'}\n".encode())
        await launcher.stdin.drain()
        state_file = run_dir / "state.json"
        deadline = asyncio.get_running_loop().time() + SHIM_START_TIMEOUT
        while not state_file.exists():
            if launcher.returncode is not None or asyncio.get_running_loop().time() > deadline:
                log = (run_dir / "shim.log").read_text(errors="replace").strip()
                raise RunContainerError(f"container {handle.name}: the shim did not start: {log or 'no output'}")
            await asyncio.sleep(0.01)
        state = json.loads(state_file.read_text())
        state["oom_before"] = handle.extra.get("oom_before", 0)
        write_private(run_dir / "agent.json", json.dumps(state))
        handle.extra["state"] = state
        handle.started_at = parse_time(state["started_at"])

    def _cgroup(self, handle: ContainerHandle) -> str | None:
        if self.cgroups is None:
            return None
        return self.cgroups.container_path(handle.extra["pod"], handle.name)

    def _oom_kills(self, handle: ContainerHandle) -> int:
        rel = self._cgroup(handle)
        if rel is None:
            return 0
        try:
            return self.cgroups.oom_kills(rel)  # type: ignore[union-attr]
        except (CgroupError, OSError):
            return 0

    async def wait_container(self, handle: ContainerHandle) -> ContainerExit:
        run_dir = Path(handle.extra["run_dir"])
        state = handle.extra["state"]
        result = await shim_exit(run_dir, state)
        if result is None:
            return ContainerExit(
                exit_code=137, finished_at=datetime.now(UTC), reason="Error",
                message="the container's shim disappeared; its exit status is unknown",
            )  # fmt: skip
        reason = None
        if await asyncio.to_thread(self._oom_kills, handle) > state.get("oom_before", 0):  # a walk of the cgroup tree
            reason = "OOMKilled"
        log_path = run_dir.parent / f"{run_dir.name}.log"
        message = await asyncio.to_thread(
            termination_message, handle.extra["container"], run_dir / "termination-log", log_path, result["exit_code"]
        )
        return ContainerExit(
            exit_code=result["exit_code"],
            signal=result.get("signal"),
            finished_at=parse_time(result["finished_at"]),
            reason=reason,
            message=message,
        )

    async def stop_container(self, handle: ContainerHandle, grace_seconds: float) -> None:
        state = handle.extra.get("state")
        if not state:
            return
        pid, ticks = state["pid"], state["start_ticks"]
        deadline = asyncio.get_running_loop().time() + grace_seconds
        # The preStop hook is the agent's (agent/hooks.py), run before this, as the kubelet runs it.
        if alive(pid, ticks):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)
        while alive(pid, ticks) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        if alive(pid, ticks):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        await self._kill_cgroup(handle)

    async def _kill_cgroup(self, handle: ContainerHandle) -> None:
        """Nothing of the container survives, even a process that left its process group."""
        rel = self._cgroup(handle)
        if rel is None:
            return
        for other in await asyncio.to_thread(self.cgroups.pids, rel):  # type: ignore[union-attr]
            with contextlib.suppress(ProcessLookupError):
                os.kill(other, signal.SIGKILL)

    async def remove_container(self, handle: ContainerHandle) -> None:
        await self._kill_cgroup(handle)
        rel = self._cgroup(handle)
        if rel is not None:
            with contextlib.suppress(CgroupError, OSError):
                await asyncio.to_thread(self.cgroups.remove, rel)  # type: ignore[union-attr]

    async def adopt_container(
        self, sandbox: Sandbox, pod: JSON, container: JSON, status: JSON
    ) -> ContainerHandle | None:
        restart = status.get("restartCount", 0)
        run_dir = self._container_dir(pod, container["name"]) / str(restart)
        try:
            spec = json.loads((run_dir / "spec.json").read_text())
            if (run_dir / "agent.json").exists():
                state = json.loads((run_dir / "agent.json").read_text())
            else:  # the agent died between the shim's start and its own record: the shim's is the truth
                state = json.loads((run_dir / "state.json").read_text())
        except (OSError, ValueError):
            return None
        exited = (run_dir / "exit.json").exists()
        if not exited and not alive(state["pid"], state["start_ticks"]):
            return None
        handle = ContainerHandle(id=f"{pod['metadata']['uid'][:8]}-{container['name']}-{restart}",
                                 name=container["name"], image=container.get("image", ""))  # fmt: skip
        handle.extra.update(run_dir=str(run_dir), pod=pod, container=container, spec=spec, state=state)
        handle.started_at = parse_time(state["started_at"])
        return handle

    # --- in-place resize ---------------------------------------------------------------------------

    async def resize(
        self, sandbox: Sandbox, before: JSON, after: JSON, containers: Mapping[str, ContainerHandle]
    ) -> None:
        if self.cgroups is None:
            raise ResizeError("no cgroups to resize")
        steps = await asyncio.to_thread(self._resize_steps, before, after, containers)
        manager = self.cgroups
        try:
            for key, config in steps:
                if key == POD:
                    await manager.update_pod(after, config)
                else:
                    await asyncio.to_thread(manager.ensure_container, after, key, config)
        except (CgroupError, OSError) as exc:
            raise ResizeError(str(exc)) from exc
        # `kubelet-emu cgroups` explains the values from this record: it follows the resize.
        pod_dir = self.pods_dir / pod_dir_name(after)
        record = {
            "pod": after,
            "handler": self.handler.name,
            "backend": self.name,
            "cgroup": self.cgroups.pod_path(after),
        }
        await asyncio.to_thread((pod_dir / "pod.json").write_text, json.dumps(record))

    def _resize_steps(
        self, before: JSON, after: JSON, containers: Mapping[str, ContainerHandle]
    ) -> list[tuple[str, ResourceConfig]]:
        """The cgroup writes of a resize, in the kubelet's order, after checking no memory limit
        falls below usage."""
        manager = self.cgroups
        assert manager is not None
        try:
            return plan_resize(manager, before, after, containers, self.context.pod_pids_limit)
        except (MemoryBelowUsageError, CgroupError, OSError) as exc:
            raise ResizeError(str(exc)) from exc

    async def exec(
        self, handle: ContainerHandle, command: list[str], timeout: float | None = None
    ) -> tuple[int, bytes]:
        """Run a command as the container would: its cgroup, network and mount namespaces, user,
        capabilities, seccomp, directory and environment (exec probes, preStop hooks)."""
        if not command:
            raise RunContainerError("exec: empty command")
        return await run_in_container(handle, command, timeout)

    def _hidden_paths(self) -> list[str]:
        """What a container's mount view hides: the agent's state (every Pod's files), the node's
        credentials, and the handler's own `hidden_paths` option."""
        extra = self.handler.options.get("hidden_paths") or []
        return [str(self.pods_dir.parent), *NODE_SECRET_PATHS, *self.context.node_credentials, *map(str, extra)]

    # --- streaming (runtimes/process/exec.py) ----------------------------------------------------

    async def exec_stream(
        self, sandbox: Sandbox, handle: ContainerHandle, command: list[str], tty: bool, stdin: bool
    ) -> StreamingProcess:
        return await exec_in_container(handle, command, tty, stdin)

    async def attach(self, sandbox: Sandbox, handle: ContainerHandle, tty: bool, stdin: bool) -> StreamingProcess:
        return await attach_to_container(handle, tty, stdin)

    async def port_forward(self, sandbox: Sandbox, pod: JSON, port: int) -> tuple[Any, Any]:
        return await connect_in_pod(sandbox, port)

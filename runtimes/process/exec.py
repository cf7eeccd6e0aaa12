"""Streaming for the process backend: exec with pipes or a TTY, attach by following the CRI log,
and TCP connections into a Pod's network namespace for port-forward.

An exec'd command runs the way the container does: its cgroup, network namespace, user, groups,
working directory and environment (the container's spec.json, written at create time).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import os
import signal
import struct
import subprocess
import termios
from pathlib import Path
from typing import Any

from network.netns import connect_in_netns, setns_fd
from runtimes.base import ContainerHandle, NotSupportedError, RunContainerError, Sandbox, StreamingProcess
from runtimes.crilog import parse_line
from runtimes.process.confine import confine
from runtimes.shimlib import proc_start_ticks

ATTACH_POLL = 0.1  # seconds between looks at the log file of an attached container


def _enter_container(spec: dict[str, Any], tty_fd: int | None, mount_ns: int | None = None) -> None:
    """preexec_fn of an exec'd process (after fork, before exec): the container's cgroup and
    network namespace first (both need root), then the controlling TTY, then its mount namespace,
    user, capabilities, no_new_privs and seccomp (runtimes/process/confine.py), then its directory."""
    for procs in spec.get("cgroup_procs", []):
        with open(procs, "w") as f:
            f.write("0")
    if spec.get("netns"):
        fd = os.open(spec["netns"], os.O_RDONLY)
        try:
            setns_fd(fd)  # os.setns is Python 3.12+
        finally:
            os.close(fd)
    if tty_fd is not None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)  # stdin is the pty's slave; we lead a new session
    security = spec.get("security")
    if security:
        confine(security, _seccomp_program(security), mount_ns)
        os.chdir(spec["cwd"])  # entering a mount namespace moved the directory to its root
        return
    if spec.get("gid") is not None:  # a container created before securityContext was enforced
        os.setgroups([])
        os.setgid(spec["gid"])
    if spec.get("uid") is not None:
        os.setuid(spec["uid"])


def _seccomp_program(security: dict[str, Any]) -> bytes | None:
    encoded = security.get("seccomp_bpf")
    return base64.b64decode(encoded) if encoded else None


def _open_mount_ns(handle: ContainerHandle) -> int | None:
    """The container's mount namespace, held open (checked to be the container's own process
    after opening), or None for containers made without one."""
    spec = handle.extra.get("spec") or {}
    if not (spec.get("security") or {}).get("mount_view"):
        return None
    state = handle.extra.get("state") or {}
    pid = state.get("pid")
    try:
        fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    except (OSError, TypeError) as exc:
        raise RunContainerError(f"container {handle.name} is not running") from exc
    try:
        if proc_start_ticks(pid) != state.get("start_ticks"):
            raise RunContainerError(f"container {handle.name} is not running")
    except (OSError, ValueError, IndexError) as exc:
        os.close(fd)
        raise RunContainerError(f"container {handle.name} is not running") from exc
    except RunContainerError:
        os.close(fd)
        raise
    return fd


async def run_in_container(handle: ContainerHandle, command: list[str], timeout: float | None) -> tuple[int, bytes]:
    """A command run to its end inside the container (exec probes, preStop): code and output."""
    spec = handle.extra["spec"]
    mount_ns = _open_mount_ns(handle)
    try:
        proc = await asyncio.create_subprocess_exec(
            *command, env=spec["env"], cwd="/", preexec_fn=lambda: _enter_container(spec, None, mount_ns),
            start_new_session=True, pass_fds=() if mount_ns is None else (mount_ns,),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
    finally:
        if mount_ns is not None:
            os.close(mount_ns)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise
    return proc.returncode or 0, out


class ExecProcess(StreamingProcess):
    """A command started by exec, on pipes or on a pseudo-terminal."""

    def __init__(self, proc: asyncio.subprocess.Process, master_fd: int | None = None):
        self.proc = proc
        self.master_fd = master_fd

    async def wait(self) -> int:
        code = await self.proc.wait()
        return 128 - code if code < 0 else code  # asyncio reports a signal as -signal

    async def resize(self, width: int, height: int) -> None:
        if self.master_fd is not None and width > 0 and height > 0:
            with contextlib.suppress(OSError):
                fcntl.ioctl(self.master_fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

    async def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        await self.proc.wait()
        self.close()

    def close(self) -> None:
        if self.master_fd is not None:
            loop = asyncio.get_running_loop()
            loop.remove_reader(self.master_fd)
            with contextlib.suppress(OSError):
                os.close(self.master_fd)
            self.master_fd = None


def _pty_reader(master_fd: int) -> asyncio.StreamReader:
    """The pty's output as a StreamReader; EIO (every slave closed: the command ended) is its EOF."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()

    def readable() -> None:
        try:
            data = os.read(master_fd, 65536)
        except OSError:
            data = b""
        if data:
            reader.feed_data(data)
        else:
            loop.remove_reader(master_fd)
            reader.feed_eof()

    loop.add_reader(master_fd, readable)
    return reader


async def _pty_writer(master_fd: int) -> asyncio.StreamWriter:
    loop = asyncio.get_running_loop()
    pipe = os.fdopen(os.dup(master_fd), "wb", buffering=0)
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, pipe)
    return asyncio.StreamWriter(transport, protocol, None, loop)


async def exec_in_container(handle: ContainerHandle, command: list[str], tty: bool, stdin: bool) -> ExecProcess:
    spec = handle.extra.get("spec")
    if not spec:
        raise RunContainerError(f"container {handle.name} has no recorded spec: it was not created by this agent")
    if not command:
        raise RunContainerError(f"exec into container {handle.name}: the command is empty")
    env = dict(spec["env"])
    if tty:
        env.setdefault("TERM", "xterm")  # what container runtimes give a TTY exec
    mount_ns = _open_mount_ns(handle)
    # The directory is entered in the child, once it is in the container's mount namespace.
    cwd = "/" if spec.get("security") else spec["cwd"]
    common: dict[str, Any] = {"env": env, "cwd": cwd, "start_new_session": True}
    if mount_ns is not None:
        common["pass_fds"] = (mount_ns,)
    try:
        if not tty:
            proc = await asyncio.create_subprocess_exec(
                *command, **common, preexec_fn=lambda: _enter_container(spec, None, mount_ns),
                stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            result = ExecProcess(proc)
            result.stdin, result.stdout, result.stderr = proc.stdin, proc.stdout, proc.stderr
            return result
        master, slave = os.openpty()
        try:
            proc = await asyncio.create_subprocess_exec(
                *command, **common, preexec_fn=lambda: _enter_container(spec, slave, mount_ns),
                stdin=slave, stdout=slave, stderr=slave,
            )  # fmt: skip
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
    except FileNotFoundError as exc:
        raise RunContainerError(f"exec into container {handle.name}: {command[0]!r}: executable not found") from exc
    except (OSError, ValueError, subprocess.SubprocessError) as exc:  # SubprocessError: the preexec step failed
        raise RunContainerError(f"exec into container {handle.name}: {exc}") from exc
    finally:
        if mount_ns is not None:
            os.close(mount_ns)
    os.set_blocking(master, False)
    result = ExecProcess(proc, master)
    result.stdout = _pty_reader(master)
    result.stdin = await _pty_writer(master) if stdin else None
    return result


# --- attach: the container's output, as its shim writes it to the CRI log -------------------------
# (a `tty: true` container's terminal output too: its shim logs it as stdout; input goes through the
# stdin FIFO, which the shim copies to the terminal)


class LogFollower(StreamingProcess):
    """Attach without stdin: the container's stdout and stderr from now on, until it exits.

    The shim owns the container's stdio and copies it to the CRI log; following that log gives
    what the container writes, split back into its two streams (merged into stdout with a TTY)."""

    def __init__(self, handle: ContainerHandle, tty: bool):
        self.handle = handle
        self.log_path = Path(handle.extra["spec"]["log_path"])
        self.exit_file = Path(handle.extra["run_dir"]) / "exit.json"
        self.stdout = asyncio.StreamReader()
        self.stderr = None if tty else asyncio.StreamReader()
        self._task = asyncio.create_task(self._follow(), name=f"attach:{handle.name}")
        self._exit_code: int | None = None

    async def _follow(self) -> None:
        try:
            f = open(self.log_path, "rb")  # noqa: SIM115 - kept open while following
        except FileNotFoundError:
            f = None
        inode = None
        if f is not None:
            f.seek(0, os.SEEK_END)
            inode = os.fstat(f.fileno()).st_ino
        pending = b""
        try:
            while True:
                exited = self.exit_file.exists()  # checked before the last read: nothing is missed
                chunk = f.read() if f is not None else b""
                if chunk:
                    pending += chunk
                    *records, pending = pending.split(b"\n")
                    for record in records:
                        self._emit(record)
                    continue
                if exited:
                    return
                try:
                    current = os.stat(self.log_path).st_ino
                except FileNotFoundError:
                    current = None
                if current is not None and current != inode:  # rotated: go on with the new file
                    if f is not None:
                        f.close()
                    f, inode, pending = open(self.log_path, "rb"), current, b""  # noqa: SIM115
                    continue
                await asyncio.sleep(ATTACH_POLL)
        finally:
            if f is not None:
                f.close()
            self.stdout.feed_eof()
            if self.stderr is not None:
                self.stderr.feed_eof()

    async def resize(self, width: int, height: int) -> None:
        """A `tty: true` container's terminal takes the client's size, set through its slave (the
        shim records which); containers without one have nothing to resize."""
        path = (self.handle.extra.get("state") or {}).get("tty")
        if path and str(path).startswith("/dev/pts/") and 0 < width < 65536 and 0 < height < 65536:
            await asyncio.to_thread(_set_window_size, path, width, height)

    def _emit(self, record: bytes) -> None:
        try:
            _, stream, partial, message = parse_line(record)
        except ValueError:
            return
        data = message if partial else message + b"\n"
        target = self.stderr if stream == "stderr" and self.stderr is not None else self.stdout
        target.feed_data(data)

    async def wait(self) -> int:
        await asyncio.shield(self._task)
        return 0

    async def kill(self) -> None:
        self._task.cancel()  # detaching leaves the container running
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    def close(self) -> None:
        """The session is over: stop following, and let go of the container's stdin."""
        self._task.cancel()
        if self.stdin is not None:
            self.stdin.close()


def _set_window_size(path: str, width: int, height: int) -> None:
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return  # the container is gone
    try:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))
    except OSError:
        pass
    finally:
        os.close(fd)


class FifoStdin:
    """attach -i: what the client types goes into the container's stdin FIFO. Closing it ends
    the container's stdin only with stdinOnce (the shim then drops its own write end)."""

    def __init__(self, writer: asyncio.StreamWriter, run_dir: Path, once: bool):
        self.writer, self.run_dir, self.once = writer, run_dir, once

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()

    def close(self) -> None:
        if self.writer.is_closing():
            return
        self.writer.close()
        if self.once:
            (self.run_dir / "stdin-close").touch()


async def attach_to_container(handle: ContainerHandle, tty: bool, stdin: bool) -> LogFollower:
    spec = handle.extra.get("spec")
    if not spec:
        raise RunContainerError(f"container {handle.name} has no recorded spec: it was not created by this agent")
    writer = None
    if stdin:
        fifo = spec.get("stdin_fifo")
        if not fifo:
            raise NotSupportedError(
                f"container {handle.name} does not accept stdin: set `stdin: true` in its spec to attach with -i"
            )
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # the container holds the reading end
        except OSError as exc:
            raise RunContainerError(f"attach to container {handle.name}: cannot open its stdin: {exc}") from exc
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.connect_write_pipe(
            asyncio.streams.FlowControlMixin, os.fdopen(fd, "wb", buffering=0)
        )
        stream = asyncio.StreamWriter(transport, protocol, None, loop)
        writer = FifoStdin(stream, Path(handle.extra["run_dir"]), bool(spec.get("stdin_once")))
    follower = LogFollower(handle, tty)
    follower.stdin = writer
    return follower


# --- port-forward ----------------------------------------------------------------------------------


async def connect_in_pod(sandbox: Sandbox, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection to 127.0.0.1:`port` as seen from inside the Pod."""
    if sandbox.netns is None:
        return await asyncio.open_connection("127.0.0.1", port)
    return await connect_in_netns(sandbox.netns, "127.0.0.1", port)

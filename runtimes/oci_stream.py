"""Streaming for the oci backend: `<runtime> exec` with pipes or a TTY, and TCP connections made
inside a Pod's network namespace (port-forward).

TTY: the runtime allocates the pty inside the container and sends its master over a unix socket
(`--console-socket`, an SCM_RIGHTS message); we read and write that master and set its window size.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import ctypes
import fcntl
import os
import shutil
import signal
import socket
import struct
import tempfile
import termios
import threading
from typing import Any

from runtimes.base import RunContainerError, StreamingProcess

CONSOLE_TIMEOUT = 10.0
CLONE_NEWNET = 0x40000000


class ExecProcess(StreamingProcess):
    """`<runtime> exec` with pipes: stdin, stdout and stderr are the subprocess's."""

    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc
        self.stdin, self.stdout, self.stderr = proc.stdin, proc.stdout, proc.stderr

    async def wait(self) -> int:
        code = await self.proc.wait()
        return 128 - code if code < 0 else code

    async def kill(self) -> None:
        # runc exec forwards catchable signals to the process in the container.
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 2.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()


class TtyExecProcess(StreamingProcess):
    """`<runtime> exec --tty`: both streams come through the pty master; stderr is None."""

    def __init__(self, proc: asyncio.subprocess.Process, master: int, reader: Any, writer: Any):
        self.proc, self.master = proc, master
        self.stdout, self.stdin, self.stderr = reader, writer, None

    async def wait(self) -> int:
        code = await self.proc.wait()
        return 128 - code if code < 0 else code

    async def resize(self, width: int, height: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

    async def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGHUP)  # what closing a terminal sends
        try:
            await asyncio.wait_for(self.proc.wait(), 2.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()


def _receive_fd(conn: socket.socket) -> int:
    fds = array.array("i")
    _, ancillary, _, _ = conn.recvmsg(4096, socket.CMSG_SPACE(fds.itemsize))
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
    if not fds:
        raise RunContainerError("the runtime sent no pty master over the console socket")
    return fds[0]


async def exec_with_tty(runtime: list[str], container_id: str, command: list[str], stdin: bool) -> TtyExecProcess:
    loop = asyncio.get_running_loop()
    tmp = tempfile.mkdtemp(prefix="kemu-console-")  # short: unix socket paths are limited to 108 bytes
    path = os.path.join(tmp, "sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(path)
        server.listen(1)
        server.setblocking(False)
        proc = await asyncio.create_subprocess_exec(
            *runtime, "exec", "--tty", "--console-socket", path, container_id, *command,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        accept = asyncio.ensure_future(loop.sock_accept(server))
        exited = asyncio.ensure_future(proc.wait())
        done, _ = await asyncio.wait({accept, exited}, timeout=CONSOLE_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        if accept not in done:
            accept.cancel()
            if not exited.done():
                proc.kill()
            await proc.wait()
            err = (await proc.stderr.read()).decode(errors="replace").strip() if proc.stderr else ""
            raise RunContainerError(f"exec --tty in {container_id}: no console from the runtime: {err}")
        exited.cancel()
        conn, _ = accept.result()
        with conn:
            conn.setblocking(True)
            master = await asyncio.to_thread(_receive_fd, conn)
    finally:
        server.close()
        shutil.rmtree(tmp, ignore_errors=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(master, "rb", buffering=0))
    writer = None
    if stdin:
        write_fd = os.dup(master)
        transport, protocol = await loop.connect_write_pipe(
            lambda: asyncio.streams.FlowControlMixin(), os.fdopen(write_fd, "wb", buffering=0)
        )
        writer = asyncio.StreamWriter(transport, protocol, None, loop)
    return TtyExecProcess(proc, master, reader, writer)


# --- port-forward ----------------------------------------------------------------------------------


def _connect_in_netns_sync(netns_path: str, host: str, port: int) -> socket.socket:
    """A connected socket made inside `netns_path`: a fresh thread enters the namespace (setns
    changes only the calling thread), makes the socket, and ends. The socket stays in that
    namespace for its whole life, whatever thread uses it later."""
    libc = ctypes.CDLL(None, use_errno=True)
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            with open(netns_path) as ns:
                if libc.setns(ns.fileno(), CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {netns_path}: {os.strerror(err)}")
            sock = socket.create_connection((host, port), timeout=10.0)
            sock.setblocking(False)
            result["sock"] = sock
        except BaseException as exc:
            result["error"] = exc

    # Never returned to a pool: the thread's namespace is changed for good; it just ends.
    thread = threading.Thread(target=run, name="netns-connect", daemon=True)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["sock"]


async def connect_in_netns(netns_path: str, host: str, port: int) -> tuple[Any, Any]:
    """(StreamReader, StreamWriter) to host:port inside the network namespace. Uses the network
    package's helper when it is installed, this local one otherwise."""
    try:
        from network.netns import connect_in_netns as network_connect  # type: ignore[import-not-found]
    except ImportError:
        sock = await asyncio.to_thread(_connect_in_netns_sync, netns_path, host, port)
        return await asyncio.open_connection(sock=sock)
    return await network_connect(netns_path, host, port)

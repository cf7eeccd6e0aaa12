"""Streaming for the oci backend: `<runtime> exec` with pipes or a TTY, and TCP connections made
inside a Pod's network namespace (port-forward).

TTY: runc hands a console socket's pty master only to a detached exec (whose exit code it then
cannot report), so the runtime runs attached, on a pty we allocate, and proxies the container's pty.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import os
import signal
import socket
import struct
import termios
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from runtimes.base import StreamingProcess
from runtimes.oci.attach import CLOSE_STDIN, HEADER, RESIZE, SIZE, STDIN, STDOUT, frame

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

    def __init__(self, proc: asyncio.subprocess.Process, control: int, reader: Any, writer: Any):
        self.proc, self.control = proc, control
        self.stdout, self.stdin, self.stderr = reader, writer, None

    async def wait(self) -> int:
        code = await self.proc.wait()
        self._close_control()
        return 128 - code if code < 0 else code

    def _close_control(self) -> None:
        if self.control >= 0:
            os.close(self.control)
            self.control = -1

    async def resize(self, width: int, height: int) -> None:
        if self.control >= 0:
            fcntl.ioctl(self.control, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

    async def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGHUP)  # what closing a terminal sends
        try:
            await asyncio.wait_for(self.proc.wait(), 2.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
        self._close_control()


class _PtyReaderProtocol(asyncio.StreamReaderProtocol):
    """Reading a pty master fails with EIO once the other side is closed: that is its EOF."""

    def connection_lost(self, exc: Exception | None) -> None:
        if isinstance(exc, OSError) and exc.errno == errno.EIO:
            exc = None
        super().connection_lost(exc)


async def exec_with_tty(
    runtime: list[str], container_id: str, command: list[str], stdin: bool, env: tuple[str, ...] = ()
) -> TtyExecProcess:
    """`<runtime> exec --tty` attached to a pty we own: the runtime copies between the container's
    pty and its own stdio (our pty's slave, its controlling terminal, put in raw mode by the
    runtime) and resizes the container's pty on SIGWINCH, which resizing our master sends it.
    `env`: KEY=VALUE added to the container's environment for this command (`--env`)."""
    loop = asyncio.get_running_loop()
    master, slave = os.openpty()
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))

    def controlling_terminal() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    try:
        proc = await asyncio.create_subprocess_exec(
            *runtime, "exec", "--tty", *(f"--env={item}" for item in env), container_id, *command,
            stdin=slave, stdout=slave, stderr=slave, preexec_fn=controlling_terminal,
        )  # fmt: skip
    finally:
        os.close(slave)
    os.set_blocking(master, False)
    reader = asyncio.StreamReader()
    control = os.dup(master)  # for resizes; the read transport owns (and closes) `master`
    await loop.connect_read_pipe(lambda: _PtyReaderProtocol(reader), os.fdopen(master, "rb", buffering=0))
    writer = None
    if stdin:
        transport, protocol = await loop.connect_write_pipe(
            asyncio.streams.FlowControlMixin, os.fdopen(os.dup(master), "wb", buffering=0)
        )
        writer = asyncio.StreamWriter(transport, protocol, None, loop)
    return TtyExecProcess(proc, control, reader, writer)


# --- attach (the shim's socket: runtimes/oci/attach.py) ----------------------------------------------------------


class _FrameWriter:
    """The attached client's stdin, shaped like an asyncio.StreamWriter (write, drain, close)."""

    def __init__(self, writer: asyncio.StreamWriter):
        self._writer = writer
        self._closed = False

    def write(self, data: bytes) -> None:
        if data and not self._closed:
            self._writer.write(frame(STDIN, bytes(data)))

    async def drain(self) -> None:
        await self._writer.drain()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._writer.write(frame(CLOSE_STDIN))

    def is_closing(self) -> bool:
        return self._closed

    async def wait_closed(self) -> None:
        await self._writer.drain()


class AttachProcess(StreamingProcess):
    """A client of the shim's attach socket. wait() returns 0 once the container exited, whatever
    its exit code: the kubelet's attach reports Success when the streams end (the code is the
    Pod status's business), so `kubectl run -i` reads it from there and does not fall back to logs."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tty: bool, stdin: bool,
        exited: Callable[[], Awaitable[None]], terminal: bool = False,
    ):  # fmt: skip
        self._reader, self._writer, self._exited = reader, writer, exited
        self._terminal = terminal  # the container has a terminal the shim can resize
        self.stdout = asyncio.StreamReader()
        self.stderr = None if tty else asyncio.StreamReader()
        self.stdin: Any = _FrameWriter(writer) if stdin else None
        self._pump = asyncio.ensure_future(self._demux())

    async def _demux(self) -> None:
        try:
            while True:
                kind, size = HEADER.unpack(await self._reader.readexactly(HEADER.size))
                data = await self._reader.readexactly(size)
                target = self.stdout if kind == STDOUT or self.stderr is None else self.stderr
                target.feed_data(data)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.stdout.feed_eof()
            if self.stderr is not None:
                self.stderr.feed_eof()

    async def wait(self) -> int:
        await self._exited()
        return 0

    async def resize(self, width: int, height: int) -> None:
        """The container's terminal, when it has one (`tty: true`), takes the client's size."""
        if self._terminal and 0 < width < 65536 and 0 < height < 65536 and not self._writer.is_closing():
            self._writer.write(frame(RESIZE, SIZE.pack(width, height)))

    async def kill(self) -> None:
        """Detach (the client went away); the container keeps running."""
        self._pump.cancel()
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()


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

"""The kubelet's remote-command protocol (exec and attach) over SPDY, versions v4, v3 and v2.

What the API server expects (k8s.io/cri-streaming remotecommand, client-go's SPDY executor):
the client opens one stream per channel, each with a `streamType` header (error, stdin, stdout,
stderr, resize); the server waits for all it expects, runs the command, copies the data, and ends
by writing the outcome to the error stream. In v4 that is a Status JSON: {"status":"Success"}, or
Failure with reason NonZeroExitCode and a cause {"reason":"ExitCode","message":"<code>"}; in v2/v3
only a failure's message is written. Resize events (v3+, TTY only) are JSON objects
{"Width":w,"Height":h} one after another on the resize stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from agent.kubelet_api.spdy_conn import SpdyConnection, SpdyStream, StreamResetError
from agent.kubelet_api.upgrade import UpgradeRefused, negotiate, switch_to_spdy
from runtimes.base import BackendError, StreamingProcess

log = logging.getLogger(__name__)

V4, V3, V2 = "v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io"
SUPPORTED_PROTOCOLS = [V4, V3, V2]  # the kubelet's list, less the legacy unversioned channel.k8s.io
STREAM_CREATION_TIMEOUT = 30.0  # the kubelet's default
OUTPUT_DRAIN_TIMEOUT = 5.0  # after the command ends: what is left in its pipes still goes out
FIRST_RESIZE_TIMEOUT = 1.0  # with a TTY: how long the command waits for the terminal's size
HANGUP_TIMEOUT = 5.0  # after the status: the client hangs up first, or we do
STREAM_TYPES = ("error", "stdin", "stdout", "stderr", "resize")


@dataclass(frozen=True)
class StreamOptions:
    stdin: bool
    stdout: bool
    stderr: bool
    tty: bool

    @classmethod
    def from_query(cls, query: dict[str, str]) -> StreamOptions:
        """The kubelet's query flags (`input`, `output`, `error`, `tty` = "1"), as the API server sends them."""
        tty = query.get("tty") == "1"
        opts = cls(
            stdin=query.get("input") == "1",
            stdout=query.get("output") == "1",
            stderr=query.get("error") == "1" and not tty,  # a TTY merges stderr into stdout
            tty=tty,
        )
        if not (opts.stdin or opts.stdout or opts.stderr):
            raise ValueError("you must specify at least 1 of stdin, stdout, stderr")
        return opts

    def expected_streams(self, protocol: str) -> int:
        return 1 + self.stdin + self.stdout + self.stderr + (self.tty and protocol != V2)


def success_status() -> dict:
    return {"status": "Success"}


def exit_code_status(code: int) -> dict:
    return {
        "status": "Failure",
        "reason": "NonZeroExitCode",
        "message": f"command terminated with non-zero exit code: exit status {code}",
        "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]},
    }


def internal_error_status(message: str) -> dict:
    # The kubelet prefixes "Internal error occurred: "; the API server's translator adds it again.
    return {"status": "Failure", "reason": "InternalError", "code": 500, "message": message}


class _Channels:
    """The streams of one session, by type, as the client opens them."""

    def __init__(self, expected: int):
        self.by_type: dict[str, SpdyStream] = {}
        self.expected = expected
        self.complete = asyncio.Event()

    def accept(self, stream: SpdyStream) -> bool:
        kind = stream.header("streamType")
        if kind not in STREAM_TYPES or kind in self.by_type:
            log.warning("refusing a remote-command stream of type %r", kind)
            return False
        self.by_type[kind] = stream
        if len(self.by_type) >= self.expected:
            self.complete.set()
        return True

    def get(self, kind: str) -> SpdyStream | None:
        return self.by_type.get(kind)


Starter = Callable[[], Awaitable[StreamingProcess]]


async def serve(request: web.Request, opts: StreamOptions, start: Starter, what: str) -> web.StreamResponse:
    """Upgrade, collect the streams, start the process with `start`, copy until it ends, report.
    `what` names the operation and container for messages ("exec in ns/pod/container")."""
    try:
        protocol = negotiate(request, SUPPORTED_PROTOCOLS)
    except UpgradeRefused as refused:
        return refused.response
    channels = _Channels(opts.expected_streams(protocol))
    conn, response = await switch_to_spdy(request, protocol, channels.accept)
    try:
        await _run(conn, channels, protocol, start, what)
    finally:
        await conn.wait_closed(HANGUP_TIMEOUT)
    return response


async def _run(conn: SpdyConnection, channels: _Channels, protocol: str, start: Starter, what: str) -> None:
    closed = asyncio.create_task(conn.closed.wait())
    reading_sizes: asyncio.Task[None] | None = None
    try:
        ready = asyncio.create_task(channels.complete.wait())
        done, _ = await asyncio.wait({ready, closed}, timeout=STREAM_CREATION_TIMEOUT, return_when="FIRST_COMPLETED")
        ready.cancel()
        if ready not in done:
            log.info("%s: the client did not open its streams (%d of %d)", what, len(channels.by_type),
                     channels.expected)  # fmt: skip
            return
        error = channels.get("error")
        sizes: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
        resize = channels.get("resize")
        reading_sizes = asyncio.create_task(_read_sizes(resize, sizes)) if resize is not None else None
        first_size = None
        if reading_sizes is not None:
            # kubectl sends the terminal's size first thing: the command should not start on a 0x0 TTY.
            with contextlib.suppress(TimeoutError):
                first_size = await asyncio.wait_for(sizes.get(), FIRST_RESIZE_TIMEOUT)
        try:
            proc = await start()
        except BackendError as exc:
            await _report(error, protocol, internal_error_status(f"{what}: {exc}"))
            return
        except Exception as exc:  # a bug, not the user's doing: logged, and the client still hears of it
            log.exception("%s failed", what)
            await _report(error, protocol, internal_error_status(f"{what}: {exc!r}"))
            return
        if first_size is not None:
            await proc.resize(*first_size)
        status = await _pump(proc, channels, closed, sizes, what)
        if status is not None:
            await _report(error, protocol, status)
    finally:
        closed.cancel()
        if reading_sizes is not None:
            reading_sizes.cancel()
        for stream in channels.by_type.values():
            stream.close()


async def _pump(
    proc: StreamingProcess,
    channels: _Channels,
    closed: asyncio.Task,
    sizes: asyncio.Queue[tuple[int, int]],
    what: str,
) -> dict | None:
    """Copy data until the process ends; its Status, or None when the client went away first."""
    tasks = [asyncio.create_task(_apply_sizes(sizes, proc))]
    stdin = channels.get("stdin")
    if stdin is not None:
        tasks.append(asyncio.create_task(_copy_stdin(stdin, proc)))
    outputs = []
    for kind, source in (("stdout", proc.stdout), ("stderr", proc.stderr)):
        target = channels.get(kind)
        if source is not None:
            outputs.append(asyncio.create_task(_copy_output(source, target)))
    exited = asyncio.create_task(proc.wait())
    try:
        try:
            await asyncio.wait({exited, closed}, return_when="FIRST_COMPLETED")
        except asyncio.CancelledError:  # the agent is stopping: nobody is left to talk to the command
            await asyncio.shield(proc.kill())
            raise
        if not exited.done():
            log.info("%s: the client went away; stopping the command", what)
            await proc.kill()
            return None
        if outputs:
            await asyncio.wait(outputs, timeout=OUTPUT_DRAIN_TIMEOUT)
        code = exited.result()
        return success_status() if code == 0 else exit_code_status(code)
    finally:
        for task in [*tasks, *outputs, exited]:
            task.cancel()
        closer = getattr(proc, "close", None)
        if closer is not None:
            closer()


async def _copy_output(source: asyncio.StreamReader, target: SpdyStream | None) -> None:
    """Copy until EOF; without a client stream (the client asked for no such output) read and drop."""
    with contextlib.suppress(StreamResetError, ConnectionError):
        while data := await source.read(65536):
            if target is not None:
                await target.write(data)
    if target is not None:
        target.close()


async def _copy_stdin(stream: SpdyStream, proc: StreamingProcess) -> None:
    writer = proc.stdin
    try:
        while data := await stream.read():
            if writer is None:
                continue
            writer.write(data)
            await writer.drain()
    except (ConnectionError, BrokenPipeError, OSError):
        return
    if writer is not None and stream.remote_closed and not stream.reset:
        with contextlib.suppress(Exception):
            writer.close()  # EOF for the command (`cat` ends)


async def _read_sizes(stream: SpdyStream, sizes: asyncio.Queue[tuple[int, int]]) -> None:
    """Terminal sizes as kubectl's JSON encoder writes them, in whatever pieces they arrive."""
    decoder = json.JSONDecoder()
    buffer = ""
    while data := await stream.read():
        buffer += data.decode(errors="replace")
        while True:
            buffer = buffer.lstrip()
            try:
                size, end = decoder.raw_decode(buffer)
            except ValueError:
                break  # incomplete: wait for more
            buffer = buffer[end:]
            if isinstance(size, dict):
                sizes.put_nowait((int(size.get("Width") or 0), int(size.get("Height") or 0)))


async def _apply_sizes(sizes: asyncio.Queue[tuple[int, int]], proc: StreamingProcess) -> None:
    while True:
        await proc.resize(*await sizes.get())


async def _report(error: SpdyStream | None, protocol: str, status: dict) -> None:
    """The outcome on the error stream: v4 writes the Status; v2/v3 only a failure's message."""
    if error is None:
        return
    if protocol == V4:
        payload = json.dumps(status).encode()
    elif status["status"] != "Success":
        payload = status["message"].encode()
    else:
        payload = b""
    with contextlib.suppress(StreamResetError, ConnectionError):
        if payload:
            await error.write(payload)
    error.close()

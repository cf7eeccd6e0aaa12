"""The kubelet's remote-command protocol (exec and attach) over WebSocket.

The API server translates v5.channel.k8s.io clients (kubectl) to SPDY, but proxies the older
WebSocket subprotocols (channel.k8s.io, base64.channel.k8s.io, v4.channel.k8s.io,
v4.base64.channel.k8s.io) to the kubelet as they are; the kubelet serves them all, v5 included
(pkg/kubelet/cri/streaming/remotecommand/websocket.go, k8s.io/apimachinery wsstream):

- every message is one channel's data: in binary protocols the first byte is the channel number,
  in base64 ones the message is text, an ASCII digit for the channel, then the data in base64;
- channels: 0 stdin, 1 stdout, 2 stderr, 3 error (the outcome), 4 resize (JSON terminal sizes);
- the server first sends an empty message on the lowest channel it writes (stdout, else stderr,
  else error) to tell the client the connection is up;
- the outcome on channel 3: v4 and v5 write the Status JSON; the older protocols a failure's
  message only;
- v5 only: a client message [255, channel] closes that channel (stdin EOF).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging

from aiohttp import WSMsgType, web

from agent.kubelet_api.remotecommand import (
    FIRST_RESIZE_TIMEOUT,
    OUTPUT_DRAIN_TIMEOUT,
    Starter,
    StreamOptions,
    exit_code_status,
    internal_error_status,
    success_status,
)
from runtimes.base import BackendError, StreamingProcess

log = logging.getLogger(__name__)

STDIN, STDOUT, STDERR, ERROR, RESIZE = range(5)
CLOSE_CHANNEL = 255  # v5: [255, channel] from the client closes that channel
V5 = "v5.channel.k8s.io"
# Subprotocol -> binary framing. "" is a client that asked for none (binary, as the kubelet).
PROTOCOLS = {
    "": True,
    "channel.k8s.io": True,
    "base64.channel.k8s.io": False,
    "v4.channel.k8s.io": True,
    "v4.base64.channel.k8s.io": False,
    V5: True,
}
STATUS_JSON = ("v4.channel.k8s.io", "v4.base64.channel.k8s.io", V5)


def is_websocket(request: web.Request) -> bool:
    """wsstream.IsWebSocketRequest: Connection: Upgrade and Upgrade: websocket."""
    connection = request.headers.get("Connection", "").lower()
    return "upgrade" in connection and request.headers.get("Upgrade", "").lower() == "websocket"


def _negotiate(request: web.Request) -> str | None:
    offered = [p.strip() for value in request.headers.getall("Sec-WebSocket-Protocol", []) for p in value.split(",")]
    offered = [p for p in offered if p]
    if not offered:
        return ""
    return next((p for p in offered if p in PROTOCOLS), None)


class _Session:
    def __init__(self, ws: web.WebSocketResponse, protocol: str):
        self.ws = ws
        self.protocol = protocol
        self.binary = PROTOCOLS[protocol]
        self.lock = asyncio.Lock()

    async def send(self, channel: int, data: bytes) -> None:
        async with self.lock:
            if self.ws.closed:
                raise ConnectionResetError("the client went away")
            if self.binary:
                await self.ws.send_bytes(bytes([channel]) + data)
            else:
                await self.ws.send_str(str(channel) + base64.b64encode(data).decode())

    async def report(self, status: dict) -> None:
        if self.protocol in STATUS_JSON:
            payload = json.dumps(status).encode()
        elif status["status"] != "Success":
            payload = status["message"].encode()
        else:
            return
        with contextlib.suppress(ConnectionError):
            await self.send(ERROR, payload)


async def serve(request: web.Request, opts: StreamOptions, start: Starter, what: str) -> web.StreamResponse:
    protocol = _negotiate(request)
    if protocol is None:
        offered = request.headers.getall("Sec-WebSocket-Protocol", [])
        supported = [p for p in PROTOCOLS if p]
        return web.Response(
            status=400, text=f"requested protocol(s) are not supported: {offered}; supports {supported}\n"
        )
    ws = web.WebSocketResponse(protocols=(protocol,) if protocol else (), max_msg_size=0)
    await ws.prepare(request)
    session = _Session(ws, protocol)
    try:
        first = STDOUT if opts.stdout else STDERR if opts.stderr else ERROR
        await session.send(first, b"")
        await _run(session, opts, start, what)
    except ConnectionError:
        log.info("%s: the client went away", what)
    finally:
        with contextlib.suppress(Exception):
            await ws.close()
    return ws


async def _run(session: _Session, opts: StreamOptions, start: Starter, what: str) -> None:
    stdin_queue: asyncio.Queue[bytes | None] = asyncio.Queue()
    sizes: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
    reader = asyncio.create_task(_read(session, opts, stdin_queue, sizes))
    tasks: list[asyncio.Task] = []
    try:
        first_size = None
        if opts.tty:
            with contextlib.suppress(TimeoutError):
                first_size = await asyncio.wait_for(sizes.get(), FIRST_RESIZE_TIMEOUT)
        try:
            proc = await start()
        except BackendError as exc:
            await session.report(internal_error_status(f"{what}: {exc}"))
            return
        except Exception as exc:
            log.exception("%s failed", what)
            await session.report(internal_error_status(f"{what}: {exc!r}"))
            return
        if first_size is not None:
            await proc.resize(*first_size)
        tasks.append(asyncio.create_task(_apply_sizes(sizes, proc)))
        if opts.stdin:
            tasks.append(asyncio.create_task(_copy_stdin(stdin_queue, proc)))
        outputs = [
            asyncio.create_task(_copy_output(session, source, channel if wanted else None))
            for source, channel, wanted in ((proc.stdout, STDOUT, opts.stdout), (proc.stderr, STDERR, opts.stderr))
            if source is not None
        ]
        tasks.extend(outputs)
        exited = asyncio.create_task(proc.wait())
        tasks.append(exited)
        try:
            await asyncio.wait({exited, reader}, return_when="FIRST_COMPLETED")
        except asyncio.CancelledError:
            await asyncio.shield(proc.kill())
            raise
        if not exited.done():
            log.info("%s: the client went away; stopping the command", what)
            await proc.kill()
            return
        if outputs:
            await asyncio.wait(outputs, timeout=OUTPUT_DRAIN_TIMEOUT)
        code = exited.result()
        await session.report(success_status() if code == 0 else exit_code_status(code))
        closer = getattr(proc, "close", None)
        if closer is not None:
            closer()
    finally:
        reader.cancel()
        for task in tasks:
            task.cancel()


async def _read(
    session: _Session, opts: StreamOptions, stdin: asyncio.Queue[bytes | None], sizes: asyncio.Queue[tuple[int, int]]
) -> None:
    """The client's messages until it closes: stdin data, resizes, v5 close signals."""
    decoder = json.JSONDecoder()
    resize_buffer = ""
    async for msg in session.ws:
        if msg.type == WSMsgType.BINARY and session.binary:
            raw: bytes = msg.data
        elif msg.type == WSMsgType.TEXT and not session.binary:
            text: str = msg.data
            if not text or not text[0].isdigit():
                continue
            try:
                raw = bytes([int(text[0])]) + base64.b64decode(text[1:])
            except (binascii.Error, ValueError):
                continue
        else:
            continue
        if not raw:
            continue
        channel, data = raw[0], raw[1:]
        if channel == CLOSE_CHANNEL and session.protocol == V5:
            if data[:1] == bytes([STDIN]):
                stdin.put_nowait(None)
        elif channel == STDIN and opts.stdin:
            stdin.put_nowait(data)
        elif channel == RESIZE:
            resize_buffer += data.decode(errors="replace")
            while True:
                resize_buffer = resize_buffer.lstrip()
                try:
                    size, end = decoder.raw_decode(resize_buffer)
                except ValueError:
                    break
                resize_buffer = resize_buffer[end:]
                if isinstance(size, dict):
                    sizes.put_nowait((int(size.get("Width") or 0), int(size.get("Height") or 0)))
    stdin.put_nowait(None)


async def _copy_stdin(queue: asyncio.Queue[bytes | None], proc: StreamingProcess) -> None:
    writer = proc.stdin
    if writer is None:
        return
    try:
        while (data := await queue.get()) is not None:
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        return
    with contextlib.suppress(Exception):
        writer.close()  # EOF for the command


async def _copy_output(session: _Session, source: asyncio.StreamReader, channel: int | None) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await source.read(65536):
            if channel is not None:
                await session.send(channel, data)


async def _apply_sizes(sizes: asyncio.Queue[tuple[int, int]], proc: StreamingProcess) -> None:
    while True:
        await proc.resize(*await sizes.get())

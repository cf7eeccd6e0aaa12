"""The kubelet's port-forward protocol (portforward.k8s.io) over SPDY.

Per forwarded connection the client opens two streams with the same `requestID` and `port`
headers: `streamType: error` (which it half-closes at once) and `streamType: data`. Once both are
there the server connects to the port inside the Pod and copies bytes both ways; a failure is
written as text to the error stream. The server ends a pair by closing both streams when the Pod's
side of the TCP connection ends (the client waits for the error stream's end to finish its side).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from agent.kubelet_api.spdy_conn import SpdyStream, StreamResetError
from agent.kubelet_api.upgrade import UpgradeRefused, negotiate, switch_to_spdy

log = logging.getLogger(__name__)

PROTOCOL = "portforward.k8s.io"
STREAM_CREATION_TIMEOUT = 30.0

Connector = Callable[[int], Awaitable[tuple[Any, Any]]]  # port -> (StreamReader, StreamWriter)


class _Pair:
    def __init__(self, request_id: str):
        self.request_id = request_id
        self.data: SpdyStream | None = None
        self.error: SpdyStream | None = None
        self.expiry: asyncio.Future[None] | None = None


class _Forwarder:
    def __init__(self, connect: Connector, what: str):
        self.connect = connect
        self.what = what
        self.pairs: dict[str, _Pair] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    def accept(self, stream: SpdyStream) -> bool:
        """Validate a new stream the way the kubelet does; start forwarding when its pair is complete."""
        port_text, kind = stream.header("port"), stream.header("streamType")
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            log.warning("%s: refusing a stream with port header %r", self.what, port_text)
            return False
        if kind not in ("data", "error"):
            log.warning("%s: refusing a stream of type %r", self.what, kind)
            return False
        request_id = stream.header("requestID")
        if not request_id:  # very old clients: derived from the stream ids, as the kubelet does
            request_id = str(stream.id if kind == "error" else stream.id - 2)
        pair = self.pairs.get(request_id)
        if pair is None:
            pair = self.pairs[request_id] = _Pair(request_id)
            pair.expiry = self._spawn(self._expire(pair))
        if getattr(pair, kind) is not None:
            log.warning("%s: request %s has a second %s stream", self.what, request_id, kind)
            return False
        setattr(pair, kind, stream)
        if pair.data is not None and pair.error is not None:
            if pair.expiry is not None:
                pair.expiry.cancel()
            self._spawn(self._forward(pair, int(port_text)))
        return True

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Future[None]:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def _expire(self, pair: _Pair) -> None:
        await asyncio.sleep(STREAM_CREATION_TIMEOUT)
        if self.pairs.get(pair.request_id) is pair and (pair.data is None or pair.error is None):
            del self.pairs[pair.request_id]
            stream = pair.error or pair.data
            if stream is not None:
                with contextlib.suppress(StreamResetError):
                    await stream.write(f"timed out waiting for the streams of request {pair.request_id}".encode())
                stream.close()

    async def _forward(self, pair: _Pair, port: int) -> None:
        data, error = pair.data, pair.error
        assert data is not None and error is not None
        try:
            try:
                reader, writer = await self.connect(port)
            except Exception as exc:
                message = f"error forwarding port {port} to {self.what}: {exc}"
                log.info(message)
                with contextlib.suppress(StreamResetError, ConnectionError):
                    await error.write(message.encode())
                data.cancel()
                return
            try:
                await _copy_both_ways(data, reader, writer)
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
            data.close()
        finally:
            error.close()
            self.pairs.pop(pair.request_id, None)

    async def stop(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        for task in list(self.tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def _copy_both_ways(data: SpdyStream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Until the Pod's side ends (or the client resets the stream); the client's FIN half-closes
    the TCP connection, so a request/response exchange still gets its answer."""

    async def upstream() -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while chunk := await data.read():
                writer.write(chunk)
                await writer.drain()
            if not data.reset and writer.can_write_eof():
                writer.write_eof()

    async def downstream() -> None:
        with contextlib.suppress(ConnectionError, OSError, StreamResetError):
            while chunk := await reader.read(65536):
                await data.write(chunk)

    up, down = asyncio.create_task(upstream()), asyncio.create_task(downstream())
    try:
        await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        if not down.done() and not data.reset:
            await down  # the client has sent everything: the answer still comes back
    finally:
        up.cancel()
        down.cancel()


async def serve(request: web.Request, connect: Connector, what: str) -> web.StreamResponse:
    try:
        protocol = negotiate(request, [PROTOCOL])
    except UpgradeRefused as refused:
        return refused.response
    forwarder = _Forwarder(connect, what)
    conn, response = await switch_to_spdy(request, protocol, forwarder.accept)
    try:
        await conn.closed.wait()
    finally:
        await forwarder.stop()
        conn.close()
    return response

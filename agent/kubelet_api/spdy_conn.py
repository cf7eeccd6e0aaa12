"""A server-side SPDY/3.1 connection on asyncio: streams the client opens, their data both ways.

Fed with the bytes of an upgraded HTTP connection (upgrade.py), it answers each SYN_STREAM with a
SYN_REPLY or a refusal, hands accepted streams to the caller, echoes PINGs and ends on GOAWAY or EOF.

Flow control goes only as far as the Go client (github.com/moby/spdystream) needs, which is not at
all: it never sends WINDOW_UPDATE and ignores the ones it gets, so WINDOW_UPDATE and SETTINGS are
read and dropped, and writes are limited by the transport's own back-pressure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from agent.kubelet_api import spdy

log = logging.getLogger(__name__)

MAX_DATA_CHUNK = 32 * 1024  # bytes per DATA frame we send
STREAM_BUFFER_LIMIT = 4 * 1024 * 1024


class StreamResetError(ConnectionError):
    """The stream (or the whole connection) is gone: nothing more can be written to it."""


class SpdyStream:
    """One stream the client opened. Reading returns b"" once the client half-closed (FIN) or reset it."""

    def __init__(self, conn: SpdyConnection, stream_id: int, headers: spdy.Headers):
        self.conn = conn
        self.id = stream_id
        self.headers = headers
        self.reset = False  # by either side
        self.local_closed = False  # we sent FIN
        self.remote_closed = False  # the client sent FIN
        self._reader = asyncio.StreamReader(limit=STREAM_BUFFER_LIMIT)

    def header(self, name: str) -> str:
        values = self.headers.get(name.lower())
        return values[0] if values else ""

    async def read(self, n: int = 65536) -> bytes:
        return await self._reader.read(n)

    async def read_all(self) -> bytes:
        return await self._reader.read()

    async def write(self, data: bytes) -> None:
        for start in range(0, len(data), MAX_DATA_CHUNK):
            if self.reset or self.local_closed or self.conn.closed.is_set():
                raise StreamResetError(f"SPDY stream {self.id} is closed")
            self.conn.send(spdy.data_frame(self.id, data[start : start + MAX_DATA_CHUNK]))
            await self.conn.drain()

    def close(self) -> None:
        """Half-close our side (FIN); the client may still send."""
        if not (self.reset or self.local_closed or self.conn.closed.is_set()):
            self.local_closed = True
            self.conn.send(spdy.data_frame(self.id, b"", fin=True))

    def cancel(self) -> None:
        """Reset the stream (RST_STREAM CANCEL): both directions end at once."""
        if not self.reset and not self.conn.closed.is_set():
            self.conn.send(spdy.rst_stream_frame(self.id, spdy.CANCEL))
        self._peer_reset()

    # --- called by the connection ----------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        if not self.remote_closed and not self.reset:
            self._reader.feed_data(data)

    def _peer_fin(self) -> None:
        if not self.remote_closed:
            self.remote_closed = True
            self._reader.feed_eof()

    def _peer_reset(self) -> None:
        self.reset = True
        self._peer_fin()


# Decides about a new stream: return True to accept it (SYN_REPLY), False to refuse it (RST_STREAM).
StreamHandler = Callable[[SpdyStream], bool]


class SpdyConnection:
    """The server end of one SPDY/3.1 connection over an already upgraded transport."""

    def __init__(
        self,
        write: Callable[[bytes], None],
        drain: Callable[[], Awaitable[None]],
        close_transport: Callable[[], None],
        on_stream: StreamHandler,
    ):
        self._write = write
        self._drain = drain
        self._close_transport = close_transport
        self._on_stream = on_stream
        self._parser = spdy.FrameParser()
        self._compressor = spdy.HeaderCompressor()
        self.streams: dict[int, SpdyStream] = {}
        self._last_client_stream = 0
        self.closed = asyncio.Event()  # set on GOAWAY, EOF, a protocol error or close()
        self.goaway_received = False

    # --- bytes in (aiohttp's payload-parser interface) ------------------------------------------

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        if self.closed.is_set():
            return False, b""
        try:
            for frame in self._parser.feed(data):
                self._dispatch(frame)
        except spdy.SpdyProtocolError as exc:
            log.warning("closing a SPDY connection after a protocol error: %s", exc)
            self.close(status=spdy.GOAWAY_PROTOCOL_ERROR)
        return False, b""

    def feed_eof(self) -> None:
        self._shut()

    # --- bytes out ----------------------------------------------------------------------------------

    def send(self, frame: bytes) -> None:
        """Frames go out in the order they are built: header compression depends on it."""
        if not self.closed.is_set():
            self._write(frame)

    async def drain(self) -> None:
        if not self.closed.is_set():
            await self._drain()

    def close(self, status: int = spdy.GOAWAY_OK) -> None:
        """Say GOAWAY and drop the transport (the bytes written so far still go out)."""
        if not self.closed.is_set():
            with contextlib.suppress(Exception):
                self._write(spdy.goaway_frame(self._last_client_stream, status))
        self._shut()
        self._close_transport()

    async def wait_closed(self, timeout: float) -> None:
        """Give the client `timeout` seconds to hang up first (it does once it has read everything)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.closed.wait(), timeout)
        self.close()

    def _shut(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for stream in list(self.streams.values()):
            stream._peer_reset()

    # --- frames in -----------------------------------------------------------------------------------

    def _dispatch(self, frame: spdy.Frame) -> None:
        if isinstance(frame, spdy.DataFrame):
            stream = self.streams.get(frame.stream_id)
            if stream is None:
                return  # a late frame for a stream already forgotten
            if frame.data:
                stream._feed(frame.data)
            if frame.fin:
                stream._peer_fin()
            return
        kind = frame.type
        if kind == spdy.SYN_STREAM:
            self._syn_stream(frame)
        elif kind == spdy.RST_STREAM:
            stream = self.streams.pop(frame.stream_id, None)
            if stream is not None:
                stream._peer_reset()
        elif kind == spdy.HEADERS:
            stream = self.streams.get(frame.stream_id)
            if stream is not None:
                stream.headers.update(frame.headers)
                if frame.fin:
                    stream._peer_fin()
        elif kind == spdy.PING:
            if frame.ping_id % 2 == 1:  # the client's ping (odd ids): answer it; even ids would be ours
                self.send(spdy.ping_frame(frame.ping_id))
        elif kind == spdy.GOAWAY:
            self.goaway_received = True
            self._shut()
        # SETTINGS, WINDOW_UPDATE and SYN_REPLY (we open no streams) need nothing from us.

    def _syn_stream(self, frame: spdy.ControlFrame) -> None:
        sid = frame.stream_id
        if sid % 2 == 0 or sid <= self._last_client_stream:
            self.send(spdy.rst_stream_frame(sid, spdy.PROTOCOL_ERROR))
            return
        self._last_client_stream = sid
        stream = SpdyStream(self, sid, frame.headers)
        if frame.fin or frame.flags & spdy.FLAG_UNIDIRECTIONAL:
            stream._peer_fin()
        try:
            accepted = self._on_stream(stream)
        except Exception:
            log.exception("SPDY stream handler failed")
            accepted = False
        if not accepted:
            self.send(spdy.rst_stream_frame(sid, spdy.REFUSED_STREAM))
            stream.reset = True
            return
        self.streams[sid] = stream
        self.send(spdy.syn_reply_frame(self._compressor, sid, {}))

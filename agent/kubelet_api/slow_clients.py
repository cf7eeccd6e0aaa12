"""Protection of the kubelet API's listening socket from clients that never finish a request.

aiohttp has no header read timeout: a client that opens a connection and sends its request
headers one byte at a time (slowloris) holds a connection, a TLS session and a task for as long
as it likes. Go's http.Server (the kubelet's) bounds this with ReadHeaderTimeout and the TLS
handshake timeout; here a small protocol wrapper closes a connection whose request headers are
not complete in time, and the TLS handshake gets the same bound.

Malformed requests (a bad request line or header) arrive before authentication; aiohttp logs
each with a full traceback at error level, so anyone could flood the agent's log. They are
logged in one line at debug level instead; a failure in a route's own code is still an error.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from agent.logs import kv

log = logging.getLogger(__name__)

HEADER_TIMEOUT = 10.0  # seconds for the TLS handshake, and for a request's headers once they start


class _HeaderDeadline(asyncio.Protocol):
    """Wraps aiohttp's RequestHandler: closes the connection when a request's headers take too long.

    The clock starts when the connection is made and when bytes of a new request arrive while
    the handler waits for one; it stops when the handler has the whole request line and headers.
    A request being served (a followed log, an exec session) is never timed out here."""

    def __init__(self, inner: Any, timeout: float):
        self.inner = inner
        self.timeout = timeout
        self.transport: asyncio.BaseTransport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.armed_count = 0

    def _waiting_for_request(self) -> bool:
        waiter = getattr(self.inner, "_waiter", None)
        return waiter is not None and not waiter.done()

    def _count(self) -> int:
        return getattr(self.inner, "_request_count", 0)

    def _arm(self) -> None:
        if self.timer is None:
            self.armed_count = self._count()
            self.timer = asyncio.get_running_loop().call_later(self.timeout, self._expire)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _expire(self) -> None:
        self.timer = None
        if self._count() == self.armed_count and self._waiting_for_request() and self.transport is not None:
            peer = self.transport.get_extra_info("peername")
            log.debug("closing a connection whose request headers took too long", extra=kv(peer=str(peer)))
            self.transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.inner.connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        before = self._count()
        self.inner.data_received(data)
        if self._count() != before:
            self._disarm()  # a whole request line and headers arrived
        elif self._waiting_for_request():
            self._arm()  # part of a new request's headers

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class GuardedSockSite(web.SockSite):
    """web.SockSite with the header read and TLS handshake timeouts."""

    def __init__(self, *args: Any, header_timeout: float = HEADER_TIMEOUT, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        assert server is not None
        timeout = self.header_timeout
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _HeaderDeadline(server(), timeout),
            sock=self._sock,
            ssl=self._ssl_context,
            backlog=self._backlog,
            ssl_handshake_timeout=timeout if self._ssl_context else None,
        )


class QuietBadRequests(logging.LoggerAdapter):
    """aiohttp's server logger, with a malformed request in one line at debug level."""

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        if isinstance(exc, HttpProcessingError):
            self.logger.debug("malformed HTTP request answered 400: %s", exc.message or type(exc).__name__)
            return
        self.logger.exception(msg, *args, exc_info=exc_info, **kwargs)


def server_logger() -> QuietBadRequests:
    return QuietBadRequests(logging.getLogger("aiohttp.server"), {})

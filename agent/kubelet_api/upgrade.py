"""HTTP/1.1 upgrade to SPDY/3.1 in aiohttp, over TLS or plain TCP.

The client (the API server) sends `Connection: Upgrade`, `Upgrade: SPDY/3.1` and one or more
`X-Stream-Protocol-Version` headers; we pick the first of its protocols we speak, answer 101 with
it, and from then on every byte of the connection goes to a SpdyConnection. aiohttp only switches
its parser for websocket and tcp upgrades, so we install our own payload parser before the 101 goes
out (the route from then on receives the raw bytes, as aiohttp's WebSocketResponse does).
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from agent.kubelet_api.spdy_conn import SpdyConnection, StreamHandler

PROTOCOL_HEADER = "X-Stream-Protocol-Version"
ACCEPTED_PROTOCOLS_HEADER = "X-Accepted-Stream-Protocol-Versions"


class UpgradeRefused(Exception):
    """The request cannot be upgraded; `response` says why, with the status the kubelet uses."""

    def __init__(self, response: web.Response):
        super().__init__(response.text)
        self.response = response


def negotiate(request: web.Request, supported: list[str]) -> str:
    """The protocol to speak: the client's first that we support (the kubelet's rule)."""
    connection = request.headers.get("Connection", "").lower()
    upgrade = request.headers.get("Upgrade", "").lower()
    if "upgrade" not in connection or "spdy/3.1" not in upgrade:
        raise UpgradeRefused(
            web.Response(status=400, text="unable to upgrade: this endpoint needs Connection: Upgrade and "
                         "Upgrade: SPDY/3.1 (the protocol the API server uses toward kubelets)\n")
        )  # fmt: skip
    offered = [p.strip() for value in request.headers.getall(PROTOCOL_HEADER, []) for p in value.split(",")]
    offered = [p for p in offered if p]
    if not offered:
        raise UpgradeRefused(web.Response(status=400, text=f"unable to upgrade: header {PROTOCOL_HEADER} is missing\n"))
    for protocol in offered:
        if protocol in supported:
            return protocol
    response = web.Response(
        status=403,
        text=f"unable to upgrade: unable to negotiate protocol: client supports {offered}, "
        f"server accepts {supported}\n",
    )
    for protocol in supported:
        response.headers.add(ACCEPTED_PROTOCOLS_HEADER, protocol)
    raise UpgradeRefused(response)


class SwitchingProtocols(web.StreamResponse):
    """The 101 answer. Once sent, the connection belongs to SPDY: aiohttp must write nothing more."""

    def __init__(self, protocol: str):
        headers = {"Connection": "Upgrade", "Upgrade": "SPDY/3.1", PROTOCOL_HEADER: protocol}
        super().__init__(status=101, headers=headers)
        self.force_close()

    async def write_eof(self, data: bytes = b"") -> None:
        return None


async def switch_to_spdy(
    request: web.Request, protocol: str, on_stream: StreamHandler
) -> tuple[SpdyConnection, web.StreamResponse]:
    """Send 101 and hand the connection's bytes to a new SpdyConnection. The route must keep running
    for as long as the connection is in use, then return the response."""
    transport = request.transport
    if transport is None:
        raise ConnectionResetError("the client went away before the upgrade")
    response = SwitchingProtocols(protocol)
    writer_holder: list[AbstractStreamWriter] = []

    async def drain() -> None:
        if writer_holder:
            await writer_holder[0].drain()

    conn = SpdyConnection(transport.write, drain, transport.close, on_stream)
    # Before the 101: the client may send its first SYN_STREAM as soon as it reads it.
    request.protocol.set_parser(conn)  # type: ignore[arg-type]
    request.protocol.keep_alive(False)
    writer_holder.append(await response.prepare(request))
    return conn, response

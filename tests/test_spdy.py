"""SPDY/3.1 framing, header compression, the server connection and the HTTP upgrade
(agent/kubelet_api/spdy.py, spdy_conn.py, upgrade.py)."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import zlib
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from conftest import free_port

from agent.kubelet_api import spdy
from agent.kubelet_api.spdy_conn import SpdyConnection, SpdyStream, StreamResetError
from agent.kubelet_api.upgrade import UpgradeRefused, negotiate, switch_to_spdy

# Written by github.com/moby/spdystream's Framer (the API server's SPDY client), v0.5.1:
# SYN_STREAM 1 {streamtype: error}; SYN_STREAM 3 FIN {streamtype: data, port: 8080, requestid: 0};
# DATA 3 FIN "hello"; PING 1. The two header blocks share one zlib stream.
GO_FRAMES = bytes.fromhex(
    "80030001000000290000000100000000000078f9e3c6a7c26260606004a7b392a2d4c45c6851c29a0a0a6800000000ffff"
    "800300010100002f0000000300000000000002a5470c295029930829b08bc079c3c2c0c280818181b30812c199a084cf68"
    "00000000ffff000000030100000568656c6c6f800300060000000400000001"
)


def test_dictionary_is_the_spdy3_one() -> None:
    assert len(spdy.HEADER_DICTIONARY) == 1423
    assert zlib.adler32(spdy.HEADER_DICTIONARY) == 0xE3C6A7C2  # the id compressed blocks carry


def test_frames_written_by_the_go_client_parse() -> None:
    frames = spdy.FrameParser().feed(GO_FRAMES)
    assert [type(f).__name__ for f in frames] == ["ControlFrame", "ControlFrame", "DataFrame", "ControlFrame"]
    first, second, data, ping = frames
    assert isinstance(first, spdy.ControlFrame) and first.type == spdy.SYN_STREAM
    assert (first.stream_id, first.fin, first.headers) == (1, False, {"streamtype": ["error"]})
    assert isinstance(second, spdy.ControlFrame)
    assert second.fin and second.headers == {"streamtype": ["data"], "port": ["8080"], "requestid": ["0"]}
    assert isinstance(data, spdy.DataFrame) and (data.stream_id, data.data, data.fin) == (3, b"hello", True)
    assert isinstance(ping, spdy.ControlFrame) and (ping.type, ping.ping_id) == (spdy.PING, 1)


def test_frames_survive_any_split() -> None:
    whole = spdy.FrameParser().feed(GO_FRAMES)
    parser = spdy.FrameParser()
    pieces = [frame for i in range(len(GO_FRAMES)) for frame in parser.feed(GO_FRAMES[i : i + 1])]
    assert pieces == whole


def test_header_blocks_share_one_compression_context() -> None:
    compressor, decompressor = spdy.HeaderCompressor(), spdy.HeaderDecompressor()
    blocks = [
        {"streamtype": ["stdout"]},
        {"streamtype": ["stderr"], "x-multi": ["a", "b"]},
        {},
        {"Mixed-Case": ["kept"]},
    ]
    encoded = [compressor.compress(h) for h in blocks]
    assert len(encoded[1]) < len(spdy.encode_header_block(blocks[1]))  # the context pays off
    assert all(block.endswith(b"\x00\x00\xff\xff") for block in encoded)  # sync flush: whole blocks
    decoded = [decompressor.decompress(block) for block in encoded]
    assert decoded == [*blocks[:3], {"mixed-case": ["kept"]}]  # names are lower case on the wire


def test_every_frame_type_round_trips() -> None:
    c = spdy.HeaderCompressor()
    wire = b"".join(
        [
            spdy.syn_stream_frame(c, 5, {"streamtype": ["stdin"]}, fin=True, priority=3),
            spdy.syn_reply_frame(c, 5, {}),
            spdy.headers_frame(c, 5, {"a": ["b"]}, fin=True),
            spdy.data_frame(5, b"x" * 70000),
            spdy.data_frame(5, b"", fin=True),
            spdy.rst_stream_frame(5, spdy.CANCEL),
            spdy.settings_frame([(0, 7, 65536), (1, 4, 100)]),
            spdy.ping_frame(2),
            spdy.window_update_frame(5, 1024),
            spdy.goaway_frame(7, spdy.GOAWAY_OK),
        ]
    )
    frames = spdy.FrameParser().feed(wire)
    syn, reply, headers, big, fin, rst, settings, ping, window, goaway = frames
    assert isinstance(syn, spdy.ControlFrame) and (syn.stream_id, syn.fin, syn.priority) == (5, True, 3)
    assert syn.headers == {"streamtype": ["stdin"]}
    assert isinstance(reply, spdy.ControlFrame) and (reply.type, reply.headers) == (spdy.SYN_REPLY, {})
    assert isinstance(headers, spdy.ControlFrame) and headers.fin and headers.headers == {"a": ["b"]}
    assert isinstance(big, spdy.DataFrame) and len(big.data) == 70000 and not big.fin
    assert isinstance(fin, spdy.DataFrame) and fin.fin and fin.data == b""
    assert isinstance(rst, spdy.ControlFrame) and (rst.stream_id, rst.status) == (5, spdy.CANCEL)
    assert isinstance(settings, spdy.ControlFrame) and settings.settings == [(0, 7, 65536), (1, 4, 100)]
    assert isinstance(ping, spdy.ControlFrame) and ping.ping_id == 2
    assert isinstance(window, spdy.ControlFrame) and (window.stream_id, window.delta) == (5, 1024)
    assert isinstance(goaway, spdy.ControlFrame) and (goaway.type, goaway.stream_id) == (spdy.GOAWAY, 7)


def test_other_versions_and_bad_blocks_are_protocol_errors() -> None:
    v2_ping = bytes.fromhex("8002000600000004") + b"\x00\x00\x00\x01"
    with pytest.raises(spdy.SpdyProtocolError, match="version 2"):
        spdy.FrameParser().feed(v2_ping)
    garbage_block = spdy._control(spdy.SYN_REPLY, 0, b"\x00\x00\x00\x01" + b"not zlib at all")
    with pytest.raises(spdy.SpdyProtocolError, match="compressed header block"):
        spdy.FrameParser().feed(garbage_block)


def test_unknown_control_frames_are_skipped() -> None:
    unknown = spdy._control(0x42, 0, b"\x01\x02\x03")
    frames = spdy.FrameParser().feed(unknown + spdy.ping_frame(3))
    assert len(frames) == 1 and isinstance(frames[0], spdy.ControlFrame) and frames[0].ping_id == 3


# --- the server connection, driven by a client made of the same frame writers ----------------------


class Wire:
    """The client end: writes frames into the connection, reads what the connection sends back."""

    def __init__(self, accept: bool = True):
        self.out = bytearray()
        self.transport_closed = False
        self.accepted: list[SpdyStream] = []
        self.compressor = spdy.HeaderCompressor()
        self.parser = spdy.FrameParser()

        def on_stream(stream: SpdyStream) -> bool:
            if accept:
                self.accepted.append(stream)
            return accept

        async def drain() -> None:
            return None

        self.conn = SpdyConnection(self.out.extend, drain, self._close, on_stream)

    def _close(self) -> None:
        self.transport_closed = True

    def send(self, *frames: bytes) -> None:
        self.conn.feed_data(b"".join(frames))

    def received(self) -> list[spdy.Frame]:
        frames = self.parser.feed(bytes(self.out))
        self.out.clear()
        return frames


async def test_streams_are_replied_to_and_carry_data_both_ways() -> None:
    w = Wire()
    w.send(spdy.syn_stream_frame(w.compressor, 1, {"streamType": ["stdin"]}))
    (reply,) = w.received()
    assert isinstance(reply, spdy.ControlFrame) and (reply.type, reply.stream_id) == (spdy.SYN_REPLY, 1)
    stream = w.accepted[0]
    assert stream.header("streamtype") == "stdin"

    w.send(spdy.data_frame(1, b"abc"), spdy.data_frame(1, b"def", fin=True))
    assert await stream.read_all() == b"abcdef"
    assert stream.remote_closed

    await stream.write(b"y" * 40000)  # more than one DATA frame
    stream.close()
    frames = w.received()
    assert b"".join(f.data for f in frames if isinstance(f, spdy.DataFrame)) == b"y" * 40000
    last = frames[-1]
    assert isinstance(last, spdy.DataFrame) and last.fin and last.data == b""
    with pytest.raises(StreamResetError):
        await stream.write(b"after FIN")


async def test_refused_and_out_of_order_streams_get_reset() -> None:
    w = Wire(accept=False)
    w.send(spdy.syn_stream_frame(w.compressor, 1, {"streamType": ["bogus"]}))
    (rst,) = w.received()
    assert isinstance(rst, spdy.ControlFrame) and (rst.type, rst.status) == (spdy.RST_STREAM, spdy.REFUSED_STREAM)

    w = Wire()
    w.send(spdy.syn_stream_frame(w.compressor, 5, {}))
    w.send(spdy.syn_stream_frame(w.compressor, 3, {}))  # ids must grow
    w.send(spdy.syn_stream_frame(w.compressor, 6, {}))  # even ids are the server's
    frames = w.received()
    assert [(f.type, f.stream_id) for f in frames if isinstance(f, spdy.ControlFrame)] == [
        (spdy.SYN_REPLY, 5),
        (spdy.RST_STREAM, 3),
        (spdy.RST_STREAM, 6),
    ]


async def test_client_reset_ends_the_stream() -> None:
    w = Wire()
    w.send(spdy.syn_stream_frame(w.compressor, 1, {}))
    stream = w.accepted[0]
    w.send(spdy.rst_stream_frame(1, spdy.CANCEL))
    assert await stream.read() == b""
    assert stream.reset
    with pytest.raises(StreamResetError):
        await stream.write(b"x")


async def test_pings_from_the_client_are_echoed_and_flow_control_frames_ignored() -> None:
    w = Wire()
    w.send(spdy.settings_frame([(0, 7, 1 << 20)]), spdy.window_update_frame(0, 100), spdy.ping_frame(7))
    (pong,) = w.received()
    assert isinstance(pong, spdy.ControlFrame) and (pong.type, pong.ping_id) == (spdy.PING, 7)
    w.send(spdy.ping_frame(8))  # an answer to a ping of ours (even): nothing to say
    assert w.received() == []


async def test_goaway_and_eof_close_every_stream() -> None:
    w = Wire()
    w.send(spdy.syn_stream_frame(w.compressor, 1, {}), spdy.syn_stream_frame(w.compressor, 3, {}))
    w.send(spdy.goaway_frame(0))
    assert w.conn.closed.is_set() and w.conn.goaway_received
    assert [s.reset for s in w.accepted] == [True, True]
    assert await asyncio.wait_for(w.accepted[0].read(), 1) == b""

    w = Wire()
    w.send(spdy.syn_stream_frame(w.compressor, 1, {}))
    w.conn.feed_eof()
    assert w.conn.closed.is_set() and w.accepted[0].reset


async def test_protocol_error_says_goaway_and_drops_the_transport() -> None:
    w = Wire()
    w.send(bytes.fromhex("8002000600000004") + b"\x00\x00\x00\x01")
    (goaway,) = w.received()
    assert isinstance(goaway, spdy.ControlFrame) and goaway.type == spdy.GOAWAY and goaway.status == 1
    assert w.transport_closed and w.conn.closed.is_set()


# --- the HTTP upgrade, over real TLS -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    directory = tmp_path_factory.mktemp("tls")
    cert, key = str(directory / "cert.pem"), str(directory / "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "1",
         "-subj", "/CN=127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture
async def echo_server(tls_files: tuple[str, str]) -> AsyncIterator[int]:
    """An HTTPS server whose /echo upgrades to SPDY and answers each stream's data upper-cased."""

    async def echo(request: web.Request) -> web.StreamResponse:
        try:
            protocol = negotiate(request, ["v4.channel.k8s.io", "v3.channel.k8s.io"])
        except UpgradeRefused as refused:
            return refused.response
        tasks: set[asyncio.Task[None]] = set()

        async def answer(stream: SpdyStream) -> None:
            await stream.write((await stream.read_all()).upper())
            stream.close()

        def accept(stream: SpdyStream) -> bool:
            tasks.add(asyncio.ensure_future(answer(stream)))  # runs once the SYN_REPLY is out
            return True

        conn, response = await switch_to_spdy(request, protocol, accept)
        await conn.closed.wait()
        conn.close()
        return response

    app = web.Application()
    app.router.add_post("/echo", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*tls_files)
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=context).start()
    yield port
    await runner.cleanup()


async def _request(port: int, headers: str) -> tuple[str, asyncio.StreamReader, asyncio.StreamWriter]:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    writer.write(f"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n{headers}\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    return head.decode(), reader, writer


UPGRADE = "Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"


async def test_upgrade_over_tls_then_spdy_streams(echo_server: int) -> None:
    head, reader, writer = await _request(
        echo_server, UPGRADE + "X-Stream-Protocol-Version: v5.channel.k8s.io\r\nX-Stream-Protocol-Version: "
        "v4.channel.k8s.io, v3.channel.k8s.io\r\n"
    )  # fmt: skip
    assert head.startswith("HTTP/1.1 101")
    assert "X-Stream-Protocol-Version: v4.channel.k8s.io" in head  # the client's first that we speak
    assert "Transfer-Encoding" not in head and "Content-Length" not in head

    compressor, parser = spdy.HeaderCompressor(), spdy.FrameParser()
    writer.write(spdy.syn_stream_frame(compressor, 1, {"streamType": ["stdin"]}))
    writer.write(spdy.syn_stream_frame(compressor, 3, {"streamType": ["stdout"]}))
    writer.write(spdy.data_frame(1, b"hello ") + spdy.data_frame(1, b"spdy", fin=True))
    writer.write(spdy.data_frame(3, b"", fin=True))
    frames: list[spdy.Frame] = []
    while sum(1 for f in frames if isinstance(f, spdy.DataFrame) and f.fin) < 2:
        frames += parser.feed(await asyncio.wait_for(reader.read(65536), 5))
    replies = [f.stream_id for f in frames if isinstance(f, spdy.ControlFrame) and f.type == spdy.SYN_REPLY]
    assert replies == [1, 3]
    assert b"".join(f.data for f in frames if isinstance(f, spdy.DataFrame) and f.stream_id == 1) == b"HELLO SPDY"

    writer.write(spdy.goaway_frame(0))
    assert await asyncio.wait_for(reader.read(), 5) == b""  # the server hangs up after GOAWAY
    writer.close()


async def test_upgrade_refusals_name_the_problem(echo_server: int) -> None:
    head, _, writer = await _request(echo_server, UPGRADE + "X-Stream-Protocol-Version: channel.k8s.io\r\n")
    writer.close()
    assert head.startswith("HTTP/1.1 403")
    assert "X-Accepted-Stream-Protocol-Versions: v4.channel.k8s.io" in head

    head, _, writer = await _request(echo_server, UPGRADE)
    writer.close()
    assert head.startswith("HTTP/1.1 400")

    head, _, writer = await _request(echo_server, "X-Stream-Protocol-Version: v4.channel.k8s.io\r\n")
    writer.close()
    assert head.startswith("HTTP/1.1 400")

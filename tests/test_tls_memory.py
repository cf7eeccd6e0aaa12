"""The agent's TLS connections read into 64 KiB buffers, not asyncio's 256 KiB."""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import ssl
import subprocess

import pytest

from agent.tls_memory import TLS_READ_BUFFER, shrink_tls_read_buffers


@pytest.fixture
def restore_default():
    default = asyncio.sslproto.SSLProtocol.max_size
    yield default
    asyncio.sslproto.SSLProtocol.max_size = default


async def test_new_tls_connections_get_the_smaller_buffer(restore_default):
    assert restore_default == 256 * 1024  # what this Python gives each connection
    assert shrink_tls_read_buffers() is True
    loop = asyncio.get_running_loop()
    protocol = asyncio.sslproto.SSLProtocol(
        loop, asyncio.Protocol(), ssl.create_default_context(), loop.create_future(), server_hostname="x"
    )
    assert len(protocol._ssl_buffer) == TLS_READ_BUFFER == 64 * 1024


@pytest.fixture
def self_signed(tmp_path):
    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_tls_still_carries_a_response_larger_than_the_buffer(restore_default, self_signed):
    """A 1 MiB body over TLS arrives whole with the smaller buffer."""
    shrink_tls_read_buffers()
    cert, key = self_signed
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    payload = bytes(range(256)) * 4096  # 1 MiB

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(payload)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    client_ctx = ssl.create_default_context(cafile=cert)
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
    writer.write(b"go\n")
    received = await reader.read(-1)
    writer.close()
    server.close()
    await server.wait_closed()
    assert received == payload

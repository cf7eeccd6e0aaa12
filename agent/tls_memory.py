"""Smaller TLS read buffers for the agent's many API connections.

asyncio gives every TLS connection a 256 KiB read buffer, zero-filled, so it is resident
at once: with the 128 write connections a Pod burst opens, that alone was ~40 MiB of the
agent's RSS. A TLS record carries at most 16 KiB, so 64 KiB still takes several records
per read; measured with 150 connections: 46.6 MiB at 256 KiB, 18.7 MiB at 64 KiB.
"""

from __future__ import annotations

import asyncio.sslproto

TLS_READ_BUFFER = 64 * 1024


def shrink_tls_read_buffers(size: int = TLS_READ_BUFFER) -> bool:
    """Set the read buffer of TLS connections made from now on; False where this Python
    has no such setting (then nothing changes: the default only costs memory)."""
    protocol = getattr(asyncio.sslproto, "SSLProtocol", None)
    if protocol is None or not isinstance(getattr(protocol, "max_size", None), int):
        return False
    protocol.max_size = size
    return True

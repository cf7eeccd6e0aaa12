"""SPDY/3.1 framing: the multiplexing protocol the API server speaks to kubelets for exec, attach and
port-forward (client side: github.com/moby/spdystream, through k8s.io/streaming's httpstream/spdy).

Pure functions and a byte-fed parser, no I/O: spdy_conn.py runs them on a connection. Header blocks
are zlib-compressed with the SPDY/3 dictionary, one compression context per direction for the whole
connection, each block ended by a sync flush (the Go reader checks that a block uses up exactly its
frame's bytes).

No maintained SPDY/3.1 package exists on PyPI (spdy-py 0.2.0 from 2021 only parses frames, and has
no header compression for writing), hence this small implementation of the parts spdystream uses.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

VERSION = 3

# Control frame types
SYN_STREAM = 1
SYN_REPLY = 2
RST_STREAM = 3
SETTINGS = 4
PING = 6
GOAWAY = 7
HEADERS = 8
WINDOW_UPDATE = 9

FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02  # SYN_STREAM only

# RST_STREAM status codes
PROTOCOL_ERROR = 1
INVALID_STREAM = 2
REFUSED_STREAM = 3
CANCEL = 5
INTERNAL_ERROR = 6

GOAWAY_OK = 0
GOAWAY_PROTOCOL_ERROR = 1

MAX_FRAME_LENGTH = 0xFFFFFF
HEADER_VALUE_SEPARATOR = b"\x00"  # several values of one header, joined

# The SPDY/3 header compression dictionary (draft-mbelshe-httpbis-spdy-00, section 2.6.10.1);
# its Adler-32 is the dictionary id 0xe3c6a7c2 that compressed blocks name.
HEADER_DICTIONARY = (
    b"\x00\x00\x00\x07options\x00\x00\x00\x04head\x00\x00\x00\x04post\x00\x00\x00\x03put\x00\x00\x00\x06de"
    b"lete\x00\x00\x00\x05trace\x00\x00\x00\x06accept\x00\x00\x00\x0eaccept-charset\x00\x00\x00\x0faccept-"
    b"encoding\x00\x00\x00\x0faccept-language\x00\x00\x00\x0daccept-ranges\x00\x00\x00\x03age\x00\x00\x00\x05"
    b"allow\x00\x00\x00\x0dauthorization\x00\x00\x00\x0dcache-control\x00\x00\x00\x0aconnection\x00\x00\x00"
    b"\x0ccontent-base\x00\x00\x00\x10content-encoding\x00\x00\x00\x10content-language\x00\x00\x00\x0econt"
    b"ent-length\x00\x00\x00\x10content-location\x00\x00\x00\x0bcontent-md5\x00\x00\x00\x0dcontent-range\x00"
    b"\x00\x00\x0ccontent-type\x00\x00\x00\x04date\x00\x00\x00\x04etag\x00\x00\x00\x06expect\x00\x00\x00\x07"
    b"expires\x00\x00\x00\x04from\x00\x00\x00\x04host\x00\x00\x00\x08if-match\x00\x00\x00\x11if-modified-s"
    b"ince\x00\x00\x00\x0dif-none-match\x00\x00\x00\x08if-range\x00\x00\x00\x13if-unmodified-since\x00\x00"
    b"\x00\x0dlast-modified\x00\x00\x00\x08location\x00\x00\x00\x0cmax-forwards\x00\x00\x00\x06pragma\x00\x00"
    b"\x00\x12proxy-authenticate\x00\x00\x00\x13proxy-authorization\x00\x00\x00\x05range\x00\x00\x00\x07re"
    b"ferer\x00\x00\x00\x0bretry-after\x00\x00\x00\x06server\x00\x00\x00\x02te\x00\x00\x00\x07trailer\x00\x00"
    b"\x00\x11transfer-encoding\x00\x00\x00\x07upgrade\x00\x00\x00\x0auser-agent\x00\x00\x00\x04vary\x00\x00"
    b"\x00\x03via\x00\x00\x00\x07warning\x00\x00\x00\x10www-authenticate\x00\x00\x00\x06method\x00\x00\x00"
    b"\x03get\x00\x00\x00\x06status\x00\x00\x00\x06200 OK\x00\x00\x00\x07version\x00\x00\x00\x08HTTP/1.1\x00"
    b"\x00\x00\x03url\x00\x00\x00\x06public\x00\x00\x00\x0aset-cookie\x00\x00\x00\x0akeep-alive\x00\x00\x00"
    b"\x06origin100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505"
    b"203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request401 Unauthorized4"
    b"03 Forbidden404 Not Found500 Internal Server Error501 Not Implemented503 Service UnavailableJan Feb "
    b"Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text"
    b"/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,text/javascript"
    b",publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
)

Headers = dict[str, list[str]]


class SpdyProtocolError(Exception):
    """The peer sent something that is not SPDY/3.1: the connection cannot go on."""


@dataclass
class DataFrame:
    stream_id: int
    data: bytes
    flags: int = 0

    @property
    def fin(self) -> bool:
        return bool(self.flags & FLAG_FIN)


@dataclass
class ControlFrame:
    """Any control frame; the fields a type does not have stay at their defaults."""

    type: int
    flags: int = 0
    stream_id: int = 0  # SYN_STREAM, SYN_REPLY, RST_STREAM, HEADERS, WINDOW_UPDATE; GOAWAY: last good id
    associated_id: int = 0  # SYN_STREAM
    priority: int = 0  # SYN_STREAM
    headers: Headers = field(default_factory=dict)  # SYN_STREAM, SYN_REPLY, HEADERS
    status: int = 0  # RST_STREAM, GOAWAY
    ping_id: int = 0  # PING
    delta: int = 0  # WINDOW_UPDATE
    settings: list[tuple[int, int, int]] = field(default_factory=list)  # SETTINGS: (flags, id, value)

    @property
    def fin(self) -> bool:
        return bool(self.flags & FLAG_FIN)


Frame = DataFrame | ControlFrame


class HeaderCompressor:
    """Our direction's compression context: one zlib stream for every header block we send."""

    def __init__(self) -> None:
        self._z = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY,
                                   HEADER_DICTIONARY)  # fmt: skip

    def compress(self, headers: Headers) -> bytes:
        return self._z.compress(encode_header_block(headers)) + self._z.flush(zlib.Z_SYNC_FLUSH)


class HeaderDecompressor:
    """The peer's compression context: every header block it sends continues one zlib stream."""

    def __init__(self) -> None:
        self._z = zlib.decompressobj(zdict=HEADER_DICTIONARY)

    def decompress(self, block: bytes) -> Headers:
        try:
            raw = self._z.decompress(block)
        except zlib.error as exc:
            raise SpdyProtocolError(f"bad compressed header block: {exc}") from exc
        return decode_header_block(raw)


def encode_header_block(headers: Headers) -> bytes:
    parts = [struct.pack(">I", len(headers))]
    for name, values in headers.items():
        key = name.lower().encode()
        value = HEADER_VALUE_SEPARATOR.join(v.encode() for v in values)
        parts += [struct.pack(">I", len(key)), key, struct.pack(">I", len(value)), value]
    return b"".join(parts)


def decode_header_block(raw: bytes) -> Headers:
    try:
        (count,) = struct.unpack_from(">I", raw, 0)
        pos = 4
        headers: Headers = {}
        for _ in range(count):
            (n,) = struct.unpack_from(">I", raw, pos)
            name = raw[pos + 4 : pos + 4 + n].decode().lower()
            pos += 4 + n
            (n,) = struct.unpack_from(">I", raw, pos)
            value = raw[pos + 4 : pos + 4 + n]
            if len(value) != n:
                raise SpdyProtocolError("header block shorter than its lengths say")
            pos += 4 + n
            headers.setdefault(name, []).extend(v.decode() for v in value.split(HEADER_VALUE_SEPARATOR))
    except (struct.error, UnicodeDecodeError) as exc:
        raise SpdyProtocolError(f"bad header block: {exc}") from exc
    return headers


# --- writing -------------------------------------------------------------------------------------


def _control(frame_type: int, flags: int, payload: bytes) -> bytes:
    if len(payload) > MAX_FRAME_LENGTH:
        raise ValueError(f"control frame of {len(payload)} bytes exceeds the SPDY limit")
    return struct.pack(">HHI", 0x8000 | VERSION, frame_type, (flags << 24) | len(payload)) + payload


def data_frame(stream_id: int, data: bytes, fin: bool = False) -> bytes:
    if len(data) > MAX_FRAME_LENGTH:
        raise ValueError(f"data frame of {len(data)} bytes exceeds the SPDY limit")
    flags = FLAG_FIN if fin else 0
    return struct.pack(">II", stream_id & 0x7FFFFFFF, (flags << 24) | len(data)) + data


def syn_stream_frame(
    compressor: HeaderCompressor, stream_id: int, headers: Headers, fin: bool = False, priority: int = 0
) -> bytes:
    payload = struct.pack(">IIBB", stream_id, 0, (priority & 7) << 5, 0) + compressor.compress(headers)
    return _control(SYN_STREAM, FLAG_FIN if fin else 0, payload)


def syn_reply_frame(compressor: HeaderCompressor, stream_id: int, headers: Headers, fin: bool = False) -> bytes:
    return _control(SYN_REPLY, FLAG_FIN if fin else 0, struct.pack(">I", stream_id) + compressor.compress(headers))


def headers_frame(compressor: HeaderCompressor, stream_id: int, headers: Headers, fin: bool = False) -> bytes:
    return _control(HEADERS, FLAG_FIN if fin else 0, struct.pack(">I", stream_id) + compressor.compress(headers))


def rst_stream_frame(stream_id: int, status: int) -> bytes:
    return _control(RST_STREAM, 0, struct.pack(">II", stream_id, status))


def settings_frame(settings: list[tuple[int, int, int]]) -> bytes:
    body = b"".join(struct.pack(">II", (flags << 24) | sid, value) for flags, sid, value in settings)
    return _control(SETTINGS, 0, struct.pack(">I", len(settings)) + body)


def ping_frame(ping_id: int) -> bytes:
    return _control(PING, 0, struct.pack(">I", ping_id))


def goaway_frame(last_good_stream_id: int, status: int = GOAWAY_OK) -> bytes:
    return _control(GOAWAY, 0, struct.pack(">II", last_good_stream_id, status))


def window_update_frame(stream_id: int, delta: int) -> bytes:
    return _control(WINDOW_UPDATE, 0, struct.pack(">II", stream_id, delta))


# --- reading -------------------------------------------------------------------------------------


class FrameParser:
    """Feed it bytes as they arrive; it returns the whole frames they complete."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._headers = HeaderDecompressor()

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames: list[Frame] = []
        while len(self._buf) >= 8:
            word, flags_length = struct.unpack_from(">II", self._buf, 0)
            length = flags_length & 0xFFFFFF
            if len(self._buf) < 8 + length:
                break
            payload = bytes(self._buf[8 : 8 + length])
            del self._buf[: 8 + length]
            flags = flags_length >> 24
            if word & 0x80000000:
                version, frame_type = (word >> 16) & 0x7FFF, word & 0xFFFF
                if version != VERSION:
                    raise SpdyProtocolError(f"SPDY version {version} frame; only version 3 is spoken here")
                frame = self._control(frame_type, flags, payload)
                if frame is not None:
                    frames.append(frame)
            else:
                frames.append(DataFrame(word & 0x7FFFFFFF, payload, flags))
        return frames

    def _control(self, frame_type: int, flags: int, p: bytes) -> ControlFrame | None:
        try:
            if frame_type == SYN_STREAM:
                sid, assoc, prio, _slot = struct.unpack_from(">IIBB", p, 0)
                return ControlFrame(SYN_STREAM, flags, sid & 0x7FFFFFFF, assoc & 0x7FFFFFFF, prio >> 5,
                                    self._headers.decompress(p[10:]))  # fmt: skip
            if frame_type in (SYN_REPLY, HEADERS):
                (sid,) = struct.unpack_from(">I", p, 0)
                return ControlFrame(frame_type, flags, sid & 0x7FFFFFFF, headers=self._headers.decompress(p[4:]))
            if frame_type == RST_STREAM:
                sid, status = struct.unpack_from(">II", p, 0)
                return ControlFrame(RST_STREAM, flags, sid & 0x7FFFFFFF, status=status)
            if frame_type == SETTINGS:
                (count,) = struct.unpack_from(">I", p, 0)
                entries = [struct.unpack_from(">II", p, 4 + 8 * i) for i in range(count)]
                return ControlFrame(SETTINGS, flags, settings=[(i >> 24, i & 0xFFFFFF, v) for i, v in entries])
            if frame_type == PING:
                return ControlFrame(PING, flags, ping_id=struct.unpack_from(">I", p, 0)[0])
            if frame_type == GOAWAY:
                sid, status = struct.unpack_from(">II", p, 0)
                return ControlFrame(GOAWAY, flags, sid & 0x7FFFFFFF, status=status)
            if frame_type == WINDOW_UPDATE:
                sid, delta = struct.unpack_from(">II", p, 0)
                return ControlFrame(WINDOW_UPDATE, flags, sid & 0x7FFFFFFF, delta=delta & 0x7FFFFFFF)
        except struct.error as exc:
            raise SpdyProtocolError(f"control frame type {frame_type} too short: {exc}") from exc
        return None  # unknown control frames are ignored, as the spec asks

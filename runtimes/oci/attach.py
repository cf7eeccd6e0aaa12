"""Attach to a running oci container: the shim serves the container's stdio on a unix socket.

Frames both ways: 1 byte type, 4 bytes big-endian length, payload. The shim sends STDOUT and
STDERR as the container writes them (the CRI log gets them too); a client sends STDIN data,
CLOSE_STDIN when its input ends, and RESIZE (width, height: two big-endian 16-bit numbers) for a
container with a terminal. With the container's `stdinOnce`, its stdin closes when the
first client that wrote to it goes away, as the kubelet documents. Standard library only on
the shim side (AttachHub, no asyncio: the shim stays small); the agent's client is
runtimes/oci/stream.py AttachProcess.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import socket
import struct
from collections.abc import Callable

STDIN, STDOUT, STDERR, CLOSE_STDIN, RESIZE = 0, 1, 2, 3, 4
HEADER = struct.Struct(">BI")
SIZE = struct.Struct(">HH")  # RESIZE payload: width, height
MAX_FRAME = 1 << 20
SEND_TIMEOUT = 1.0  # a client that does not read for this long is dropped, so logs never stall


def frame(kind: int, data: bytes = b"") -> bytes:
    return HEADER.pack(kind, len(data)) + data


# --- shim side ---------------------------------------------------------------------------------------


class AttachHub:
    """Accepts clients on `path`, fans the container's output out to them and feeds their input
    to the container's stdin (a non-blocking pipe, buffered here when the container is slow)."""

    def __init__(
        self, sel: selectors.BaseSelector, path: str, stdin_fd: int | None, stdin_once: bool,
        on_resize: Callable[[int, int], None] | None = None,
    ):  # fmt: skip
        self.sel, self.path, self.stdin_fd, self.stdin_once = sel, path, stdin_fd, stdin_once
        self.on_resize = on_resize  # a container with a terminal: set its window size
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        os.chmod(path, 0o600)
        self.server.listen(8)
        self.server.setblocking(False)
        self.clients: dict[int, tuple[socket.socket, bytearray]] = {}
        self.writers: set[int] = set()  # clients that sent stdin
        self.pending = bytearray()  # stdin the container has not read yet
        sel.register(self.server, selectors.EVENT_READ, self._accept)
        if stdin_fd is not None:
            os.set_blocking(stdin_fd, False)

    def _accept(self, _mask: int) -> None:
        try:
            conn, _ = self.server.accept()
        except BlockingIOError:
            return
        conn.setblocking(True)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", int(SEND_TIMEOUT), 0))
        self.clients[conn.fileno()] = (conn, bytearray())
        self.sel.register(conn, selectors.EVENT_READ, lambda mask, c=conn: self._readable(c))

    def _readable(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(65536)
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return
        buffer = self.clients[conn.fileno()][1]
        buffer += data
        while len(buffer) >= HEADER.size:
            kind, size = HEADER.unpack_from(buffer)
            if size > MAX_FRAME:
                self._drop(conn)
                return
            if len(buffer) < HEADER.size + size:
                break
            payload = bytes(buffer[HEADER.size : HEADER.size + size])
            del buffer[: HEADER.size + size]
            if kind == STDIN and payload:
                self.writers.add(conn.fileno())
                self._stdin(payload)
            elif kind == CLOSE_STDIN and self.stdin_once:
                self._close_stdin()
            elif kind == RESIZE and self.on_resize is not None and size == SIZE.size:
                self.on_resize(*SIZE.unpack(payload))

    def _stdin(self, data: bytes) -> None:
        if self.stdin_fd is None:
            return
        self.pending += data
        self._flush(selectors.EVENT_WRITE)

    def _flush(self, _mask: int) -> None:
        if self.stdin_fd is None:
            return
        try:
            while self.pending:
                written = os.write(self.stdin_fd, self.pending)
                del self.pending[:written]
        except BlockingIOError:
            pass
        except OSError as exc:  # EPIPE: the container closed its stdin
            if exc.errno != errno.EPIPE:
                raise
            self.pending.clear()
        registered = self.stdin_fd in self.sel.get_map()
        if self.pending and not registered:
            self.sel.register(self.stdin_fd, selectors.EVENT_WRITE, self._flush)
        elif not self.pending and registered:
            self.sel.unregister(self.stdin_fd)

    def _close_stdin(self) -> None:
        if self.stdin_fd is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(self.stdin_fd)
        os.close(self.stdin_fd)
        self.stdin_fd = None

    def _drop(self, conn: socket.socket) -> None:
        fd = conn.fileno()
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(conn)
        self.clients.pop(fd, None)
        conn.close()
        if fd in self.writers:
            self.writers.discard(fd)
            if self.stdin_once:
                self._close_stdin()

    def broadcast(self, stream: str, data: bytes) -> None:
        message = frame(STDOUT if stream == "stdout" else STDERR, data)
        for conn, _ in list(self.clients.values()):
            try:
                conn.sendall(message)
            except OSError:
                self._drop(conn)

    def close(self) -> None:
        for conn, _ in list(self.clients.values()):
            self._drop(conn)
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(self.server)
        self.server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._close_stdin()

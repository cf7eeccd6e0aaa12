"""Read one container's CRI log file the way the kubelet does (k8s.io/cri-client pkg/logs, v1.36).

What `kubectl logs` sees, byte for byte:
- only the current file `<restartCount>.log`: like the kubelet, rotated files are not read;
- `tailLines` counts records (a P piece is a record) from the end of that file, then `since` filters;
- a P piece is written without a newline, so pieces join into their line; with `timestamps`, the
  prefix (RFC 3339 with exactly 9 fraction digits) goes only where an output line starts;
- `limitBytes` counts output bytes, timestamps included, and cuts the last line;
- following, new records are streamed until the container stops running (then the rest of the file
  is drained); when the file is rotated away, reading goes on in the new file.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import BinaryIO

_TIMESTAMP = re.compile(rb"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)")
TAIL_BLOCK = 1024  # the kubelet's blockSize for finding the tail's start
FORCE_CHECK = 1.0  # the kubelet's logForceCheckPeriod: how often a follower re-checks the container
POLL = 0.1  # how often a follower looks for new bytes (the kubelet uses inotify; polling is enough here)
BATCH = 64 * 1024  # bytes handed to the response at once


class LogReadError(Exception):
    """The log cannot be read; the message is the kubelet's."""


@dataclass
class LogOptions:
    tail_lines: int | None = None  # None: all
    limit_bytes: int | None = None  # None: no limit
    since_ns: int = 0  # epoch nanoseconds; records before it are skipped
    follow: bool = False
    timestamps: bool = False
    stdout: bool = True
    stderr: bool = True


@dataclass(slots=True)
class Record:
    timestamp: re.Match[bytes]  # the parsed time; converted only when `since` or `timestamps` need it
    stream: str
    partial: bool
    message: bytes  # a full record keeps its newline, a partial piece has none

    @property
    def ns(self) -> int:
        """Epoch nanoseconds, for `since`."""
        base, frac, zone = self.timestamp.groups()
        return _epoch(base, zone) * 1_000_000_000 + int((frac or b"").ljust(9, b"0"))

    @property
    def stamp(self) -> bytes:
        """The output form: 9 fraction digits, and Z for any zero offset (Go's "Z07:00")."""
        base, frac, zone = self.timestamp.groups()
        if zone != b"Z" and zone[1:] == b"00:00":
            zone = b"Z"
        return base + b"." + (frac or b"").ljust(9, b"0") + zone


@functools.lru_cache(maxsize=64)  # consecutive records mostly share their second
def _epoch(base: bytes, zone: bytes) -> int:
    seconds = int(datetime.fromisoformat(base.decode()).replace(tzinfo=UTC).timestamp())
    if zone != b"Z":
        offset = (int(zone[1:3]) * 60 + int(zone[4:6])) * 60
        seconds += -offset if zone[:1] == b"+" else offset
    return seconds


def parse_record(line: bytes) -> Record:
    """One CRI record (with or without its trailing newline); ValueError when it is not one."""
    parts = line.split(b" ", 3)
    if len(parts) < 4:
        raise ValueError("not a CRI log record")
    raw_ts, stream, tags, message = parts
    m = _TIMESTAMP.fullmatch(raw_ts)
    if m is None:
        raise ValueError(f"unexpected timestamp format: {raw_ts[:40]!r}")
    if stream == b"stdout":
        name = "stdout"
    elif stream == b"stderr":
        name = "stderr"
    else:
        raise ValueError(f"unexpected stream type {stream[:20]!r}")
    partial = tags[:1] == b"P" and (len(tags) == 1 or tags[1:2] == b":")
    if partial and message.endswith(b"\n"):
        message = message[:-1]
    return Record(m, name, partial, message)


def tail_start(f: BinaryIO, n: int) -> int:
    """Offset of the n-th last record (the kubelet's findTailLineStartIndex)."""
    if n < 0:
        return 0
    size = f.seek(0, os.SEEK_END)
    left, count, buf = 0, 0, b""
    right = size
    while right > 0 and count <= n:
        left = max(0, right - TAIL_BLOCK)
        f.seek(left)
        buf = f.read(right - left)
        count += buf.count(b"\n")
        right -= TAIL_BLOCK
    while count > n:
        idx = buf.index(b"\n") + 1
        buf = buf[idx:]
        left += idx
        count -= 1
    return left


class _Writer:
    """The kubelet's logWriter: since filter, timestamp prefix, stream choice, byte limit."""

    def __init__(self, opts: LogOptions):
        self.opts = opts
        self.remain = opts.limit_bytes if opts.limit_bytes is not None else -1
        self.out: list[bytes] = []
        self.size = 0

    def write(self, rec: Record, add_prefix: bool) -> bool:
        """False once the byte limit is used up."""
        if self.opts.since_ns and rec.ns < self.opts.since_ns:
            return True
        line = rec.message
        if self.opts.timestamps and add_prefix:
            line = rec.stamp + b" " + line
        if self.remain >= 0 and len(line) > self.remain:
            line = line[: self.remain]
        wanted = self.opts.stdout if rec.stream == "stdout" else self.opts.stderr
        if not wanted:
            return True
        self.out.append(line)
        self.size += len(line)
        if self.remain >= 0:
            self.remain -= len(line)
            if self.remain <= 0:
                return False
        return True

    def take(self) -> bytes:
        data = b"".join(self.out)
        self.out.clear()
        self.size = 0
        return data


def open_log(path: str) -> BinaryIO:
    """Open for reading without following a symlink in the file's own place."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    return os.fdopen(fd, "rb")


async def read_log(
    path: str, opts: LogOptions, running: Callable[[], Awaitable[bool]] | None = None
) -> AsyncIterator[bytes]:
    """Yield what the kubelet would write for the log at `path`. `running` tells a follower
    whether the container still runs (checked at each end of file, at least every second)."""
    try:
        f = open_log(path)
    except FileNotFoundError:
        raise LogReadError(f'failed to open log file "{os.path.basename(path)}": no such file or directory') from None
    except OSError as exc:  # ELOOP: a symlink put in the log's place is never followed
        raise LogReadError(f'failed to open log file "{os.path.basename(path)}": {exc.strerror}') from None
    try:
        tail = opts.tail_lines if opts.tail_lines is not None else -1
        f.seek(tail_start(f, tail))
        limited = opts.tail_lines is not None and not opts.follow
        remaining = tail
        writer = _Writer(opts)
        new_line, found, checked_format, stop = True, True, False, False
        while not stop and not (limited and remaining == 0):
            line = f.readline()
            if not line.endswith(b"\n"):  # end of file, possibly inside an unfinished record
                if opts.follow:
                    if writer.size:
                        yield writer.take()
                    if not found:
                        break
                    f.seek(-len(line), os.SEEK_CUR)  # read the unfinished record again later
                    found, next_file = await _wait(f, path, running)
                    if next_file is not f:
                        f.close()
                        f = next_file
                    continue
                stop = True  # write what is left, then end
                if not line:
                    continue
            if not checked_format:
                try:
                    parse_record(line)
                except ValueError:
                    raise LogReadError(
                        f"failed to get parse function: unsupported log format: {line[:100]!r}"
                    ) from None
                checked_format = True
            try:
                rec = parse_record(line)
            except ValueError:
                continue  # the kubelet logs a bad record and goes on
            if not writer.write(rec, new_line):
                break
            if limited:
                remaining -= 1
            new_line = rec.message.endswith(b"\n") if rec.message else True
            if writer.size >= BATCH:
                yield writer.take()
                await asyncio.sleep(0)
        if writer.out:
            yield writer.take()
    finally:
        f.close()


async def _wait(f: BinaryIO, path: str, running: Callable[[], Awaitable[bool]] | None) -> tuple[bool, BinaryIO]:
    """Until the file grows or is replaced, or a second has passed: (found, the file to read on).
    found is False once the container is not running, so the caller drains the file and ends."""
    if running is not None and not await running():
        return False, f
    loop = asyncio.get_running_loop()
    deadline = loop.time() + FORCE_CHECK
    position = f.tell()
    while loop.time() < deadline:
        await asyncio.sleep(POLL)
        mine = os.fstat(f.fileno())
        if mine.st_size > position:
            return True, f  # more to read (also what the old file got just before its rotation)
        try:
            current = os.stat(path)
        except FileNotFoundError:
            continue  # between rotation's rename and the new file
        if current.st_ino != mine.st_ino:
            try:
                return True, open_log(path)  # the caller owns and closes it
            except OSError:
                continue
    return True, f

"""CRI container log files, written and read the way containerd, CRI-O and the kubelet do.

A record is `<RFC3339Nano time> <stdout|stderr> <P|F> <message>\\n`; P marks a piece of a longer
line. A container's log is `<dir>/<restartCount>.log`; rotated files sit next to it as
`<n>.log.<YYYYmmdd-HHMMSS>` (the kubelet's naming), the newest being `<n>.log` itself.

Stdlib only and cheap to import: the writer runs inside one small log-shim process per container.
"""

from __future__ import annotations

import os
import time

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing pulls in re, functools, contextlib...
if TYPE_CHECKING:
    from datetime import datetime

MAX_LINE = 16 * 1024  # containerd's default max_container_log_line_size: longer lines become P pieces
DEFAULT_MAX_SIZE = 10 * 1024 * 1024  # kubelet containerLogMaxSize
DEFAULT_MAX_FILES = 5  # kubelet containerLogMaxFiles

_STREAMS = {"stdout": b"stdout", "stderr": b"stderr"}
_STAMP_FORMAT = "%Y%m%d-%H%M%S"  # the kubelet's rotated-file suffix, 20060102-150405
_clock = time.time  # the wall clock that names rotated files (tests replace it)


def format_timestamp(ns: int) -> bytes:
    """Go's time.RFC3339Nano in UTC: nanoseconds with trailing zeros dropped."""
    seconds, frac = divmod(ns, 1_000_000_000)
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    if frac:
        text += "." + f"{frac:09d}".rstrip("0")
    return (text + "Z").encode()


def rotated_files(path: str) -> list[str]:
    """The rotated files of the log at `path`, oldest first (their names sort by time)."""
    directory, base = os.path.split(path)
    prefix = base + "."
    try:
        names = os.listdir(directory or ".")
    except FileNotFoundError:
        return []
    found = [n for n in names if n.startswith(prefix) and _is_stamp(n[len(prefix) :])]
    return [os.path.join(directory, n) for n in sorted(found)]


def _is_stamp(s: str) -> bool:
    return len(s) == 15 and s.isascii() and s[8] == "-" and s[:8].isdigit() and s[9:].isdigit()


class CriLogWriter:
    """Appends CRI records to one log file, rotating it by size. Synchronous and unbuffered, so
    `kubectl logs` sees every record as soon as write() returns."""

    def __init__(self, path: str, max_size: int = DEFAULT_MAX_SIZE, max_files: int = DEFAULT_MAX_FILES):
        self.path = path
        self.max_size = max_size  # 0 or less: never rotate
        self.max_files = max(1, max_files)  # the current file included, as the kubelet counts
        self._fd = self._open()
        self._size = os.fstat(self._fd).st_size
        self._last_stamp = ""  # the second of the last rotation

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)

    def write(self, stream: str, data: bytes) -> None:
        """Write what the container wrote: full lines as F records, a trailing piece without a
        newline as P (so it shows up now, as CRI-O does), lines over 16 KiB as P pieces then F."""
        if not data:
            return
        tag = _STREAMS.get(stream)
        if tag is None:
            raise ValueError(f"stream must be stdout or stderr, not {stream!r}")
        now = format_timestamp(time.time_ns())
        full, partial = b"%s %s F " % (now, tag), b"%s %s P " % (now, tag)
        lines = data.split(b"\n")
        rest = lines.pop()  # b"" when data ends with a newline
        records: list[bytes] = []
        for line in lines:
            while len(line) > MAX_LINE:
                records.append(partial + line[:MAX_LINE] + b"\n")
                line = line[MAX_LINE:]
            records.append(full + line + b"\n")
        for start in range(0, len(rest), MAX_LINE):
            records.append(partial + rest[start : start + MAX_LINE] + b"\n")
        self._emit(records)

    def _emit(self, records: list[bytes]) -> None:
        batch: list[bytes] = []
        pending = 0
        for record in records:
            # Rotate before a record that would overflow the file, so files stay within max_size
            # (a single record bigger than max_size still gets a file of its own), at most once a
            # second (see _rotated_name).
            if (
                0 < self.max_size < self._size + pending + len(record)
                and self._size + pending > 0
                and (name := self._rotated_name()) is not None
            ):
                self._write_all(b"".join(batch))
                batch, pending = [], 0
                self._rotate(name)
            batch.append(record)
            pending += len(record)
        self._write_all(b"".join(batch))

    def _write_all(self, buf: bytes) -> None:
        view = memoryview(buf)
        while view:
            n = os.write(self._fd, view)
            self._size += n
            view = view[n:]

    def _rotate(self, name: str) -> None:
        os.close(self._fd)
        self._fd = -1
        try:
            keep = self.max_files - 1  # rotated files beside the current one
            if keep > 0:
                os.rename(self.path, name)
            else:
                os.unlink(self.path)
            rotated = rotated_files(self.path)
            for old in rotated[: max(0, len(rotated) - keep)]:  # oldest first, as the kubelet removes them
                try:
                    os.unlink(old)
                except FileNotFoundError:
                    continue
        finally:
            # Reopen whatever happened, so one failed rotation does not stop all later writes.
            self._fd = self._open()
            self._size = os.fstat(self._fd).st_size

    def _rotated_name(self) -> str | None:
        """The rotated file's name, the time of the rotation as the kubelet writes it; None when this
        second has its rotated file already. Names have one-second resolution, so a flood that fills
        the file faster rotates once a second and the file outgrows max_size by what comes within
        that second (the kubelet checks only every 10 s): a name is never made up, so never in the
        future (stepping past a taken name, as this did, ran minutes ahead under a flood)."""
        stamp = time.strftime(_STAMP_FORMAT, time.gmtime(_clock()))
        if stamp == self._last_stamp:
            return None  # no directory listing for every record of a flood
        self._last_stamp = stamp
        existing = rotated_files(self.path)
        if existing and existing[-1].rsplit(".", 1)[1] == stamp:
            return None
        return f"{self.path}.{stamp}"

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# --- reading -------------------------------------------------------------------------------------


class _Parser:
    """Parses records. Imports re and datetime only when logs are read: the shim only writes."""

    def __init__(self) -> None:
        import re
        from datetime import UTC, datetime, timedelta, timezone

        self._datetime, self._timedelta, self._timezone, self.utc = datetime, timedelta, timezone, UTC
        self._timestamp = re.compile(rb"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)")

    def __call__(self, line: bytes) -> tuple[bytes, datetime, str, bool, bytes]:
        if line.endswith(b"\n"):
            line = line[:-1]
        parts = line.split(b" ", 3)
        if len(parts) < 4:
            raise ValueError(f"not a CRI log line: {line[:80]!r}")
        raw_ts, stream, tag, message = parts
        m = self._timestamp.fullmatch(raw_ts)
        if not m:
            raise ValueError(f"bad timestamp in CRI log line: {raw_ts[:40]!r}")
        if stream not in (b"stdout", b"stderr"):
            raise ValueError(f"unexpected stream type {stream[:20]!r}")
        year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
        micros = int((m[7] or b"0").ljust(9, b"0")[:6])  # datetime stops at microseconds
        tz = self.utc
        if m[8] != b"Z":
            sign = -1 if m[8][:1] == b"-" else 1
            tz = self._timezone(sign * self._timedelta(hours=int(m[8][1:3]), minutes=int(m[8][4:6])))
        when = self._datetime(year, month, day, hour, minute, second, micros, tzinfo=tz)
        partial = tag.split(b":", 1)[0] == b"P"  # extra ":"-separated tags are allowed for the future
        return raw_ts, when, stream.decode(), partial, message


def parse_line(line: bytes) -> tuple[datetime, str, bool, bytes]:
    """(time, stream, partial, message) of one record; ValueError when it is not one."""
    _, when, stream, partial, message = _Parser()(line)
    return when, stream, partial, message


class _Line:
    __slots__ = ("complete", "pieces", "raw_ts", "when")

    def __init__(self, raw_ts: bytes, when: datetime):
        self.raw_ts, self.when = raw_ts, when
        self.pieces: list[bytes] = []
        self.complete = False


def read_logs(
    path: str,
    *,
    tail_lines: int | None = None,
    since: datetime | None = None,
    timestamps: bool = False,
    limit_bytes: int | None = None,
) -> bytes:
    """What `kubectl logs` prints for the log at `path`: rotated files oldest first, then the
    current one; P pieces joined into their line (per stream, since the streams interleave)."""
    parse = _Parser()
    lines: list[_Line] = []
    open_lines: dict[str, _Line] = {}
    for name in [*rotated_files(path), path]:
        try:
            with open(name, "rb") as f:
                content = f.read()
        except FileNotFoundError:  # rotated away while we listed
            continue
        for record in content.split(b"\n"):
            if not record:
                continue
            try:
                raw_ts, when, stream, partial, message = parse(record)
            except ValueError:
                continue  # the kubelet logs bad records and goes on
            line = open_lines.get(stream)
            if line is None:
                line = _Line(raw_ts, when)
                lines.append(line)
            line.pieces.append(message)
            if partial:
                open_lines[stream] = line
            else:
                line.complete = True
                open_lines.pop(stream, None)

    if since is not None:
        if since.tzinfo is None:
            since = since.replace(tzinfo=parse.utc)
        lines = [line for line in lines if line.when >= since]
    if tail_lines is not None and tail_lines >= 0:
        lines = lines[max(0, len(lines) - tail_lines) :]
    out = b"".join(
        (line.raw_ts + b" " if timestamps else b"") + b"".join(line.pieces) + (b"\n" if line.complete else b"")
        for line in lines
    )
    if limit_bytes is not None and limit_bytes >= 0:
        out = out[:limit_bytes]
    return out

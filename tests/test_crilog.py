"""CRI log files: the writer's records and rotation, the reader, and the log shim as a real process."""

from __future__ import annotations

import os
import re
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from runtimes import crilog
from runtimes.crilog import MAX_LINE, CriLogWriter, format_timestamp, parse_line, read_logs, rotated_files

REPO = Path(__file__).resolve().parent.parent
RECORD = re.compile(rb"(\S+) (stdout|stderr) ([PF]) (.*)")


def records(path: Path) -> list[tuple[bytes, bytes, bytes]]:
    """(stream, tag, message) of every record in one file, checking each record's shape."""
    out = []
    for line in path.read_bytes().split(b"\n")[:-1]:
        m = RECORD.fullmatch(line)
        assert m, line
        assert re.fullmatch(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z", m[1]), m[1]
        assert not m[1].endswith(b"0Z"), "RFC3339Nano drops trailing zeros"
        out.append((m[2], m[3], m[4]))
    return out


# --- format and parse ---------------------------------------------------------------------------


def test_timestamp_format_is_go_rfc3339nano() -> None:
    assert format_timestamp(1_700_000_000_123_456_789) == b"2023-11-14T22:13:20.123456789Z"
    assert format_timestamp(1_700_000_000_120_000_000) == b"2023-11-14T22:13:20.12Z"
    assert format_timestamp(1_700_000_000_000_000_000) == b"2023-11-14T22:13:20Z"


def test_parse_line() -> None:
    when, stream, partial, msg = parse_line(b"2023-11-14T22:13:20.123456789Z stdout F hello world\n")
    assert when == datetime(2023, 11, 14, 22, 13, 20, 123456, tzinfo=UTC)
    assert (stream, partial, msg) == ("stdout", False, b"hello world")
    when, stream, partial, msg = parse_line(b"2023-11-14T23:13:20+01:00 stderr P  two  spaces ")
    assert when == datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)
    assert when.utcoffset() == timedelta(hours=1)
    assert (stream, partial, msg) == ("stderr", True, b" two  spaces ")
    assert parse_line(b"2023-11-14T22:13:20Z stdout F \n")[3] == b""
    assert parse_line(b"2023-11-14T22:13:20Z stdout P:x y")[2] is True  # later tags are ignored
    for bad in (
        b"garbage",
        b"2023-11-14 stdout F x",
        b"2023-11-14T22:13:20Z stdin F x",
        b"2023-11-14T22:13:20Z stdout F",
    ):
        with pytest.raises(ValueError):
            parse_line(bad)


# --- the writer -----------------------------------------------------------------------------------


def test_writer_lines_partials_and_long_lines(tmp_path: Path) -> None:
    log = tmp_path / "0.log"
    w = CriLogWriter(str(log))
    w.write("stdout", b"one\ntwo\n")
    w.write("stderr", b"oops\n")
    w.write("stdout", b"no newline yet")
    w.write("stdout", b" ...done\n\n")
    w.write("stdout", b"x" * (2 * MAX_LINE + 10) + b"\n")
    w.write("stdout", b"y" * MAX_LINE + b"\n")  # exactly the limit: one F record
    w.write("stderr", b"z" * (MAX_LINE + 1))  # unterminated and long: P pieces only
    w.close()
    assert records(log) == [
        (b"stdout", b"F", b"one"),
        (b"stdout", b"F", b"two"),
        (b"stderr", b"F", b"oops"),
        (b"stdout", b"P", b"no newline yet"),
        (b"stdout", b"F", b" ...done"),
        (b"stdout", b"F", b""),
        (b"stdout", b"P", b"x" * MAX_LINE),
        (b"stdout", b"P", b"x" * MAX_LINE),
        (b"stdout", b"F", b"x" * 10),
        (b"stdout", b"F", b"y" * MAX_LINE),
        (b"stderr", b"P", b"z" * MAX_LINE),
        (b"stderr", b"P", b"z"),
    ]
    # Reopening appends, as a restarted shim must.
    w = CriLogWriter(str(log))
    w.write("stdout", b"again\n")
    w.close()
    assert records(log)[-1] == (b"stdout", b"F", b"again")
    w = CriLogWriter(str(log))
    with pytest.raises(ValueError):
        w.write("stdin", b"x")
    w.close()


def test_rotation_keeps_max_files_and_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ticks = iter(range(1_700_000_000, 1_800_000_000))
    monkeypatch.setattr(crilog, "_clock", lambda: next(ticks))  # a second passes between rotations
    log = tmp_path / "2.log"
    w = CriLogWriter(str(log), max_size=200, max_files=3)
    lines = [f"line {i:03d} {'.' * 40}".encode() for i in range(40)]
    for line in lines:
        w.write("stdout", line + b"\n")
    w.close()
    rotated = rotated_files(str(log))
    assert len(rotated) == 2  # plus 2.log itself: max_files
    for name in rotated:
        assert re.fullmatch(r"2\.log\.\d{8}-\d{6}", os.path.basename(name)), name
    assert len(set(rotated)) == 2 and rotated == sorted(rotated)
    for path in [*rotated, str(log)]:
        assert 0 < os.path.getsize(path) <= 200
    # The files hold the newest lines, oldest first, with none lost between them.
    text = read_logs(str(log)).splitlines()
    assert text == lines[-len(text) :]
    assert len(text) >= 6
    # Unrelated files in the directory are left alone and not read.
    (tmp_path / "2.log.tmp").write_text("x")
    (tmp_path / "1.log").write_bytes(b"2023-11-14T22:13:20Z stdout F other\n")
    assert read_logs(str(log)).splitlines() == text


def test_rotated_names_are_the_time_of_rotation_never_in_the_future(tmp_path: Path) -> None:
    """A flood fills the file many times a second: it rotates once a second, under the real time
    (stepping past taken names ran minutes into the future), and loses no line in between."""
    log = tmp_path / "0.log"
    w = CriLogWriter(str(log), max_size=1000, max_files=5)
    lines = [f"flood {i:05d} {'x' * 60}".encode() for i in range(3000)]
    started = time.time()
    for line in lines:
        w.write("stdout", line + b"\n")
    w.close()
    latest = time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time()))
    earliest = time.strftime("%Y%m%d-%H%M%S", time.gmtime(started))
    rotated = [os.path.basename(p).rsplit(".", 1)[1] for p in rotated_files(str(log))]
    assert rotated and all(earliest <= stamp <= latest for stamp in rotated), (earliest, rotated, latest)
    assert len(set(rotated)) == len(rotated)
    text = read_logs(str(log)).splitlines()
    assert text == lines[-len(text) :]  # contiguous: the newest lines, none missing


def test_rotation_with_a_single_file(tmp_path: Path) -> None:
    log = tmp_path / "0.log"
    w = CriLogWriter(str(log), max_size=100, max_files=1)
    for i in range(10):
        w.write("stdout", f"line {i} {'-' * 30}\n".encode())
    w.close()
    assert rotated_files(str(log)) == []
    assert read_logs(str(log)).splitlines()[-1].startswith(b"line 9")


# --- the reader -----------------------------------------------------------------------------------


def write_raw(path: Path, *records: str) -> None:
    path.write_bytes("".join(r + "\n" for r in records).encode())


def test_read_logs_joins_partials_per_stream(tmp_path: Path) -> None:
    log = tmp_path / "0.log"
    write_raw(
        log,
        "2024-01-01T00:00:01Z stdout P hel",
        "2024-01-01T00:00:02Z stderr F warning",
        "2024-01-01T00:00:03Z stdout P lo ",
        "2024-01-01T00:00:04Z stdout F world",
        "not a record",
        "2024-01-01T00:00:05.5Z stdout F second",
        "2024-01-01T00:00:06Z stdout P prompt> ",
    )
    assert read_logs(str(log)) == b"hello world\nwarning\nsecond\nprompt> "
    assert read_logs(str(log), timestamps=True) == (
        b"2024-01-01T00:00:01Z hello world\n"
        b"2024-01-01T00:00:02Z warning\n"
        b"2024-01-01T00:00:05.5Z second\n"
        b"2024-01-01T00:00:06Z prompt> "
    )
    assert read_logs(str(log), tail_lines=2) == b"second\nprompt> "
    assert read_logs(str(log), tail_lines=0) == b""
    assert read_logs(str(log), tail_lines=100) == read_logs(str(log))
    assert read_logs(str(log), tail_lines=-1) == read_logs(str(log))
    since = datetime(2024, 1, 1, 0, 0, 5, tzinfo=UTC)
    assert read_logs(str(log), since=since) == b"second\nprompt> "
    assert read_logs(str(log), since=datetime(2024, 1, 1, 1, 0, 5, tzinfo=timezone(timedelta(hours=1)))) == (
        b"second\nprompt> "
    )
    assert read_logs(str(log), since=datetime(2024, 1, 1, 0, 0, 5)) == b"second\nprompt> "  # naive: UTC
    assert read_logs(str(log), limit_bytes=8) == b"hello wo"
    assert read_logs(str(log), tail_lines=1, timestamps=True, limit_bytes=15) == b"2024-01-01T00:0"
    assert read_logs(str(tmp_path / "missing.log")) == b""


def test_read_logs_joins_across_rotation(tmp_path: Path) -> None:
    log = tmp_path / "0.log"
    write_raw(tmp_path / "0.log.20240101-000000", "2024-01-01T00:00:00Z stdout F first")
    write_raw(tmp_path / "0.log.20240101-000010", "2024-01-01T00:00:09Z stdout P spl")
    write_raw(log, "2024-01-01T00:00:11Z stdout F it", "2024-01-01T00:00:12Z stdout F last")
    assert read_logs(str(log)) == b"first\nsplit\nlast\n"


# --- the log shim, a real process ---------------------------------------------------------------

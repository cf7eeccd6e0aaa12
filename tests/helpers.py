"""Small builders, host facts and terminal helpers shared by the tests (no fixtures here: see conftest.py)."""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import struct
import termios
import time
from typing import Any

import pytest

from cgroups.detect import CgroupError, CgroupMode, detect_mode


def ctr(name: str = "c", requests: dict | None = None, limits: dict | None = None, **extra: Any) -> dict:
    """A container dict as the API server returns it, with only the resources given."""
    resources: dict[str, Any] = {}
    if requests is not None:
        resources["requests"] = requests
    if limits is not None:
        resources["limits"] = limits
    return {"name": name, "image": "busybox", "resources": resources, **extra}


def host_cgroup_mode() -> CgroupMode | None:
    """This machine's cgroup mode, or None where cgroups cannot be used."""
    try:
        return detect_mode()
    except CgroupError:
        return None


def set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


async def read_pty_until(fd: int, pattern: str, timeout: float) -> str:
    """Read the pty until `pattern` (a regex) shows up in the output."""
    loop = asyncio.get_running_loop()
    seen = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = asyncio.Event()
        loop.add_reader(fd, ready.set)
        try:
            await asyncio.wait_for(ready.wait(), max(0.01, deadline - time.monotonic()))
        except TimeoutError:
            break
        finally:
            loop.remove_reader(fd)
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
        if re.search(pattern, seen.decode(errors="replace")):
            return seen.decode(errors="replace")
    pytest.fail(f"no {pattern!r} on the terminal within {timeout}s; it showed: {seen.decode(errors='replace')!r}")

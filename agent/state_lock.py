"""One agent per state dir: `<state-dir>/agent.pid` holds the pid of the agent using it, under an
exclusive flock for as long as that agent runs. The lock, not the pid, says whether it runs: a
file left by a killed agent is free again, and a reused pid cannot fool it. `kubelet-emu reset`
checks it and takes it while it works, so no agent starts on a state dir being reset."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

PID_FILE = "agent.pid"


class StateDirBusyError(Exception):
    def __init__(self, state_dir: Path, pid: int | None):
        self.pid = pid
        owner = f"pid {pid}" if pid else "another process"
        super().__init__(
            f"state dir {state_dir} is in use by {owner} (lock {state_dir / PID_FILE}): stop that agent first, "
            "or give this one another --state-dir"
        )


def _read_pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).split()[0])
    return None


def acquire(state_dir: Path) -> int:
    """Take the state dir's lock and write our pid; returns the fd to keep open (closing it, or
    exiting, releases the lock). Raises StateDirBusyError when a running process holds it."""
    path = Path(state_dir) / PID_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _read_pid(fd)
        os.close(fd)
        raise StateDirBusyError(Path(state_dir), pid) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def holder(state_dir: Path) -> int | None:
    """The pid of the process holding the state dir's lock (a running agent), or None (0 when the
    holder wrote no pid)."""
    path = Path(state_dir) / PID_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd) or 0
        return None  # free: closing the fd drops our shared lock
    finally:
        os.close(fd)

"""What the shims of the process and oci backends share. Standard library only, and light: the
shim launchers load it under `python -S`, and every shim is a fork of one.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime


def now() -> str:
    return datetime.now(UTC).isoformat()


def write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)  # readers never see half a file


def write_exit(directory: str, status: int) -> None:
    """exit.json in `directory` for a waitpid() status: the exit code as a shell reports it (128
    plus the signal for a killed process), the signal, and the time."""
    result: dict[str, int | str | None]
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        result = {"exit_code": 128 + sig, "signal": sig}
    else:
        result = {"exit_code": os.WEXITSTATUS(status), "signal": None}
    result["finished_at"] = now()
    write_json(os.path.join(directory, "exit.json"), result)


def proc_start_ticks(pid: int) -> int:
    """Start time of a process in clock ticks since boot: with the pid, it names one process for good."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


_libc = None


def load_libc() -> None:
    """Done once in the launcher, so that forked shims do not each pay for importing ctypes."""
    global _libc
    try:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True)
    except (OSError, ImportError):
        _libc = None


def become_subreaper() -> None:
    """Orphans of the container are re-parented to the shim, which reaps them (as conmon does)."""
    if _libc is None:
        load_libc()
    if _libc is not None:
        _libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER

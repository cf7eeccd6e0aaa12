"""Host processes as the process and oci backends see them from the agent: a process named for
good by its pid and start time, waiting for one to exit, and where a Pod's files live.
"""

from __future__ import annotations

import asyncio
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from runtimes.shimlib import proc_start_ticks

JSON = dict[str, Any]


def pod_dir_name(pod: JSON) -> str:
    meta = pod["metadata"]
    return f"{meta['namespace']}_{meta['name']}_{meta['uid']}"


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


async def process_exit(pid: int, timeout: float) -> None:
    """Return when `pid` exits (a pidfd works for processes that are not our children), or after
    `timeout`; polls where pidfds are unavailable."""
    try:
        fd = os.pidfd_open(pid)
    except (OSError, AttributeError):
        await asyncio.sleep(0.2)
        return
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.add_reader(fd, lambda: done.done() or done.set_result(None))
    try:
        await asyncio.wait_for(done, timeout)
    except TimeoutError:
        pass
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def alive(pid: int, start_ticks: int) -> bool:
    try:
        return proc_start_ticks(pid) == start_ticks
    except (OSError, ValueError, IndexError):
        return False


async def shim_exit(run_dir: Path, state: JSON) -> JSON | None:
    """The exit record (exit.json) the container's shim writes in `run_dir`, once it is there; None
    when the shim (state's shim_pid and shim_start_ticks) is gone without one."""
    exit_file = run_dir / "exit.json"
    while not exit_file.exists():
        await process_exit(state["shim_pid"], timeout=5.0)
        if not exit_file.exists() and not alive(state["shim_pid"], state["shim_start_ticks"]):
            await asyncio.sleep(0.1)  # a shim writes the record just before it exits: look once more
            if not exit_file.exists():
                return None
    return json.loads(exit_file.read_text())

"""`kubelet-emu fleet ctl`: make fleet nodes NotReady (or silent) on purpose, for failure tests.

The wanted health of each node is kept in `<state-dir>/health.json`; the running fleet re-reads it
on SIGUSR2 (its pid is in `<state-dir>/agent.pid`)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from agent import state_lock

HEALTH_FILE = "health.json"
# ready: healthy. not-ready: posts Ready=False (KubeletNotReady). silent: no Lease renewals and no
# status, as a node that died: the node lifecycle controller marks it Unknown after its grace period.
HEALTH_STATES = ("ready", "not-ready", "silent")


def read_health(state_dir: Path) -> dict[str, str]:
    try:
        data = json.loads((state_dir / HEALTH_FILE).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and v in HEALTH_STATES}


def set_health(state_dir: Path, nodes: list[str], health: str) -> int:
    """Record the health and tell the fleet; returns the fleet's pid. Raises ValueError."""
    if health not in HEALTH_STATES:
        raise ValueError(f"health must be one of {', '.join(HEALTH_STATES)}, not {health!r}")
    pid = state_lock.holder(state_dir)
    if not pid:
        raise ValueError(f"no fleet runs on state dir {state_dir}; pass the fleet's --state-dir")
    current = read_health(state_dir)
    for node in nodes:
        if health == "ready":
            current.pop(node, None)
        else:
            current[node] = health
    tmp = state_dir / (HEALTH_FILE + ".tmp")
    tmp.write_text(json.dumps(current, indent=1, sort_keys=True))
    os.replace(tmp, state_dir / HEALTH_FILE)
    os.kill(pid, signal.SIGUSR2)
    return pid

"""Status reconciliation: notice when the API server holds something other than what the agent wrote.

The agent writes a status only when its own view changes. Someone else may change what the agent
owns meanwhile: the node lifecycle controller marks a Node `Ready=Unknown` and its Pods
`Ready=False` when the heartbeats stop, an admin patches a condition. The kubelet's status
manager and node status loop compare the object from the API server with what they would write
and write again when they differ; these helpers are that comparison.

Only what the agent owns is compared (the phase, its own conditions, the container statuses),
and only coarsely (a condition's type and status, not its times), so that the API server's own
normalisation of an object never reads as a change and the steady state costs no writes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from agent.logs import kv
from agent.pod_status import OWNED_CONDITIONS

JSON = dict[str, Any]

log = logging.getLogger(__name__)

# How many of a Pod's own recent writes still count as "ours" when their echo arrives late
# (the watch delivers the echo of write N after write N+1 went out): a stale echo is no drift.
RECENT_WRITES = 3


def _containers(statuses: Iterable[Mapping[str, Any]] | None) -> tuple[Any, ...]:
    out = []
    for c in statuses or ():
        state = c.get("state") or {}
        out.append(
            (
                c.get("name"),
                bool(c.get("ready")),
                bool(c.get("started")),
                c.get("restartCount") or 0,
                next(iter(state), ""),
                c.get("containerID") or "",
            )
        )
    return tuple(out)


def pod_status_summary(status: Mapping[str, Any]) -> int:
    """A hash of what the agent owns in a Pod status, as it would be read back from the API server."""
    conds = tuple(
        sorted(
            (c.get("type", ""), c.get("status", ""))
            for c in status.get("conditions") or ()
            if c.get("type") in OWNED_CONDITIONS and "$patch" not in c  # a delete directive is not read back
        )
    )
    return hash(
        (
            status.get("phase"),
            conds,
            _containers(status.get("containerStatuses")),
            _containers(status.get("initContainerStatuses")),
            status.get("podIP") or "",
        )
    )


def remember_write(recent: tuple[int, ...], summary: int) -> tuple[int, ...]:
    """The summaries of the last few writes, newest last."""
    if recent and recent[-1] == summary:
        return recent
    return (*recent, summary)[-RECENT_WRITES:]


def pod_status_drifted(seen: Mapping[str, Any] | None, recent: tuple[int, ...]) -> bool:
    """Whether the status the API server holds is none of the agent's recent writes.

    False before the agent wrote anything (the object is not its business yet)."""
    if not recent or not seen:
        return False
    return pod_status_summary(seen) not in recent


def node_conditions_summary(conditions: Sequence[Mapping[str, Any]] | None) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((c.get("type", ""), c.get("status", "")) for c in conditions or ()))


def node_status_drifted(seen: Mapping[str, Any] | None, wanted_conditions: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the Node's conditions (type and status) in the API differ from what the agent would post.

    Conditions the agent does not post (added by others) are not compared."""
    if not seen:
        return False
    ours = {c["type"] for c in wanted_conditions}
    held = [c for c in (seen.get("status") or {}).get("conditions") or () if c.get("type") in ours]
    return node_conditions_summary(held) != node_conditions_summary(wanted_conditions)


def newer_or_same(candidate: Mapping[str, Any], current: Mapping[str, Any] | None) -> bool:
    """Whether `candidate` is not older than `current` by resourceVersion (a late watch event
    must not replace the answer of a later write). Versions that are not integers compare as new."""
    if not current:
        return True
    try:
        return int(candidate["metadata"]["resourceVersion"]) >= int(current["metadata"]["resourceVersion"])
    except (KeyError, TypeError, ValueError):
        return True


class CorrectionLog:
    """One info line per interval for Pod status corrections (after an outage a node corrects all
    its Pods at once: thousands of lines would say nothing more), the rest at debug level."""

    def __init__(self, interval: float = 10.0):
        self.interval = interval
        self.count = 0
        self._logged_at = -interval
        self._logged_count = 0

    def corrected(self, pod: str, again: bool) -> None:
        self.count += 1
        now = time.monotonic()
        if not again and now - self._logged_at >= self.interval:
            log.info(
                "pod status changed by someone else; writing it again",
                extra=kv(pod=pod, pods_since_last_line=self.count - self._logged_count),
            )
            self._logged_at, self._logged_count = now, self.count
        else:
            log.debug("pod status changed by someone else; writing it again", extra=kv(pod=pod))


corrections = CorrectionLog()

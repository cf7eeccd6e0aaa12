"""Issue 16 (3), the pure parts: telling the agent's own echo from a change made by someone else,
and a heartbeat that retries at once after an outage (no cluster needed)."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
from datetime import UTC, datetime

from agent import lease as lease_module
from agent.informer import Informer
from agent.kube import ApiError
from agent.lease import NodeLease
from agent.node_status import conditions
from agent.status_reconcile import (
    newer_or_same,
    node_status_drifted,
    pod_status_drifted,
    pod_status_summary,
    remember_write,
)


def running_status(ready: bool = True) -> dict:
    flag = "True" if ready else "False"
    return {
        "phase": "Running",
        "conditions": [
            {"type": "PodScheduled", "status": "True", "lastProbeTime": None},
            {"type": "Initialized", "status": "True", "lastProbeTime": None},
            {"type": "ContainersReady", "status": flag, "lastProbeTime": None},
            {"type": "Ready", "status": flag, "lastProbeTime": None},
        ],
        "containerStatuses": [
            {"name": "c", "ready": ready, "started": True, "restartCount": 0, "state": {"running": {}}}
        ],
        "podIP": "10.0.0.1",
    }


def as_read_back(status: dict) -> dict:
    """What the API server hands back: nulls dropped, times added, fields others own added."""
    out = copy.deepcopy(status)
    for c in out["conditions"]:
        c.pop("lastProbeTime")
        c["lastTransitionTime"] = "2026-01-01T00:00:00Z"
    out["conditions"].append({"type": "DisruptionTarget", "status": "True"})
    out["containerStatuses"][0]["lastState"] = {}
    return out


def test_own_echo_is_no_drift_and_nothing_before_the_first_write():
    written = running_status()
    recent = remember_write((), pod_status_summary(written))
    assert not pod_status_drifted(as_read_back(written), recent)
    assert not pod_status_drifted(as_read_back(running_status(ready=False)), ())  # not written yet


def test_node_lifecycle_controller_mark_is_drift():
    recent = remember_write((), pod_status_summary(running_status()))
    marked = as_read_back(running_status())
    next(c for c in marked["conditions"] if c["type"] == "Ready")["status"] = "False"  # MarkPodsNotReady
    assert pod_status_drifted(marked, recent)


def test_stale_echo_of_an_earlier_write_is_no_drift():
    recent = remember_write((), pod_status_summary(running_status(ready=False)))
    recent = remember_write(recent, pod_status_summary(running_status(ready=True)))
    assert not pod_status_drifted(as_read_back(running_status(ready=False)), recent)
    for _ in range(5):  # the same write twice counts once; only the last few are remembered
        recent = remember_write(recent, pod_status_summary(running_status(ready=True)))
    assert len(recent) == 2


def test_conditions_others_own_are_not_compared():
    recent = remember_write((), pod_status_summary(running_status()))
    seen = as_read_back(running_status())
    seen["conditions"].append({"type": "example.com/gate", "status": "False"})
    assert not pod_status_drifted(seen, recent)


def test_node_unknown_is_drift_and_our_own_conditions_are_not():
    now = datetime.now(UTC)
    ours = conditions(now)
    node = {"status": {"conditions": [*copy.deepcopy(ours), {"type": "NetworkUnavailable", "status": "False"}]}}
    assert not node_status_drifted(node, ours)
    next(c for c in node["status"]["conditions"] if c["type"] == "Ready")["status"] = "Unknown"
    assert node_status_drifted(node, ours)


def test_older_watch_event_does_not_replace_a_newer_answer():
    assert newer_or_same({"metadata": {"resourceVersion": "12"}}, {"metadata": {"resourceVersion": "9"}})
    assert not newer_or_same({"metadata": {"resourceVersion": "9"}}, {"metadata": {"resourceVersion": "12"}})
    assert newer_or_same({"metadata": {"resourceVersion": "x"}}, {"metadata": {"resourceVersion": "12"}})
    assert newer_or_same({"metadata": {}}, None)


class FlakyKube:
    """Fails every request until `up` is set, then answers like the API server."""

    def __init__(self):
        self.up = False
        self.calls: list[float] = []

    async def request(self, method, path, *, body=None, timeout=30, **_):
        self.calls.append(asyncio.get_running_loop().time())
        if not self.up:
            raise ApiError(0, "Timeout", "no answer", method, path)
        if method == "GET":
            return {"metadata": {"name": "n"}, "spec": {}}
        return body


async def test_lease_retries_within_seconds_and_reports_recovery(monkeypatch):
    monkeypatch.setattr(lease_module, "RENEW_INTERVAL", 30.0)
    kube = FlakyKube()
    recovered = asyncio.Event()
    lease = NodeLease(kube, "n", "uid", on_recovered=recovered.set)  # type: ignore[arg-type]
    task = asyncio.create_task(lease.run())
    try:
        await asyncio.sleep(4.0)
        assert len(kube.calls) >= 3  # 0.5 s, 1 s, 2 s apart: never a long sleep while failing
        gaps = [b - a for a, b in zip(kube.calls, kube.calls[1:], strict=False)]
        assert max(gaps) <= lease_module.RETRY_MAX + 0.5
        kube.up = True
        await asyncio.wait_for(recovered.wait(), lease_module.RETRY_MAX + 1)
        assert lease.renewals == 1
    finally:
        task.cancel()


class SilentWatchKube:
    """Lists nothing; every watch hangs silently, as one on a half-dead connection does."""

    def __init__(self):
        self.watches = 0

    async def get(self, path, **query):
        return {"metadata": {"resourceVersion": "7"}, "items": []}

    async def watch(self, path, resource_version, **query):
        self.watches += 1
        await asyncio.Event().wait()
        yield {}  # pragma: no cover


async def test_informer_starts_its_watch_afresh_when_the_api_server_is_back():
    kube = SilentWatchKube()
    informer = Informer(kube, "/api/v1/pods", on_upsert=lambda o: None, on_delete=lambda o: None)  # type: ignore[arg-type]
    task = asyncio.create_task(informer.run())
    try:
        for _ in range(50):
            await asyncio.sleep(0.01)
            if kube.watches:
                break
        assert kube.watches == 1
        informer.retry_now()  # the lease works again after an outage
        await asyncio.sleep(0.05)
        assert kube.watches == 2 and informer.relists == 1  # watched again from the version it had
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert task.cancelled()  # stopping the informer still stops it


def test_corrections_after_an_outage_are_one_info_line_not_one_per_pod(caplog):
    from agent.status_reconcile import CorrectionLog

    log = CorrectionLog(interval=60)
    with caplog.at_level(logging.DEBUG, logger="agent.status_reconcile"):
        for i in range(500):
            log.corrected(f"default/p{i}", again=False)
    info = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(info) == 1 and log.count == 500
    assert len([r for r in caplog.records if r.levelno == logging.DEBUG]) == 499

"""Unit tests for the backends' records on disk (runtimes/sandbox_records.py) and the agent's
housekeeping sweep (agent/housekeeping.py). The end-to-end checks are in test_chaos_restart.py."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from agent.housekeeping import Housekeeping
from runtimes.base import SandboxRecord
from runtimes.sandbox_records import (
    kill_recorded_processes,
    recorded_containers,
    remove_pod_dir,
    scan,
    write_owner,
)
from runtimes.shimlib import proc_start_ticks


def pod(uid: str, name: str = "p", namespace: str = "default") -> dict:
    return {"metadata": {"uid": uid, "name": name, "namespace": namespace}, "spec": {}}


def test_scan_finds_the_records_of_one_handler(tmp_path: Path) -> None:
    write_owner(tmp_path / "default_a_u1", pod("u1", "a"), "process", "procs", "kubepods/podu1")
    write_owner(tmp_path / "default_b_u2", pod("u2", "b"), "process", "other", None)
    write_owner(tmp_path / "default_c_u3", pod("u3", "c"), "oci", "procs", None)
    legacy = tmp_path / "ns_d_u4"
    legacy.mkdir()
    (legacy / "pod.json").write_text(
        json.dumps({"pod": pod("u4", "d", "ns"), "handler": "procs", "backend": "process", "cgroup": "kubepods/podu4"})
    )
    (tmp_path / "default_e_u5").mkdir()  # logs only, no record: not ours to judge
    records = sorted(scan(tmp_path, "process", "procs"), key=lambda r: r.pod_uid)
    assert [(r.pod_uid, r.namespace, r.name, r.cgroup) for r in records] == [
        ("u1", "default", "a", "kubepods/podu1"),
        ("u4", "ns", "d", "kubepods/podu4"),
    ]
    assert records[0].path == str(tmp_path / "default_a_u1")
    assert scan(tmp_path / "missing", "process", "procs") == []


def test_write_owner_keeps_the_first_record(tmp_path: Path) -> None:
    write_owner(tmp_path / "d", pod("u1"), "process", "procs", "first")
    write_owner(tmp_path / "d", pod("u1"), "process", "procs", "second")
    assert json.loads((tmp_path / "d" / "owner.json").read_text())["cgroup"] == "first"


def test_recorded_containers_are_the_highest_restart_on_disk(tmp_path: Path) -> None:
    for part in ("main/0", "main/2", "main/1", "side/0", "etc/7", "volumes/x", "empty"):
        (tmp_path / part).mkdir(parents=True)
    (tmp_path / "main" / "0.log").write_text("")
    assert recorded_containers(tmp_path) == {"main": 2, "side": 0}
    assert recorded_containers(tmp_path / "missing") == {}


def test_kill_recorded_processes_spares_recycled_pids(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        run = tmp_path / "main" / "0"
        run.mkdir(parents=True)
        (run / "state.json").write_text(json.dumps({"pid": proc.pid, "start_ticks": proc_start_ticks(proc.pid)}))
        stale = tmp_path / "side" / "0"
        stale.mkdir(parents=True)  # same pid number, another start time: a recycled pid
        (stale / "state.json").write_text(json.dumps({"pid": other.pid, "start_ticks": 1}))
        assert kill_recorded_processes(tmp_path) == 1
        assert proc.wait(5) == -9
        assert other.poll() is None
    finally:
        for p in (proc, other):
            p.kill()
            p.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_remove_pod_dir_never_deletes_through_a_mount(tmp_path: Path) -> None:
    pod_dir = tmp_path / "pod"
    volume = pod_dir / "volumes" / "host"
    volume.mkdir(parents=True)
    host = tmp_path / "host-files"
    host.mkdir()
    (host / "precious").write_text("x")
    subprocess.run(["mount", "--bind", str(host), str(volume)], check=True)
    try:
        assert remove_pod_dir(pod_dir) is False
        assert (host / "precious").exists()
    finally:
        subprocess.run(["umount", str(volume)], check=True)
    assert remove_pod_dir(pod_dir) is True
    assert not pod_dir.exists()
    assert (host / "precious").exists()


class FakeBackend:
    name = "process"

    def __init__(self, records: list[SandboxRecord], fail: set[str] = frozenset()):
        self.records = records
        self.fail = fail
        self.purged: list[str] = []

    async def list_sandboxes(self) -> list[SandboxRecord]:
        return [r for r in self.records if r.pod_uid not in self.purged]

    async def purge_sandbox(self, record: SandboxRecord) -> int:
        if record.pod_uid in self.fail:
            raise OSError("busy")
        self.purged.append(record.pod_uid)
        return 2


async def test_sweep_purges_what_belongs_to_no_worker_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    records = [SandboxRecord(uid, "ns", f"pod-{uid}", "procs", f"/state/{uid}") for uid in ("keep", "gone", "stuck")]
    backend = FakeBackend(records, fail={"stuck"})
    controller = SimpleNamespace(
        config=SimpleNamespace(handlers={"procs": None}),
        backend_for=lambda name: backend,
        workers={"keep": object()},
        network=None,
        pods=SimpleNamespace(synced=asyncio.Event()),
    )
    housekeeping = Housekeeping(controller)  # type: ignore[arg-type]
    caplog.set_level(logging.INFO, logger="agent.housekeeping")
    purged = await housekeeping.sweep()
    assert [r.pod_uid for r in purged] == ["gone"]
    assert backend.purged == ["gone"]
    await housekeeping.sweep()  # nothing new: no second line for "gone", none for "stuck"
    removed = [r for r in caplog.records if r.getMessage().startswith("removed the leftovers")]
    failed = [r for r in caplog.records if r.getMessage().startswith("cannot remove")]
    assert len(removed) == 1 and len(failed) == 1
    assert housekeeping.removed == 1

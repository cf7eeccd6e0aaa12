"""Pod volume contents on the host (runtimes/oci/volumes.py): configMap/secret/downwardAPI/projected
files as the kubelet's atomic writer lays them out. No root needed (no tmpfs here)."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from runtimes.base import CreateContainerConfigError
from runtimes.oci.volumes import prepare_pod_volumes, remove_pod_volumes, write_atomically

OBJECTS = {
    ("ConfigMap", "ns", "cfg"): {
        "data": {"a": "1", "b": "2"},
        "binaryData": {"bin": base64.b64encode(b"\0x").decode()},
    },
    ("Secret", "ns", "sec"): {"data": {"token": base64.b64encode(b"t0k").decode()}},
}


async def lookup(kind: str, namespace: str, name: str) -> dict | None:
    return OBJECTS.get((kind, namespace, name))


def pod(*volumes: dict) -> dict:
    return {"metadata": {"name": "p", "namespace": "ns", "uid": "u1", "labels": {"app": "x"}},
            "spec": {"containers": [{"name": "c"}], "volumes": list(volumes)}}  # fmt: skip


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_atomic_writer_switches_data_and_drops_removed_keys(tmp_path: Path) -> None:
    target = tmp_path / "vol"
    write_atomically(target, {"a": (b"1", 0o644), "dir/b": (b"2", 0o600)}, None, "test")
    first = os.readlink(target / "..data")
    assert (target / "a").read_text() == "1" and (target / "dir" / "b").read_text() == "2"
    assert os.readlink(target / "a") == "..data/a" and mode(target / "dir" / "b") == 0o600
    write_atomically(target, {"a": (b"new", 0o644)}, None, "test")
    assert (target / "a").read_text() == "new" and not (target / "dir").exists()
    assert os.readlink(target / "..data") != first and not (target / first).exists()
    assert sorted(p.name for p in target.iterdir() if not p.name.startswith("..")) == ["a"]


def test_atomic_writer_refuses_escaping_paths(tmp_path: Path) -> None:
    with pytest.raises(CreateContainerConfigError, match="must be relative"):
        write_atomically(tmp_path / "v", {"../x": (b"", 0o644)}, None, "test")


async def test_config_map_secret_downward_and_projected(tmp_path: Path) -> None:
    spec = pod(
        {"name": "c1", "configMap": {"name": "cfg", "defaultMode": 0o640}},
        {"name": "s1", "secret": {"secretName": "sec", "items": [{"key": "token", "path": "t/tok", "mode": 0o400}]}},
        {"name": "d1", "downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}},
        {"name": "p1", "projected": {"sources": [{"configMap": {"name": "cfg", "items": [{"key": "a", "path": "a"}]}},
                                                 {"secret": {"name": "sec"}}]}},
        {"name": "e1", "emptyDir": {}},
        {"name": "h1", "hostPath": {"path": "/var/log"}},
    )  # fmt: skip
    volumes = await prepare_pod_volumes(spec, tmp_path, lookup, "node", "10.0.0.1", allow_host_path=False)
    try:
        await _check_volumes(spec, tmp_path, volumes)
    finally:
        remove_pod_volumes(tmp_path)  # the Secret tmpfs mounts go with the Pod, here with the test
    assert not [line for line in Path("/proc/self/mounts").read_text().splitlines() if str(tmp_path) in line]


async def _check_volumes(spec: dict, tmp_path: Path, volumes: dict) -> None:
    root = tmp_path / "volumes"
    assert sorted(volumes) == ["c1", "d1", "e1", "p1", "s1"]  # hostPath left out: build_spec refuses it
    assert volumes["c1"].read_only and not volumes["e1"].read_only
    assert (root / "c1" / "a").read_text() == "1" and (root / "c1" / "bin").read_bytes() == b"\0x"
    assert mode(root / "c1" / "a") == 0o640
    assert (root / "s1" / "t" / "tok").read_text() == "t0k" and mode(root / "s1" / "t" / "tok") == 0o400
    assert (root / "d1" / "labels").read_text() == 'app="x"'
    assert sorted(p.name for p in (root / "p1").iterdir() if not p.name.startswith("..")) == ["a", "token"]
    assert mode(root / "e1") == 0o777
    allowed = await prepare_pod_volumes(spec, tmp_path, lookup, "node", "10.0.0.1", allow_host_path=True)
    assert allowed["h1"].source == "/var/log"


async def test_missing_objects(tmp_path: Path) -> None:
    with pytest.raises(CreateContainerConfigError, match='configmap "nope" not found'):
        await prepare_pod_volumes(pod({"name": "v", "configMap": {"name": "nope"}}), tmp_path, lookup, "n", "", False)
    optional = pod({"name": "v", "configMap": {"name": "nope", "optional": True}})
    assert (await prepare_pod_volumes(optional, tmp_path, lookup, "n", "", False))["v"].read_only
    with pytest.raises(CreateContainerConfigError, match="has no key 'zz'"):
        bad = pod({"name": "v", "secret": {"secretName": "sec", "items": [{"key": "zz", "path": "z"}]}})
        await prepare_pod_volumes(bad, tmp_path, lookup, "n", "", False)

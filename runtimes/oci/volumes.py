"""Pod volumes on the host, for containers to bind-mount: emptyDir, configMap, secret,
downwardAPI, projected (those three sources) and hostPath.

Each volume is a directory under <pod dir>/volumes/<name>. configMap, secret, downwardAPI and
projected volumes are written the way the kubelet's atomic writer does: the files go to a fresh
`..<timestamp>` directory, `..data` is switched to it with one rename, and each key is a symlink
through `..data`, so a container never sees half an update. A Memory emptyDir is a tmpfs mounted
on the host, so all the Pod's containers share it; remove_pod_volumes unmounts it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from runtimes.base import CreateContainerConfigError
from runtimes.container_env import EnvError, Lookup, _field_ref, _resource_field_ref
from runtimes.oci.spec import HostVolume

JSON = dict[str, Any]
DEFAULT_MODE = 0o644


def _where(pod: JSON, volume: str) -> str:
    meta = pod.get("metadata", {})
    return f"pod {meta.get('namespace')}/{meta.get('name')} volume {volume!r}"


def _decoded(obj: JSON, kind: str) -> dict[str, bytes]:
    """A ConfigMap's data and binaryData, or a Secret's data, as bytes."""
    out: dict[str, bytes] = {}
    if kind == "ConfigMap":
        out.update({k: str(v).encode() for k, v in (obj.get("data") or {}).items()})
        binary = obj.get("binaryData") or {}
    else:
        binary = obj.get("data") or {}
    for k, v in binary.items():
        try:
            out[k] = base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise CreateContainerConfigError(f"{kind} key {k!r} is not valid base64") from exc
    return out


def _select(data: dict[str, bytes], source: JSON, where: str, kind: str, name: str) -> dict[str, tuple[bytes, int]]:
    """key -> file path with items (and their modes) applied, or every key at defaultMode."""
    default_mode = source.get("defaultMode", DEFAULT_MODE)
    items = source.get("items")
    if not items:
        return {k: (v, default_mode) for k, v in data.items()}
    files: dict[str, tuple[bytes, int]] = {}
    for item in items:
        key = item.get("key", "")
        if key not in data:
            if source.get("optional"):
                continue
            raise CreateContainerConfigError(f"{where}: {kind} {name!r} has no key {key!r}")
        files[item.get("path") or key] = (data[key], item.get("mode", default_mode))
    return files


async def _object_files(pod: JSON, source: JSON, kind: str, lookup: Lookup | None, where: str) -> dict:
    name = source.get("name") if kind == "ConfigMap" else source.get("secretName", source.get("name"))
    namespace = pod.get("metadata", {}).get("namespace") or "default"
    obj = await lookup(kind, namespace, name or "") if lookup is not None else None
    if obj is None:
        if source.get("optional"):
            return {}
        raise CreateContainerConfigError(
            f'{where}: {kind.lower()} "{name}" not found; create it or mark the volume optional'
        )
    return _select(_decoded(obj, kind), source, where, kind, name or "")


def _downward_files(pod: JSON, source: JSON, where: str, node_name: str, host_ip: str) -> dict:
    default_mode = source.get("defaultMode", DEFAULT_MODE)
    files: dict[str, tuple[bytes, int]] = {}
    containers = pod.get("spec", {}).get("containers") or [{}]
    for item in source.get("items") or []:
        try:
            if "fieldRef" in item:
                value = _field_ref(item["fieldRef"], pod, node_name, host_ip, "", None, None)
            elif "resourceFieldRef" in item:
                ref = item["resourceFieldRef"]
                target = next((c for c in containers if c.get("name") == ref.get("containerName")), containers[0])
                value = _resource_field_ref(ref, pod, target, {})
            else:
                continue
        except EnvError as exc:
            raise CreateContainerConfigError(f"{where}: downwardAPI item {item.get('path')!r}: {exc}") from exc
        files[item.get("path", "")] = (value.encode(), item.get("mode", default_mode))
    return files


def _safe_relative(path: str, where: str) -> str:
    parts = path.split("/")
    if not path or path.startswith("/") or ".." in parts or path.startswith(".."):
        raise CreateContainerConfigError(f"{where}: file path {path!r} must be relative, without '..'")
    return path


def write_atomically(directory: Path, files: dict[str, tuple[bytes, int]], fs_group: int | None, where: str) -> None:
    """The kubelet's atomic writer layout: ..<stamp>/ holds the files, ..data points at it,
    each top-level name links through ..data."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = directory / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.monotonic_ns()}"
    stamp.mkdir(mode=0o755)
    for rel, (content, mode) in files.items():
        target = stamp / _safe_relative(rel, where)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        if fs_group is not None:
            os.chown(target, -1, fs_group)
            mode |= 0o040
        os.chmod(target, mode)
    tmp_link = directory / f"..data_tmp{stamp.name}"
    tmp_link.symlink_to(stamp.name)
    old = os.readlink(directory / "..data") if (directory / "..data").is_symlink() else None
    os.replace(tmp_link, directory / "..data")
    top = {rel.split("/", 1)[0] for rel in files}
    for name in top:
        link = directory / name
        if not link.is_symlink():
            link.symlink_to(f"..data/{name}")
    for entry in directory.iterdir():  # names the new version no longer has
        if entry.is_symlink() and not entry.name.startswith("..") and entry.name not in top:
            entry.unlink(missing_ok=True)
    if old and old != stamp.name:
        shutil.rmtree(directory / old, ignore_errors=True)


def _mount_tmpfs(path: Path, size_limit: str | None, where: str, mode: str = "1777") -> None:
    if os.path.ismount(path):
        return
    path.mkdir(parents=True, exist_ok=True)
    options = f"mode={mode}" + (f",size={_bytes(size_limit)}" if size_limit else "")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if result.returncode != 0:
        raise CreateContainerConfigError(f"{where}: cannot mount a tmpfs: {result.stderr.decode().strip()}")


def _bytes(quantity: str) -> int:
    from cgroups.resources import _parse_quantity

    return int(_parse_quantity(quantity))


def _prepare_sync(
    pod: JSON, pod_dir: Path, projected: dict[str, dict], allow_host_path: bool, secret: frozenset[str] = frozenset()
) -> dict[str, HostVolume]:
    fs_group = (pod.get("spec", {}).get("securityContext") or {}).get("fsGroup")
    out: dict[str, HostVolume] = {}
    for volume in pod.get("spec", {}).get("volumes") or []:
        name = volume.get("name", "")
        where = _where(pod, name)
        path = pod_dir / "volumes" / name
        if "emptyDir" in volume:
            empty = volume["emptyDir"] or {}
            if empty.get("medium") == "Memory":
                _mount_tmpfs(path, empty.get("sizeLimit"), where)
            else:
                path.mkdir(parents=True, exist_ok=True)
                path.chmod(0o777)  # the kubelet's emptyDir mode: any container user may write
            out[name] = HostVolume(str(path))
        elif name in projected:
            if name in secret:  # as the kubelet does: Secret material only ever in memory
                _mount_tmpfs(path, None, where, mode="0755")
            write_atomically(path, projected[name], fs_group, where)
            out[name] = HostVolume(str(path), read_only=True)
        elif "hostPath" in volume and allow_host_path:
            host = volume["hostPath"]
            host_path = host.get("path", "")
            kind = host.get("type") or ""
            if kind == "DirectoryOrCreate":
                os.makedirs(host_path, mode=0o755, exist_ok=True)
            elif kind == "FileOrCreate" and not os.path.exists(host_path):
                Path(host_path).touch(mode=0o644)
            elif kind in ("Directory", "File", "Socket", "CharDevice", "BlockDevice") and not os.path.exists(host_path):
                raise CreateContainerConfigError(f"{where}: hostPath {host_path} ({kind}) does not exist")
            out[name] = HostVolume(host_path)
    return out


async def prepare_pod_volumes(
    pod: JSON, pod_dir: Path, lookup: Lookup | None, node_name: str, host_ip: str, allow_host_path: bool
) -> dict[str, HostVolume]:
    """Volume name -> its host side, (re)writing projected contents. hostPath volumes are left
    out unless allowed: build_spec then refuses the container that mounts one, naming it.
    Callers serialize calls per Pod (a Memory emptyDir must be mounted once)."""
    projected: dict[str, dict] = {}
    secret: set[str] = set()  # volumes with Secret contents: on a tmpfs of their own
    for volume in pod.get("spec", {}).get("volumes") or []:
        name = volume.get("name", "")
        where = _where(pod, name)
        if "configMap" in volume:
            projected[name] = await _object_files(pod, volume["configMap"], "ConfigMap", lookup, where)
        elif "secret" in volume:
            projected[name] = await _object_files(pod, volume["secret"], "Secret", lookup, where)
            secret.add(name)
        elif "downwardAPI" in volume:
            projected[name] = _downward_files(pod, volume["downwardAPI"], where, node_name, host_ip)
        elif "projected" in volume:
            spec = volume["projected"] or {}
            files: dict[str, tuple[bytes, int]] = {}
            for source in spec.get("sources") or []:
                inherit = {"defaultMode": spec.get("defaultMode", DEFAULT_MODE)}
                if "configMap" in source:
                    files |= await _object_files(pod, {**inherit, **source["configMap"]}, "ConfigMap", lookup, where)
                elif "secret" in source:
                    files |= await _object_files(pod, {**inherit, **source["secret"]}, "Secret", lookup, where)
                    secret.add(name)
                elif "downwardAPI" in source:
                    files |= _downward_files(pod, {**inherit, **source["downwardAPI"]}, where, node_name, host_ip)
                # serviceAccountToken needs the TokenRequest API, which the agent does not call yet.
            projected[name] = files
    return await asyncio.to_thread(_prepare_sync, pod, pod_dir, projected, allow_host_path, frozenset(secret))


def remove_pod_volumes(pod_dir: Path) -> None:
    """Unmount Memory emptyDirs and delete every volume directory of the Pod."""
    volumes = pod_dir / "volumes"
    if not volumes.is_dir():
        return
    for entry in volumes.iterdir():
        if os.path.ismount(entry):
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                subprocess.run(["umount", "-l", str(entry)], capture_output=True, check=False)
    shutil.rmtree(volumes, ignore_errors=True)

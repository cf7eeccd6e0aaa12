"""Build small images from files and push them to a registry with the distribution API: tar layers
(gzip, zstd or none), the config, the manifest and optionally a multi-platform index. Used by the
tests, the demo and the benchmarks; nothing is downloaded."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import struct
import subprocess
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiohttp
import zstandard
from yarl import URL

from images.auth import parse_challenge
from images.platform import node_platform
from images.registry_client import DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST

BUSYBOX = Path("/bin/busybox")
# The images' PATH: busybox puts its applets in bin, sbin, usr/bin and usr/sbin (httpd, ip...).
BUSYBOX_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
MTIME = 1_700_000_000  # fixed, so the same files give the same layer digest

MediaTypes = Literal["oci", "docker"]
Compression = Literal["gzip", "zstd", "none"]
_LAYER_TYPES = {
    ("oci", "gzip"): "application/vnd.oci.image.layer.v1.tar+gzip",
    ("oci", "zstd"): "application/vnd.oci.image.layer.v1.tar+zstd",
    ("oci", "none"): "application/vnd.oci.image.layer.v1.tar",
    ("docker", "gzip"): "application/vnd.docker.image.rootfs.diff.tar.gzip",
    ("docker", "none"): "application/vnd.docker.image.rootfs.diff.tar",
}


@dataclass(frozen=True)
class File:
    data: bytes
    mode: int = 0o644
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class Dir:
    mode: int = 0o755
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class Symlink:
    target: str


@dataclass(frozen=True)
class Hardlink:
    target: str  # path inside the image


@dataclass(frozen=True)
class Device:
    kind: Literal["c", "b"]
    major: int
    minor: int
    mode: int = 0o666


Entry = bytes | Path | File | Dir | Symlink | Hardlink | Device
Files = Mapping[str, Entry]


@dataclass(frozen=True)
class Layer:
    """A layer's files; add_parents=False leaves out the implied parent directories (to build the odd
    layers real tools never make, such as one writing through a lower layer's symlink)."""

    files: Files
    add_parents: bool = True


def _info(name: str, entry: Entry) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.mtime = MTIME
    data: bytes | None = None
    if isinstance(entry, Path):
        st = entry.stat()
        entry = File(entry.read_bytes(), st.st_mode & 0o7777)
    if isinstance(entry, bytes):
        entry = File(entry)
    if isinstance(entry, File):
        info.mode, info.uid, info.gid, info.size = entry.mode, entry.uid, entry.gid, len(entry.data)
        data = entry.data
    elif isinstance(entry, Dir):
        info.type, info.mode, info.uid, info.gid = tarfile.DIRTYPE, entry.mode, entry.uid, entry.gid
    elif isinstance(entry, Symlink):
        info.type, info.linkname, info.mode = tarfile.SYMTYPE, entry.target, 0o777
    elif isinstance(entry, Hardlink):
        info.type, info.linkname = tarfile.LNKTYPE, entry.target.lstrip("/")
    elif isinstance(entry, Device):
        info.type = tarfile.CHRTYPE if entry.kind == "c" else tarfile.BLKTYPE
        info.devmajor, info.devminor, info.mode = entry.major, entry.minor, entry.mode
    return info, data


def layer_tar(files: Files, add_parents: bool = True) -> bytes:
    """An uncompressed layer: parent directories are added (0755 root) unless given; whiteouts are plain
    empty files named .wh.<name> (or .wh..wh..opq for an opaque directory)."""
    entries: dict[str, Entry] = {}
    for raw_name, entry in files.items():
        name = raw_name.strip("/")
        parts = name.split("/")
        for i in range(1, len(parts) if add_parents else 1):
            entries.setdefault("/".join(parts[:i]), Dir())
        entries[name] = entry
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(entries, key=lambda n: (not isinstance(entries[n], Dir), n.count("/"), n)):
            info, data = _info(name, entries[name])
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def compress(data: bytes, compression: Compression) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, compresslevel=6, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(data)
    return data


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _is_static_elf(path: Path) -> bool:
    """True for an ELF executable without a PT_INTERP program header (no dynamic loader needed)."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:  # 64-bit only; enough for the machines used here
            return False
        endian = "<" if head[5] == 1 else ">"
        (phoff,) = struct.unpack_from(endian + "Q", head, 0x20)
        phentsize, phnum = struct.unpack_from(endian + "HH", head, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(struct.unpack_from(endian + "I", table, i * phentsize)[0] != 3 for i in range(phnum))


def busybox_applet_links(listing: str) -> dict[str, str]:
    """Image path -> symlink target for every applet in `busybox --list-full` output (paths like
    `bin/tar`, `usr/sbin/httpd`), each pointing at bin/busybox with a relative link."""
    links = {}
    for line in listing.split():
        path = line.strip("/")
        if not path or path == "bin/busybox" or ".." in path.split("/"):
            continue
        links[path] = os.path.relpath("bin/busybox", os.path.dirname(path) or ".")
    return links


def busybox_applet_listing(busybox: Path = BUSYBOX) -> str:
    """The binary's own applet list with install paths (`--list-full`); builds without that option
    list names only, which then go to bin/."""
    full = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True)
    if full.returncode == 0 and full.stdout.strip():
        return full.stdout
    names = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True).stdout
    return "\n".join(f"bin/{name}" for name in names.split())


def busybox_files(busybox: Path = BUSYBOX) -> dict[str, Entry]:
    """A minimal root: the static busybox with a symlink for each of its applets where busybox
    installs it (so tar is there, for kubectl cp), /etc/passwd and /etc/group with root and
    nobody (65534), and the usual empty directories."""
    if not busybox.exists():
        raise FileNotFoundError(f"{busybox} is missing: install Debian's busybox-static package")
    if not _is_static_elf(busybox):
        raise ValueError(f"{busybox} is not a static executable: install busybox-static, not busybox")
    files: dict[str, Entry] = {"bin/busybox": File(busybox.read_bytes(), 0o755)}
    links = busybox_applet_links(busybox_applet_listing(busybox))
    for d in ("proc", "sys", "dev", "etc", "var", "bin", "sbin", "usr", "usr/bin", "usr/sbin"):
        files[d] = Dir()
    files.update({path: Symlink(target) for path, target in links.items()})
    files["etc/passwd"] = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
    files["etc/group"] = b"root:x:0:\nnobody:x:65534:\n"
    files["tmp"] = Dir(0o1777)
    files["root"] = Dir(0o700)
    return files


def random_files(size: int, path: str = "data/random.bin", seed: int | None = None) -> dict[str, Entry]:
    """One file of incompressible bytes, to make an image of a known pull size."""
    data = os.urandom(size) if seed is None else hashlib.shake_256(seed.to_bytes(8, "big")).digest(size)
    return {path: data}


class _Pusher:
    """A registry client for pushing, with Basic or Bearer auth (push,pull scope)."""

    def __init__(self, session: aiohttp.ClientSession, base: str, repository: str, auth: tuple[str, str] | None):
        self.session, self.base, self.repository, self.auth = session, base.rstrip("/"), repository, auth
        self.header: str | None = None

    async def _authorize(self, challenge: str) -> None:
        if self.auth is None:
            raise PermissionError(f"{self.base} wants credentials to push {self.repository}")
        basic = "Basic " + base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode()
        scheme, params = parse_challenge(challenge)
        if scheme == "basic":
            self.header = basic
            return
        query = {"service": params.get("service", ""), "scope": f"repository:{self.repository}:pull,push"}
        async with self.session.get(params["realm"], params=query, headers={"Authorization": basic}) as resp:
            resp.raise_for_status()
            body = await resp.json(content_type=None)
        self.header = "Bearer " + (body.get("token") or body["access_token"])

    async def call(self, method: str, url: str | URL, **kwargs: Any) -> tuple[int, Mapping[str, str], bytes]:
        for _ in range(2):
            headers = dict(kwargs.pop("headers", {}) or {})
            if self.header:
                headers["Authorization"] = self.header
            async with self.session.request(method, url, headers=headers, **kwargs) as resp:
                body = await resp.read()
                if resp.status == 401 and self.header is None:
                    await self._authorize(resp.headers.get("WWW-Authenticate", ""))
                    kwargs["headers"] = {k: v for k, v in headers.items() if k != "Authorization"}
                    continue
                if resp.status >= 400:
                    raise RuntimeError(f"{method} {url}: HTTP {resp.status}: {body[:300]!r}")
                return resp.status, resp.headers, body
        raise PermissionError(f"{self.base} refused the credentials for {self.repository}")

    async def blob(self, data: bytes) -> str:
        digest = _digest(data)
        try:
            await self.call("HEAD", f"{self.base}/v2/{self.repository}/blobs/{digest}")
            return digest
        except RuntimeError:
            pass  # not there yet
        _, headers, _ = await self.call("POST", f"{self.base}/v2/{self.repository}/blobs/uploads/")
        location = URL(headers["Location"])
        if not location.is_absolute():
            location = URL(self.base).join(location)
        put_headers = {"Content-Type": "application/octet-stream"}
        await self.call("PUT", location.update_query(digest=digest), data=data, headers=put_headers)
        return digest

    async def manifest(self, doc: dict[str, Any], reference: str | None) -> tuple[str, int]:
        body = json.dumps(doc, separators=(",", ":")).encode()
        digest = _digest(body)
        headers = {"Content-Type": doc["mediaType"]}
        await self.call(
            "PUT", f"{self.base}/v2/{self.repository}/manifests/{reference or digest}", data=body, headers=headers
        )
        return digest, len(body)


async def push_image(
    registry_url: str,
    repository: str,
    tag: str | None,
    files: Files | None = None,
    *,
    layers: Sequence[Files | Layer] | None = None,
    config: Mapping[str, Any] | None = None,
    media_types: MediaTypes = "oci",
    compression: Compression = "gzip",
    platforms: Sequence[tuple[str, str] | tuple[str, str, str]] | None = None,
    index: bool | None = None,
    auth: tuple[str, str] | None = None,
) -> str:
    """Push an image made of `files` (one layer) or `layers` (lowest first) and return the digest the
    tag points to. With several platforms (or index=True) one manifest per platform is pushed, sharing
    the layers, under an index (OCI) or manifest list (docker) that carries the tag."""
    if (media_types, compression) not in _LAYER_TYPES:
        raise ValueError(f"{compression} layers need OCI media types")
    layer_files = list(layers) if layers is not None else [files or {}]
    plats = list(platforms) if platforms else [node_platform()]
    make_index = index if index is not None else len(plats) > 1
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        pusher = _Pusher(session, registry_url, repository, auth)
        layer_descs, diff_ids = [], []
        for spec in layer_files:
            layer = spec if isinstance(spec, Layer) else Layer(spec)
            tar = layer_tar(layer.files, layer.add_parents)
            blob = compress(tar, compression)
            digest = await pusher.blob(blob)
            layer_descs.append(
                {"mediaType": _LAYER_TYPES[(media_types, compression)], "digest": digest, "size": len(blob)}
            )
            diff_ids.append(_digest(tar))
        entries = []
        for plat in plats:
            os_name, arch, variant = (*plat, "")[:3]
            image_config: dict[str, Any] = {
                "architecture": arch,
                "os": os_name,
                "config": dict(config or {}),
                "rootfs": {"type": "layers", "diff_ids": diff_ids},
                "history": [{"created_by": "kubelet-emu images.build"} for _ in diff_ids],
            }
            if variant:
                image_config["variant"] = variant
            config_blob = json.dumps(image_config, sort_keys=True).encode()
            config_digest = await pusher.blob(config_blob)
            manifest = {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST if media_types == "oci" else DOCKER_MANIFEST,
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json"
                    if media_types == "oci"
                    else "application/vnd.docker.container.image.v1+json",
                    "digest": config_digest,
                    "size": len(config_blob),
                },
                "layers": layer_descs,
            }
            digest, size = await pusher.manifest(manifest, None if make_index else tag)
            platform = {"architecture": arch, "os": os_name, **({"variant": variant} if variant else {})}
            entries.append({"mediaType": manifest["mediaType"], "digest": digest, "size": size, "platform": platform})
        if not make_index:
            return entries[-1]["digest"]
        index_doc = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX if media_types == "oci" else DOCKER_MANIFEST_LIST,
            "manifests": entries,
        }
        digest, _ = await pusher.manifest(index_doc, tag)
        return digest

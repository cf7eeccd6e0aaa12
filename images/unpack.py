"""Apply image layers (tar, gzip or zstd) to a directory: whiteouts, opaque directories,
hardlinks, symlinks, device nodes (as root), ownership, modes, times and xattrs.
Paths never leave the target: symlinks are resolved inside it, as if it were the root."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import shutil
import stat
import tarfile
import tempfile
from pathlib import Path
from typing import BinaryIO

import zstandard

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
_CHUNK = 1 << 20
_MAX_SYMLINKS = 255


class LayerError(Exception):
    pass


def chain_id(diff_ids: list[str]) -> str:
    """The OCI ChainID of a stack of layers: it names the unpacked result."""
    chain = ""
    for diff_id in diff_ids:
        chain = diff_id if not chain else "sha256:" + hashlib.sha256(f"{chain} {diff_id}".encode()).hexdigest()
    return chain


def _open_decompressed(blob: BinaryIO) -> BinaryIO:
    magic = blob.read(4)
    blob.seek(0)
    if magic[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=blob)  # type: ignore[return-value]
    if magic == b"\x28\xb5\x2f\xfd":
        return zstandard.ZstdDecompressor().stream_reader(blob, read_across_frames=True)  # type: ignore[return-value]
    return blob


def decompress_layer(blob_path: Path, out_dir: Path) -> tuple[Path, str]:
    """Decompress a layer blob to a temp tar (so it can be read twice) and return it with its diff ID."""
    digest = hashlib.sha256()
    fd, name = tempfile.mkstemp(dir=out_dir, suffix=".tar")
    try:
        with open(blob_path, "rb") as raw, os.fdopen(fd, "wb") as out:
            stream = _open_decompressed(raw)
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
    except (OSError, EOFError, zstandard.ZstdError) as exc:
        Path(name).unlink(missing_ok=True)
        raise LayerError(f"cannot decompress layer {blob_path.name}: {exc}") from exc
    return Path(name), "sha256:" + digest.hexdigest()


def resolve_in_root(root: str, rel: str, follow_last: bool = True) -> str:
    """rel inside root, symlinks followed as if root were '/': never a path outside root."""
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    done: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        candidate = os.path.join(root, *done, part)
        if (parts or follow_last) and os.path.islink(candidate):
            links += 1
            if links > _MAX_SYMLINKS:
                raise LayerError(f"too many levels of symlinks resolving {rel!r}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                done = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        done.append(part)
    return os.path.join(root, *done)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


class _Applier:
    def __init__(self, root: Path) -> None:
        self.root = str(root)
        self.is_root = os.geteuid() == 0
        self.dirs: list[tuple[str, tarfile.TarInfo]] = []  # modes and times set last: a dir may be read-only

    def whiteout(self, member: tarfile.TarInfo) -> None:
        parent_rel, base = os.path.split(member.name)
        parent = resolve_in_root(self.root, parent_rel)
        if base == OPAQUE_MARKER:
            if os.path.isdir(parent):
                for child in os.listdir(parent):
                    _remove(os.path.join(parent, child))
        elif base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
            return  # aufs metadata (.wh..wh.plnk and the like): not content
        else:
            _remove(os.path.join(parent, base[len(WHITEOUT_PREFIX) :]))

    def entry(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        parent_rel, base = os.path.split(member.name)
        if base in ("", ".", ".."):
            return
        parent = resolve_in_root(self.root, parent_rel)
        os.makedirs(parent, exist_ok=True)
        path = os.path.join(parent, base)
        if member.isdir():
            if not (os.path.isdir(path) and not os.path.islink(path)):
                _remove(path)
                os.mkdir(path, 0o700)
            self.dirs.append((path, member))
            self._owner(path, member)
            return
        _remove(path)
        if member.isreg():
            source = tar.extractfile(member)
            assert source is not None
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(source, out, _CHUNK)
        elif member.issym():
            os.symlink(member.linkname, path)
        elif member.islnk():
            target = resolve_in_root(self.root, member.linkname, follow_last=False)
            os.link(target, path, follow_symlinks=False)
            return  # a hardlink shares the target's inode: owner and mode are the target's
        elif member.ischr() or member.isblk():
            if not self.is_root:
                return
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            try:
                os.mknod(path, kind | (member.mode & 0o7777), os.makedev(member.devmajor, member.devminor))
            except PermissionError:
                return  # a user namespace may forbid device nodes; the runtime provides /dev anyway
        elif member.isfifo():
            os.mkfifo(path)
        else:
            return
        self._owner(path, member)
        self._xattrs(path, member)
        if not member.issym():
            os.chmod(path, member.mode & 0o7777)
        os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)

    def _owner(self, path: str, member: tarfile.TarInfo) -> None:
        if self.is_root:
            os.lchown(path, member.uid, member.gid)

    @staticmethod
    def _xattrs(path: str, member: tarfile.TarInfo) -> None:
        for key, value in member.pax_headers.items():
            if key.startswith("SCHILY.xattr."):
                with contextlib.suppress(OSError):
                    os.setxattr(path, key[13:], value.encode("utf-8", "surrogateescape"), follow_symlinks=False)

    def finish(self) -> None:
        for path, member in reversed(self.dirs):
            self._xattrs(path, member)
            os.chmod(path, member.mode & 0o7777)
            os.utime(path, (member.mtime, member.mtime))


def apply_layer(tar_path: Path, root: Path) -> None:
    """Apply one uncompressed layer tar on top of root. Whiteouts of a layer hide lower layers only,
    so they are applied before the layer's own entries."""
    try:
        with tarfile.open(tar_path, "r:") as tar:
            members = tar.getmembers()
            applier = _Applier(root)
            for member in members:
                member.name = member.name.lstrip("/")
                if os.path.basename(member.name).startswith(WHITEOUT_PREFIX):
                    applier.whiteout(member)
            for member in members:
                if not os.path.basename(member.name).startswith(WHITEOUT_PREFIX):
                    applier.entry(tar, member)
            applier.finish()
    except (tarfile.TarError, OSError) as exc:
        raise LayerError(f"cannot unpack layer: {exc}") from exc


def unpack_image(layer_blobs: list[Path], diff_ids: list[str], target: Path, scratch: Path) -> None:
    """Unpack layers, in order, into target (made here), checking each layer's diff ID against the config."""
    if len(layer_blobs) != len(diff_ids):
        raise LayerError(f"the config lists {len(diff_ids)} layers but the manifest has {len(layer_blobs)}")
    target.mkdir(mode=0o755)
    for blob, want in zip(layer_blobs, diff_ids, strict=True):
        tar_path, got = decompress_layer(blob, scratch)
        try:
            if got != want:
                raise LayerError(f"layer sha256:{blob.name}: uncompressed digest {got} does not match diff ID {want}")
            apply_layer(tar_path, target)
        finally:
            tar_path.unlink(missing_ok=True)

"""Writable per-container roots on top of a read-only image base: an overlay mount where the kernel
allows it, otherwise a copy. Release finds mounts in /proc/self/mountinfo, so it works after a restart."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import re
import shutil
from pathlib import Path

log = logging.getLogger("kubelet_emu.images")

ROOTFS, UPPER, WORK = "rootfs", "upper", "work"
COPIED = ".rootfs-copied"  # marks a complete copy (no overlay), so a second prepare keeps it
MNT_DETACH = 2
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


class RootfsError(Exception):
    pass


def _mount_overlay(lower: Path, upper: Path, work: Path, target: Path) -> None:
    options = f"lowerdir={lower},upperdir={upper},workdir={work}".encode()
    if _libc.mount(b"overlay", str(target).encode(), b"overlay", 0, options) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount overlay on {target}: {os.strerror(errno)}")


def mounts_under(path: Path) -> list[Path]:
    """Mount points at or below path, deepest first, from /proc/self/mountinfo."""
    prefix = str(path).rstrip("/")
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split(" ")
            point = _unescape(fields[4])
            if point == prefix or point.startswith(prefix + "/"):
                found.append(Path(point))
    return sorted(set(found), key=lambda p: len(p.parts), reverse=True)


def _unescape(field: str) -> str:
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def overlay_lower_dirs() -> set[Path]:
    """Every lowerdir of the overlay mounts this process sees: image bases that containers use now."""
    found: set[Path] = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            _, _, after = line.rstrip("\n").partition(" - ")
            fstype, _, rest = after.partition(" ")
            if fstype != "overlay":
                continue
            for option in rest.split(" ", 1)[-1].split(","):
                if option.startswith("lowerdir="):
                    found.update(Path(_unescape(d)) for d in option[9:].split(":") if d)
    return found


def _unmount(point: Path) -> None:
    if _libc.umount2(str(point).encode(), MNT_DETACH) != 0:
        errno = ctypes.get_errno()
        if errno not in (22, 2):  # EINVAL: not a mount (anymore); ENOENT: gone
            raise OSError(errno, f"unmount {point}: {os.strerror(errno)}")


def _prepare_overlay(base: Path, container_dir: Path) -> Path:
    target = container_dir / ROOTFS
    for d in (UPPER, WORK, ROOTFS):
        (container_dir / d).mkdir(mode=0o755, exist_ok=True)
    if mounts_under(target):
        return target  # already prepared (a restart while the container kept running)
    _mount_overlay(base, container_dir / UPPER, container_dir / WORK, target)
    return target


async def prepare(base: Path, container_dir: Path, allow_overlay: bool = True) -> Path:
    """container_dir/rootfs, writable, on top of base. Preparing a root that exists (an agent restart
    while the container runs) returns it as it is."""
    target = container_dir / ROOTFS
    await asyncio.to_thread(container_dir.mkdir, parents=True, exist_ok=True)
    if (container_dir / COPIED).exists() and target.is_dir():
        return target
    if allow_overlay:
        try:
            return await asyncio.to_thread(_prepare_overlay, base, container_dir)
        except OSError as exc:
            log.info("overlay mount not possible, copying the image instead: %s", exc)
            await asyncio.to_thread(_remove_dirs, container_dir)
    partial = container_dir / f"{ROOTFS}.partial"
    if partial.exists():
        await asyncio.to_thread(shutil.rmtree, partial)
    proc = await asyncio.create_subprocess_exec(
        "cp", "-a", "--reflink=auto", f"{base}/.", str(partial), stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RootfsError(f"cannot copy image {base} to {partial}: {err.decode().strip()}")
    partial.rename(target)
    (container_dir / COPIED).touch()
    return target


def _remove_dirs(container_dir: Path) -> None:
    (container_dir / COPIED).unlink(missing_ok=True)
    for d in (ROOTFS, UPPER, WORK, f"{ROOTFS}.partial"):
        path = container_dir / d
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)


def _release(container_dir: Path) -> None:
    for point in mounts_under(container_dir / ROOTFS):
        _unmount(point)
    if mounts_under(container_dir / ROOTFS):
        raise RootfsError(f"{container_dir / ROOTFS} is still mounted")
    if container_dir.exists():
        _remove_dirs(container_dir)
        with contextlib.suppress(OSError):  # not empty: the caller keeps other files there
            container_dir.rmdir()


async def release(container_dir: Path) -> None:
    await asyncio.to_thread(_release, container_dir)

"""State files that can hold secret material (a container's environment with secretKeyRef
values, OCI config.json, Secret volumes): 0600 in 0700 directories, gone with the Pod."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

from runtimes.process.confine import unescape


def private_dir(path: Path) -> Path:
    """`path` and its missing parents made 0700; an existing `path` is set to 0700."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def write_private(path: Path, text: str) -> None:
    """Written whole (readers never see half a file), mode 0600 from the start."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()).rstrip("/") + "/"
    points = []
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as f:
        for line in f:
            point = unescape(line.split()[4])
            if point.startswith(prefix) or point == prefix.rstrip("/"):
                points.append(point)
    return sorted(set(points), key=len, reverse=True)


def remove_tree(path: Path) -> None:
    """Delete a Pod's state directory: whatever is still mounted below it (a tmpfs of Secret
    volumes, a rootfs) is unmounted first, so the removal never reaches into a mounted filesystem."""
    if not path.exists():
        return
    for point in _mounts_under(path):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    if _mounts_under(path):
        return  # better a leftover than deleting files of a filesystem that is not ours
    shutil.rmtree(path, ignore_errors=True)

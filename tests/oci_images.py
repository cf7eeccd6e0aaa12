"""A stand-in for images.service.ImageService in the oci backend tests: one local "image" whose
rootfs is built from the static busybox binary. It only serves present(), prepare_rootfs() and
release_rootfs(); the backend under test drives real runc, cgroups and processes."""

from __future__ import annotations

import asyncio
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from images.build import busybox_applet_links, busybox_applet_listing

BUSYBOX = "/bin/busybox"

PASSWD = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n"
GROUP = "root:x:0:\napp:x:1000:\nextra:x:3000:app\nnogroup:x:65534:\n"


def build_busybox_rootfs(target: Path) -> Path:
    """A minimal root filesystem: busybox and all its applet links, /etc/passwd and /etc/group."""
    for directory in ("bin", "etc", "tmp", "proc", "sys", "dev", "root", "home/app"):
        (target / directory).mkdir(parents=True, exist_ok=True)
    (target / "tmp").chmod(0o1777)
    shutil.copy2(BUSYBOX, target / "bin" / "busybox")
    for path, link_target in busybox_applet_links(busybox_applet_listing(Path(BUSYBOX))).items():
        link = target / path  # where busybox installs it: bin/, sbin/, usr/bin/, usr/sbin/
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(link_target)
    (target / "etc" / "passwd").write_text(PASSWD)
    (target / "etc" / "group").write_text(GROUP)
    return target


@dataclass
class LocalImage:
    digest: str
    image_id: str
    config: dict[str, Any]
    rootfs: Path


@dataclass
class LocalImages:
    """Images by name; every container gets a writable copy of the image's rootfs."""

    images: dict[str, LocalImage] = field(default_factory=dict)
    prepared: set[Path] = field(default_factory=set)

    def add(self, name: str, rootfs: Path, **config: Any) -> LocalImage:
        image = LocalImage(digest="sha256:" + "0" * 64, image_id=f"{name}@sha256:{'0' * 64}", config=config,
                           rootfs=rootfs)  # fmt: skip
        self.images[name] = image
        return image

    def present(self, ref: Any) -> LocalImage | None:
        # A plain name, or an images.reference.Reference (which keeps the name as written).
        return self.images.get(getattr(ref, "original", None) or str(ref))

    async def prepare_rootfs(self, image: LocalImage, container_dir: Path) -> Path:
        target = Path(container_dir) / "rootfs"
        await asyncio.to_thread(shutil.copytree, image.rootfs, target, symlinks=True)
        self.prepared.add(Path(container_dir))
        return target

    async def release_rootfs(self, container_dir: Path) -> None:
        await asyncio.to_thread(shutil.rmtree, Path(container_dir) / "rootfs", True)
        self.prepared.discard(Path(container_dir))


def busybox_available() -> bool:
    return os.access(BUSYBOX, os.X_OK)

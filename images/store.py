"""Content-addressed blobs (root/blobs/sha256/<hex>) and the JSON index of pulled images.
Every method here blocks on file IO: callers run them with asyncio.to_thread."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("kubelet_emu.images")


class DigestMismatchError(Exception):
    pass


def digest_hex(digest: str) -> str:
    algorithm, _, hex_part = digest.partition(":")
    if algorithm != "sha256" or len(hex_part) != 64 or not all(c in "0123456789abcdef" for c in hex_part):
        raise DigestMismatchError(f"unsupported or malformed digest {digest!r}")
    return hex_part


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class BlobWriter:
    """A blob being downloaded: written to a temp file and hashed, renamed into place only when the
    digest and size match."""

    def __init__(self, store: BlobStore, digest: str, size: int | None) -> None:
        self.store, self.digest, self.size = store, digest, size
        self.hash = hashlib.sha256()
        self.written = 0
        fd, name = tempfile.mkstemp(dir=store.ingest, prefix=digest_hex(digest)[:12] + ".")
        self.path = Path(name)
        self.file = os.fdopen(fd, "wb")

    def write(self, chunk: bytes) -> None:
        self.hash.update(chunk)
        self.file.write(chunk)
        self.written += len(chunk)

    def commit(self) -> Path:
        self.file.close()
        got = "sha256:" + self.hash.hexdigest()
        if got != self.digest or (self.size is not None and self.written != self.size):
            self.abort()
            raise DigestMismatchError(
                f"digest mismatch: expected {self.digest} ({self.size} bytes), got {got} ({self.written} bytes)"
            )
        target = self.store.path(self.digest)
        os.replace(self.path, target)
        return target

    def abort(self) -> None:
        self.file.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.dir = root / "blobs" / "sha256"
        self.ingest = root / "ingest"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ingest.mkdir(parents=True, exist_ok=True)
        for stale in self.ingest.iterdir():  # downloads cut short by a restart
            stale.unlink(missing_ok=True)

    def path(self, digest: str) -> Path:
        return self.dir / digest_hex(digest)

    def has(self, digest: str) -> bool:
        return self.path(digest).exists()

    def writer(self, digest: str, size: int | None) -> BlobWriter:
        return BlobWriter(self, digest, size)

    def put(self, data: bytes, digest: str) -> Path:
        writer = self.writer(digest, len(data))
        writer.write(data)
        return writer.commit()

    def read(self, digest: str) -> bytes:
        data = self.path(digest).read_bytes()
        if sha256_digest(data) != digest:
            raise DigestMismatchError(f"stored blob {digest} is corrupt")
        return data

    def digests(self) -> set[str]:
        return {"sha256:" + p.name for p in self.dir.iterdir() if len(p.name) == 64}

    def remove(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)


@dataclass
class ImageRecord:
    digest: str  # what the tag resolved to: the index digest for a multi-platform image
    manifest_digest: str  # the platform manifest
    config_digest: str
    layers: list[str]  # compressed layer digests
    chain_id: str
    size: int
    names: list[str] = field(default_factory=list)  # repository names it was pulled as
    tags: list[str] = field(default_factory=list)  # "name:tag" strings pointing to it
    config: dict[str, Any] = field(default_factory=dict)
    last_used: float = field(default_factory=time.time)

    def blobs(self) -> set[str]:
        return {self.digest, self.manifest_digest, self.config_digest, *self.layers}


class ImageIndex:
    """root/images.json: manifest digest -> ImageRecord. Written whole through a temp file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: dict[str, ImageRecord] = {}
        if not path.exists():
            return
        try:
            raw = json.loads(path.read_text())
            self.records = {d: ImageRecord(**r) for d, r in raw.get("images", {}).items()}
        except (ValueError, TypeError, AttributeError) as exc:
            # Start empty rather than not at all: images are pulled again, GC sweeps the orphans.
            broken = path.with_suffix(".broken")
            os.replace(path, broken)
            log.warning("image index %s unreadable (%s); kept as %s, starting empty", path, exc, broken)

    def snapshot(self) -> str:
        """The index as JSON; taken on the event loop so a writer thread never sees records change."""
        return json.dumps({"images": {d: asdict(r) for d, r in self.records.items()}}, indent=1, sort_keys=True)

    def save(self, data: str | None = None) -> None:
        data = self.snapshot() if data is None else data
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(data)
        os.replace(tmp, self.path)

    def by_tag(self, name_tag: str) -> ImageRecord | None:
        return next((r for r in self.records.values() if name_tag in r.tags), None)

    def add(self, record: ImageRecord, name: str, tag: str | None) -> ImageRecord:
        """Record an image; a tag moves from the image it pointed to before."""
        existing = self.records.get(record.digest)
        if existing is not None:
            record.names = existing.names
            record.tags = existing.tags
        if name not in record.names:
            record.names.append(name)
        if tag:
            name_tag = f"{name}:{tag}"
            for other in self.records.values():
                if name_tag in other.tags and other.digest != record.digest:
                    other.tags.remove(name_tag)
            if name_tag not in record.tags:
                record.tags.append(name_tag)
        self.records[record.digest] = record
        return record

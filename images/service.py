"""ImageService: the node's image store. Pulls (de-duplicated, verified), the image index,
unpacked read-only bases, per-container writable roots and image garbage collection."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from images import rootfs as rootfs_mod
from images.auth import Credential, credentials_from_dockerconfigjson
from images.errors import ImageNotFoundError, PullError, UnauthorizedError
from images.platform import node_platform, select_manifest
from images.reference import Reference
from images.registry_client import INDEX_TYPES, MANIFEST_TYPES, Endpoint, RegistryClient
from images.store import BlobStore, DigestMismatchError, ImageIndex, ImageRecord, digest_hex, sha256_digest
from images.unpack import LayerError, chain_id, unpack_image

__all__ = [
    "Credential",
    "Image",
    "ImageNotFoundError",
    "ImageService",
    "PullError",
    "UnauthorizedError",
    "credentials_from_dockerconfigjson",
]

log = logging.getLogger("kubelet_emu.images")
PARALLEL_DOWNLOADS = 3


@dataclass
class Image:
    reference: str  # as the Pod spec wrote it
    name: str  # normalized repository: docker.io/library/busybox
    digest: str  # what the tag resolved to (the index digest for a multi-platform image)
    image_id: str  # name@digest, as containerStatuses[].imageID
    config: dict[str, Any]  # the image config's "config": Entrypoint, Cmd, Env, WorkingDir, User, ExposedPorts
    size: int  # bytes of the compressed layers
    rootfs: Path  # the read-only unpacked base
    manifest_digest: str = ""  # the platform manifest actually unpacked
    config_digest: str = ""  # the image ID as `crictl images` shows it
    tags: list[str] = field(default_factory=list)


def _forget(tasks: dict[Any, Any], key: Any) -> Callable[[asyncio.Task[Any]], None]:
    """A done-callback dropping a shared task from its table; it also retrieves the exception, which
    the waiters have seen (or, all of them cancelled, nobody needs)."""

    def done(task: asyncio.Task[Any]) -> None:
        tasks.pop(key, None)
        if not task.cancelled():
            task.exception()

    return done


def _disk_usage_percent(path: Path) -> float:
    usage = shutil.disk_usage(path)
    return 100.0 * usage.used / usage.total if usage.total else 0.0


class ImageService:
    def __init__(
        self,
        root: Path,
        mirrors: dict[str, list[str]] | None = None,
        insecure_registries: set[str] | None = None,
        platform: tuple[str, str] | tuple[str, str, str] | None = None,
        gc_high_percent: int = 85,
        gc_low_percent: int = 80,
        disk_usage: Callable[[], float] | None = None,
        use_overlay: bool = True,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.blobs = BlobStore(self.root)
        self.index = ImageIndex(self.root / "images.json")
        self.unpacked = self.root / "unpacked"
        self.scratch = self.root / "tmp"
        for d in (self.unpacked, self.scratch):
            d.mkdir(exist_ok=True)
        for stale in [*self.unpacked.glob(".tmp-*"), *self.scratch.iterdir()]:  # work cut short by a restart
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        self.client = RegistryClient(dict(mirrors or {}), set(insecure_registries or ()))
        if platform is None:
            self.platform = node_platform()
        else:
            self.platform = (platform[0], platform[1], platform[2] if len(platform) > 2 else "")  # type: ignore[misc]
        self.gc_high_percent, self.gc_low_percent = gc_high_percent, gc_low_percent
        self.disk_usage = disk_usage or (lambda: _disk_usage_percent(self.root))
        self.use_overlay = use_overlay
        self._pulls: dict[tuple[str, tuple[Credential, ...]], asyncio.Task[Image]] = {}
        self._blob_fetches: dict[str, asyncio.Task[None]] = {}
        self._unpacks: dict[str, asyncio.Task[None]] = {}
        self._downloads = asyncio.Semaphore(PARALLEL_DOWNLOADS)
        self._index_lock = asyncio.Lock()

    async def close(self) -> None:
        await self.client.close()

    # -- lookup ---------------------------------------------------------------------------------

    def _lookup(self, ref: Reference) -> ImageRecord | None:
        if ref.digest:
            for rec in self.index.records.values():
                if ref.digest in (rec.digest, rec.manifest_digest) and ref.name in rec.names:
                    return rec
            return None
        return self.index.by_tag(f"{ref.name}:{ref.tag or 'latest'}")

    def _rootfs_of(self, rec: ImageRecord) -> Path:
        return self.unpacked / digest_hex(rec.chain_id)

    def _image(self, rec: ImageRecord, ref: Reference) -> Image:
        return Image(
            reference=ref.original or str(ref),
            name=ref.name,
            digest=rec.digest,
            image_id=f"{ref.name}@{rec.digest}",
            config=rec.config,
            size=rec.size,
            rootfs=self._rootfs_of(rec),
            manifest_digest=rec.manifest_digest,
            config_digest=rec.config_digest,
            tags=list(rec.tags),
        )

    def present(self, ref: Reference) -> Image | None:
        """The image if it is pulled and unpacked here; no network."""
        rec = self._lookup(ref)
        if rec is None or not self._rootfs_of(rec).is_dir():
            return None
        return self._image(rec, ref)

    def list_images(self) -> list[Image]:
        """Every stored image, once per repository name (for the node's status.images)."""
        out = []
        for rec in self.index.records.values():
            for name in rec.names:
                out.append(self._image(rec, Reference(*name.split("/", 1), tag=None, digest=rec.digest)))
        return out

    # -- pull -----------------------------------------------------------------------------------

    async def pull(self, ref: Reference, credentials: Sequence[Credential] = ()) -> Image:
        """Pull, verify and unpack ref for this node's platform. Concurrent pulls of one image share
        the work. Raises ImageNotFoundError for an unknown repository/tag/digest, PullError otherwise."""
        key = (str(ref), tuple(credentials))
        task = self._pulls.get(key)
        if task is None:
            task = asyncio.create_task(self._pull(ref, tuple(credentials)), name=f"pull {ref}")
            self._pulls[key] = task
            task.add_done_callback(_forget(self._pulls, key))
        image = await asyncio.shield(task)
        return dataclasses.replace(image, reference=ref.original or str(ref), tags=list(image.tags))

    async def _pull(self, ref: Reference, credentials: tuple[Credential, ...]) -> Image:
        mirror_errors = []
        for ep in self.client.endpoints(ref):
            try:
                try:
                    return await self._pull_from(ep, ref, credentials)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    raise PullError(f"pulling {ref}: connection to {ep.base} failed: {exc!r}") from exc
                except (KeyError, TypeError, AttributeError) as exc:
                    raise PullError(f"pulling {ref}: malformed manifest or config from {ep.base}: {exc!r}") from exc
            except PullError as exc:
                if not ep.mirror:
                    if mirror_errors:
                        exc.args = (f"{exc.args[0]} (mirrors failed too: {'; '.join(mirror_errors)})",)
                    raise
                log.info("mirror failed, trying the next endpoint: %s", exc)
                mirror_errors.append(str(exc))
        raise AssertionError("unreachable: the registry itself is always the last endpoint")

    async def _manifest(
        self, ep: Endpoint, ref: Reference, locator: str, creds: Sequence[Credential]
    ) -> tuple[dict[str, Any], bytes, str]:
        body, media_type, header_digest = await self.client.manifest(ep, ref, locator, creds)
        digest = await asyncio.to_thread(sha256_digest, body)
        expected = locator if locator.startswith("sha256:") else header_digest
        if expected and expected != digest:
            raise PullError(f"pulling {ref}: manifest digest mismatch at {ep.base}: expected {expected}, got {digest}")
        try:
            doc = json.loads(body)
        except ValueError as exc:
            raise PullError(f"pulling {ref}: the manifest from {ep.base} is not JSON: {exc}") from exc
        doc.setdefault("mediaType", media_type)
        if doc.get("schemaVersion") == 1:
            raise PullError(f"pulling {ref}: Docker schema 1 manifests are not supported; push the image again")
        return doc, body, digest

    async def _pull_from(self, ep: Endpoint, ref: Reference, creds: tuple[Credential, ...]) -> Image:
        doc, body, digest = await self._manifest(ep, ref, ref.locator, creds)
        top_digest, manifests = digest, [(body, digest)]
        if doc["mediaType"] in INDEX_TYPES or ("manifests" in doc and "layers" not in doc):
            entry = select_manifest(doc, self.platform)
            if entry is None:
                have = sorted(
                    {
                        "/".join(filter(None, (p.get("os"), p.get("architecture"), p.get("variant"))))
                        for m in doc.get("manifests", [])
                        if (p := m.get("platform"))
                    }
                )
                want = "/".join(filter(None, self.platform))
                raise PullError(f"pulling {ref}: no matching manifest for {want} in the manifest list (has {have})")
            doc, body, digest = await self._manifest(ep, ref, entry["digest"], creds)
            manifests.append((body, digest))
        if doc["mediaType"] not in MANIFEST_TYPES and "layers" not in doc:
            raise PullError(f"pulling {ref}: unsupported manifest type {doc['mediaType']!r}")
        config_desc, layer_descs = doc["config"], doc.get("layers") or []
        # every download settles before the pull reports: no stray downloads after a failure
        results = await asyncio.gather(
            *(self._fetch(ep, ref, d, creds) for d in (config_desc, *layer_descs)), return_exceptions=True
        )
        if failed := next((r for r in results if isinstance(r, BaseException)), None):
            raise failed
        for manifest_body, manifest_digest in manifests:
            if not self.blobs.has(manifest_digest):
                await asyncio.to_thread(self.blobs.put, manifest_body, manifest_digest)
        try:
            config_doc = json.loads(await asyncio.to_thread(self.blobs.read, config_desc["digest"]))
            diff_ids = list(config_doc["rootfs"]["diff_ids"])
        except (DigestMismatchError, ValueError, KeyError, TypeError) as exc:
            raise PullError(f"pulling {ref}: bad image config {config_desc['digest']}: {exc}") from exc
        layers = [d["digest"] for d in layer_descs]
        chain = chain_id(diff_ids) or sha256_digest(b"")
        await self._unpack(ref, chain, layers, diff_ids)
        record = ImageRecord(
            digest=top_digest,
            manifest_digest=digest,
            config_digest=config_desc["digest"],
            layers=layers,
            chain_id=chain,
            size=sum(int(d.get("size", 0)) for d in layer_descs),
            config=config_doc.get("config") or {},
        )
        async with self._index_lock:
            record = self.index.add(record, ref.name, None if ref.digest else ref.tag)
            record.last_used = time.time()
            await asyncio.to_thread(self.index.save, self.index.snapshot())
        return self._image(record, ref)

    async def _fetch(self, ep: Endpoint, ref: Reference, desc: dict[str, Any], creds: Sequence[Credential]) -> None:
        digest = desc["digest"]
        if self.blobs.has(digest):
            return
        task = self._blob_fetches.get(digest)
        if task is None:
            task = asyncio.create_task(self._download(ep, ref, digest, desc.get("size"), creds))
            self._blob_fetches[digest] = task
            task.add_done_callback(_forget(self._blob_fetches, digest))
        await asyncio.shield(task)

    async def _download(
        self, ep: Endpoint, ref: Reference, digest: str, size: Any, creds: Sequence[Credential]
    ) -> None:
        try:
            digest_hex(digest)
        except DigestMismatchError as exc:
            raise PullError(f"pulling {ref}: {exc}") from exc
        async with self._downloads:
            await self.client.fetch_blob(ep, ref, digest, int(size) if size is not None else None, self.blobs, creds)

    async def _unpack(self, ref: Reference, chain: str, layers: list[str], diff_ids: list[str]) -> None:
        target = self.unpacked / digest_hex(chain)
        if target.is_dir():
            return
        task = self._unpacks.get(chain)
        if task is None:
            task = asyncio.create_task(self._unpack_now(ref, target, layers, diff_ids))
            self._unpacks[chain] = task
            task.add_done_callback(_forget(self._unpacks, chain))
        await asyncio.shield(task)

    async def _unpack_now(self, ref: Reference, target: Path, layers: list[str], diff_ids: list[str]) -> None:
        tmp = self.unpacked / f".tmp-{target.name}"
        blobs = [self.blobs.path(d) for d in layers]

        def work() -> None:
            if tmp.exists():
                shutil.rmtree(tmp)
            try:
                unpack_image(blobs, diff_ids, tmp, self.scratch)
                tmp.rename(target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise

        try:
            await asyncio.to_thread(work)
        except LayerError as exc:
            for path in blobs:  # a stored blob that does not unpack is fetched anew by the next pull
                await asyncio.to_thread(path.unlink, True)
            raise PullError(f"pulling {ref}: {exc}") from exc

    # -- container roots ------------------------------------------------------------------------

    async def prepare_rootfs(self, image: Image, container_dir: Path) -> Path:
        """A writable root for one container (overlay on the image base, or a copy); returns its path."""
        if not image.rootfs.is_dir():
            raise PullError(f"image {image.reference} is no longer unpacked at {image.rootfs}; pull it again")
        target = await rootfs_mod.prepare(image.rootfs, Path(container_dir), self.use_overlay)
        await self._touch(image.digest)
        return target

    async def release_rootfs(self, container_dir: Path) -> None:
        """Unmount and remove what prepare_rootfs made; idempotent, works after a restart."""
        await rootfs_mod.release(Path(container_dir))

    async def _touch(self, digest: str) -> None:
        async with self._index_lock:
            rec = self.index.records.get(digest)
            if rec is not None:
                rec.last_used = time.time()
                await asyncio.to_thread(self.index.save, self.index.snapshot())

    # -- garbage collection ---------------------------------------------------------------------

    @staticmethod
    def _in_use(rec: ImageRecord, in_use: set[str]) -> bool:
        keys = {rec.digest, rec.manifest_digest, rec.config_digest, *rec.tags}
        keys |= {f"{n}@{rec.digest}" for n in rec.names} | {f"{n}@{rec.manifest_digest}" for n in rec.names}
        return bool(keys & in_use)

    async def garbage_collect(self, in_use: set[str], usage: Callable[[], float] | None = None) -> list[str]:
        """When disk use reaches gc_high_percent, remove images not in in_use (digests, image IDs or
        name:tag) and not the base of a mounted container root, least recently used first, until it is
        below gc_low_percent; then remove blobs and unpacked bases no image refers to.
        Returns the image IDs removed."""
        usage = usage or self.disk_usage
        removed: list[str] = []
        async with self._index_lock:
            if await asyncio.to_thread(usage) >= self.gc_high_percent:
                mounted = await asyncio.to_thread(rootfs_mod.overlay_lower_dirs)  # running containers' bases
                candidates = sorted(
                    (
                        r
                        for r in self.index.records.values()
                        if not self._in_use(r, in_use) and self._rootfs_of(r) not in mounted
                    ),
                    key=lambda r: r.last_used,
                )
                for rec in candidates:
                    if await asyncio.to_thread(usage) < self.gc_low_percent:
                        break
                    del self.index.records[rec.digest]
                    await asyncio.to_thread(self.index.save, self.index.snapshot())
                    await self._sweep()
                    removed.append(f"{rec.names[0]}@{rec.digest}" if rec.names else rec.digest)
                    log.info("image garbage collected: %s", removed[-1])
            await self._sweep()
        return removed

    async def _sweep(self) -> None:
        """Remove blobs and unpacked bases of no recorded image (not while a pull is storing new ones)."""
        if self._pulls or self._blob_fetches or self._unpacks:
            return
        keep_blobs = set().union(*(r.blobs() for r in self.index.records.values()))
        keep_roots = {digest_hex(r.chain_id) for r in self.index.records.values()}

        def sweep() -> None:
            for digest in self.blobs.digests() - keep_blobs:
                self.blobs.remove(digest)
            for path in self.unpacked.iterdir():
                if not path.name.startswith(".") and path.name not in keep_roots:
                    shutil.rmtree(path, ignore_errors=True)

        await asyncio.to_thread(sweep)

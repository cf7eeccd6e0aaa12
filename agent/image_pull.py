"""Make a container's image present before the container is created, as the kubelet's image
manager does: imagePullPolicy, the waiting reasons (ErrImagePull, ImagePullBackOff,
ErrImageNeverPull, InvalidImageName) and the events (Pulling, Pulled, Failed, BackOff),
with the kubelet's messages and its pull back-off (10 s doubling up to 300 s per Pod and image).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from typing import TYPE_CHECKING, Any, Protocol

from common.logfmt import kv
from images.auth import credentials_from_dockerconfigjson
from images.errors import PullError
from images.reference import InvalidReferenceError, parse_reference

if TYPE_CHECKING:
    from agent.events import EventRecorder
    from agent.pod_status import ContainerRecord

log = logging.getLogger("kubelet_emu.images")

JSON = dict[str, Any]
PULL_BACKOFF_INITIAL = 10.0
PULL_BACKOFF_MAX = 300.0
ERR_TO_BACKOFF = 1.0  # how long ErrImagePull shows before the status turns to ImagePullBackOff
NEVER_PULL_RECHECK = 10.0  # an image side-loaded later is noticed this soon
IMAGE_GC_PERIOD = 300.0  # the kubelet's ImageGCPeriod


def default_pull_policy(image: str) -> str:
    """The API server's defaulting: Always for :latest or no tag, IfNotPresent otherwise."""
    if "@" in image:
        return "IfNotPresent"
    last = image.rsplit("/", 1)[-1]
    tag = last.split(":", 1)[1] if ":" in last else "latest"
    return "Always" if tag == "latest" else "IfNotPresent"


def go_duration(seconds: float) -> str:
    """A duration the way Go prints a time.Duration truncated to milliseconds ("812ms", "1.234s")."""
    ms = int(seconds * 1000)
    if ms < 1000:
        return f"{ms}ms"
    if ms < 60_000:
        return f"{ms / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    minutes, rest = divmod(ms, 60_000)
    return f"{minutes}m" + (f"{rest / 1000:.3f}".rstrip("0").rstrip(".") + "s")


def docker_config_from_secret(secret: JSON) -> JSON | None:
    """The decoded docker config of an imagePullSecret (kubernetes.io/dockerconfigjson or the
    older kubernetes.io/dockercfg), or None when the Secret holds neither."""
    data = secret.get("data") or {}
    for key, wrap in ((".dockerconfigjson", False), (".dockercfg", True)):
        if key not in data:
            continue
        try:
            parsed = json.loads(base64.b64decode(data[key]))
        except (binascii.Error, ValueError):
            return None
        return {"auths": parsed} if wrap else parsed
    return None


class PullSite(Protocol):
    """What a pull needs from the node (the Pod controller, agent/pods.py, is one)."""

    images: Any  # images.service.ImageService
    events: EventRecorder

    async def lookup(self, kind: str, namespace: str, name: str) -> JSON | None: ...


class PullingPod(Protocol):
    """The Pod a pull is for (a Pod worker, agent/pod_worker.py, is one)."""

    pod: JSON
    key: str

    def mark_dirty(self, settle: float = 0.0) -> None: ...


class ImageGate:
    """One container's way to its image. Kept per container so the back-off survives restarts."""

    __slots__ = ("backoff",)

    def __init__(self) -> None:
        self.backoff = PULL_BACKOFF_INITIAL

    async def ensure(self, site: PullSite, worker: PullingPod, spec: JSON, rec: ContainerRecord) -> Any:
        """Return the Image once present; until then the status shows why not. Never returns for
        an invalid name (the Pod stays Pending, as with the kubelet); cancelled on deletion."""
        images = site.images
        pod, name = worker.pod, spec["name"]
        image = spec.get("image") or ""
        policy = spec.get("imagePullPolicy") or default_pull_policy(image)
        events = site.events
        try:
            ref = parse_reference(image)
        except InvalidReferenceError as exc:
            msg = f"Failed to apply default image tag {json.dumps(image)}: {exc}"
            events.pod_event(pod, "Warning", "InspectFailed", msg, name)
            events.pod_event(pod, "Warning", "Failed", "Error: InvalidImageName", name)
            rec.waiting("InvalidImageName", msg)
            worker.mark_dirty()
            await asyncio.Event().wait()
            raise AssertionError("unreachable") from None

        quoted = json.dumps(image)
        present = images.present(ref)
        if present is not None and policy != "Always":
            events.pod_event(pod, "Normal", "Pulled", f"Container image {quoted} already present on machine", name)
            return present
        if policy == "Never":
            msg = f"Container image {quoted} is not present with pull policy of Never"
            events.pod_event(pod, "Warning", "ErrImageNeverPull", msg, name)
            events.pod_event(pod, "Warning", "Failed", "Error: ErrImageNeverPull", name)
            rec.waiting("ErrImageNeverPull", msg)
            worker.mark_dirty()
            while (present := images.present(ref)) is None:
                await asyncio.sleep(NEVER_PULL_RECHECK)
            return present

        credentials = await self._credentials(site, worker)
        while True:
            events.pod_event(pod, "Normal", "Pulling", f"Pulling image {quoted}", name)
            started = time.monotonic()
            try:
                pulled = await images.pull(ref, credentials)
            except PullError as exc:
                self._failed(site, worker, spec, rec, quoted, str(exc))
                await asyncio.sleep(ERR_TO_BACKOFF)
                msg = f"Back-off pulling image {quoted}"
                events.pod_event(pod, "Normal", "BackOff", msg, name)
                events.pod_event(pod, "Warning", "Failed", "Error: ImagePullBackOff", name)
                rec.waiting("ImagePullBackOff", f"{msg}: ErrImagePull: {exc}")
                worker.mark_dirty()
                await asyncio.sleep(max(0.0, self.backoff - ERR_TO_BACKOFF))
                self.backoff = min(self.backoff * 2, PULL_BACKOFF_MAX)
                continue
            took = go_duration(time.monotonic() - started)
            events.pod_event(
                pod,
                "Normal",
                "Pulled",
                f"Successfully pulled image {quoted} in {took} ({took} including waiting). "
                f"Image size: {pulled.size} bytes.",
                name,
            )
            self.backoff = PULL_BACKOFF_INITIAL
            return pulled

    @staticmethod
    def _failed(site: PullSite, worker: PullingPod, spec: JSON, rec: ContainerRecord, quoted: str, error: str) -> None:
        name = spec["name"]
        site.events.pod_event(worker.pod, "Warning", "Failed", f"Failed to pull image {quoted}: {error}", name)
        site.events.pod_event(worker.pod, "Warning", "Failed", "Error: ErrImagePull", name)
        rec.waiting("ErrImagePull", error)
        worker.mark_dirty()
        log.info("image pull failed", extra=kv(pod=worker.key, container=name, image=spec.get("image"), error=error))

    @staticmethod
    async def _credentials(site: PullSite, worker: PullingPod) -> list[Any]:
        """Credentials from the Pod's imagePullSecrets; a missing Secret is skipped, as the kubelet does."""
        found: list[Any] = []
        namespace = worker.pod["metadata"]["namespace"]
        for entry in worker.pod["spec"].get("imagePullSecrets") or []:
            secret = await site.lookup("Secret", namespace, entry.get("name", ""))
            config = docker_config_from_secret(secret) if secret else None
            if config is None:
                log.info("imagePullSecret not usable", extra=kv(pod=worker.key, secret=entry.get("name")))
                continue
            found.extend(credentials_from_dockerconfigjson(config))
        return found


def images_in_use(workers: Any) -> set[str]:
    """Image names and IDs of every Pod this node still runs: never garbage-collected."""
    in_use: set[str] = set()
    for worker in workers:
        for spec in (worker.pod["spec"].get("initContainers") or []) + worker.pod["spec"]["containers"]:
            if spec.get("image"):
                in_use.add(spec["image"])
        for rec in worker.rec.containers + worker.rec.init_containers:
            if rec.image_id:
                in_use.add(rec.image_id)
    return in_use


async def image_gc_loop(controller: Any, period: float = IMAGE_GC_PERIOD) -> None:
    """Every period: when the image filesystem is fuller than gc_high_percent, remove unused
    images, least recently used first, down to gc_low_percent."""
    while True:
        await asyncio.sleep(period)
        try:
            removed = await controller.images.garbage_collect(images_in_use(list(controller.workers.values())))
        except OSError as exc:
            log.warning("image garbage collection failed", extra=kv(error=str(exc)))
            continue
        if removed:
            log.info("images removed by garbage collection", extra=kv(count=len(removed), images=",".join(removed)))

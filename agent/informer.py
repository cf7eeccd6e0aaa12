"""List-then-watch of one kind of object, kept in a local store.

Watches resume from the last resourceVersion seen (bookmarks included);
410 Gone means the version is too old, so the informer relists and tells its
consumer about objects that vanished meanwhile. Connection trouble is
retried with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from agent.kube import ApiError, Kube, backoff_delay
from common.logfmt import kv

log = logging.getLogger(__name__)

JSON = dict[str, Any]
Handler = Callable[[JSON], None]


def object_key(obj: JSON) -> str:
    meta = obj["metadata"]
    return f"{meta.get('namespace', '')}/{meta['name']}"


class Informer:
    def __init__(
        self,
        kube: Kube,
        path: str,
        *,
        on_upsert: Handler,
        on_delete: Handler,
        field_selector: str | None = None,
        label_selector: str | None = None,
        name: str = "",
        page_size: int = 500,
        keep_objects: bool = True,
        transform: Callable[[JSON], JSON] | None = None,
    ):
        self.kube = kube
        self.path = path
        self.field_selector = field_selector
        self.label_selector = label_selector
        self.on_upsert = on_upsert
        self.on_delete = on_delete
        self.name = name or path
        self.page_size = page_size
        # Without keep_objects the store holds only names and UIDs (enough to report objects
        # that vanished during a relist): the consumer keeps the objects it needs itself.
        self.keep_objects = keep_objects
        self.transform = transform  # applied to every object as it arrives (e.g. to drop fields)
        self.store: dict[str, JSON] = {}
        self.synced = asyncio.Event()
        self.resource_version = ""
        self.relists = 0
        self.watch_restarts = 0
        self._retry = asyncio.Event()  # ends a backoff sleep: the API server answers again
        self._watch_task: asyncio.Task[None] | None = None

    def retry_now(self) -> None:
        """Someone saw the API server answer again after an outage: stop backing off, and start
        the watch afresh (from the last version seen) on a new connection, as the kubelet does:
        the one it streams on may be half dead and silent until its read timeout."""
        self._retry.set()
        if self._watch_task is not None and not self._watch_task.done():
            self._watch_task.cancel()

    def _kept(self, obj: JSON) -> JSON:
        if self.keep_objects:
            return obj
        meta = obj["metadata"]
        return {"metadata": {"name": meta["name"], "namespace": meta.get("namespace", ""), "uid": meta.get("uid")}}

    async def _list(self) -> None:
        items: list[JSON] = []
        cont: str | None = None
        while True:
            page = await self.kube.get(
                self.path,
                fieldSelector=self.field_selector,
                labelSelector=self.label_selector,
                limit=self.page_size,
                **({"continue": cont} if cont else {}),
            )
            items.extend(page.get("items") or [])
            cont = page["metadata"].get("continue")
            if not cont:
                break
        self.resource_version = page["metadata"]["resourceVersion"]
        if self.transform:
            items = [self.transform(o) for o in items]
        fresh = {object_key(o): o for o in items}
        for key in list(self.store):
            if key not in fresh:
                self.on_delete(self.store.pop(key))
        for key, obj in fresh.items():
            self.store[key] = self._kept(obj)
            self.on_upsert(obj)
        self.relists += 1
        self.synced.set()

    async def _watch(self) -> None:
        async for event in self.kube.watch(
            self.path, self.resource_version, fieldSelector=self.field_selector, labelSelector=self.label_selector
        ):
            obj = event["object"]
            if self.transform and event["type"] != "BOOKMARK":
                obj = self.transform(obj)
            rv = obj.get("metadata", {}).get("resourceVersion")
            if rv:
                self.resource_version = rv
            kind = event["type"]
            if kind == "BOOKMARK":
                continue
            key = object_key(obj)
            if kind == "DELETED":
                self.store.pop(key, None)
                self.on_delete(obj)
            else:
                self.store[key] = self._kept(obj)
                self.on_upsert(obj)

    async def run(self) -> None:
        need_list = True
        attempt = 0
        failing = ""
        while True:
            try:
                if need_list:
                    await self._list()
                    need_list = False
                self._watch_task = asyncio.create_task(self._watch(), name=f"watch:{self.name}")
                try:
                    await self._watch_task
                except asyncio.CancelledError:
                    current = asyncio.current_task()
                    if current is None or current.cancelling():
                        raise  # this informer is being stopped
                    self.watch_restarts += 1  # retry_now(): watch again at once
                    continue
                finally:
                    self._watch_task = None
                attempt = 0
                if failing:
                    log.info("watch resumed", extra=kv(watch=self.name))
                    failing = ""
            except ApiError as exc:
                self.watch_restarts += 1
                if exc.gone:
                    need_list = True  # our resourceVersion is too old: start over
                    continue
                message = exc.describe()
                if message != failing:
                    log.warning("watch failed; retrying with backoff", extra=kv(watch=self.name, error=message))
                    failing = message
                self._retry.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._retry.wait(), backoff_delay(attempt))
                attempt = 0 if self._retry.is_set() else attempt + 1

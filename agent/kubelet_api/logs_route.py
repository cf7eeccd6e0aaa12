"""GET /containerLogs/{namespace}/{pod}/{container}: `kubectl logs`, with the kubelet's answers.

Which run's log is read follows the kubelet (validateContainerLogStatus): the running container,
else the terminated one, else the last terminated one; `previous` is the last terminated one. The
file is <state>/pods/<ns>_<pod>_<uid>/<container>/<run>.log, where the run number comes from the
container ID the status reports (`...-<container>-<run>`) and otherwise from restartCount.
Names are checked before anything is read, and the file must lie inside the Pod's directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from datetime import datetime
from typing import Any

from aiohttp import web

from agent.kubelet_api.context import KubeletAPIContext
from agent.kubelet_api.logfile import LogOptions, LogReadError, read_log
from agent.kubelet_api.paths import invalid_name
from common.logfmt import kv

log = logging.getLogger(__name__)

NO_FILE_POLL = 0.5  # seconds between looks for a log file that does not exist yet


class BadQuery(Exception):
    """The query does not decode (400) or does not validate (422)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def add_routes(app: web.Application, ctx: KubeletAPIContext) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await container_logs(request, ctx)

    app.router.add_get("/containerLogs/{namespace}/{pod}/{container}", handler, allow_head=False)


def _bool(values: list[str]) -> bool:
    # apimachinery's Convert_Slice_string_To_bool: only "false" and "0" are false.
    return values[0].lower() not in ("false", "0")


INT64 = re.compile(r"[+-]?[0-9]+")


def _int(values: list[str]) -> int | None:
    """An int64 as Go's strconv.ParseInt(s, 10, 64) reads it (the kubelet's query decoding):
    an optional sign and ASCII digits only, in range; anything else is 400."""
    text = values[0]
    if text == "":
        return None
    if INT64.fullmatch(text) and -(2**63) <= (value := int(text)) < 2**63:
        return value
    raise BadQuery(400, '{"message": "Unable to decode query."}')


def parse_query(query: Any, now_ns: int | None = None) -> tuple[LogOptions, bool]:
    """(options, previous) from the query, validated as the kubelet does."""
    values = {key: query.getall(key) for key in set(query.keys())}
    if "tail" in values and values["tail"][0]:  # the old name, kept by the kubelet; "all" = no tail
        values.pop("tailLines", None)
        if values["tail"][0] != "all":
            values["tailLines"] = values["tail"]
    opts = LogOptions()
    previous = _bool(values["previous"]) if "previous" in values else False
    opts.follow = _bool(values["follow"]) if "follow" in values else False
    opts.timestamps = _bool(values["timestamps"]) if "timestamps" in values else False
    opts.tail_lines = _int(values["tailLines"]) if "tailLines" in values else None
    opts.limit_bytes = _int(values["limitBytes"]) if "limitBytes" in values else None
    since_seconds = _int(values["sinceSeconds"]) if "sinceSeconds" in values else None
    since_time: datetime | None = None
    if values.get("sinceTime", [""])[0]:
        try:
            since_time = datetime.fromisoformat(values["sinceTime"][0])
        except ValueError:
            raise BadQuery(400, '{"message": "Unable to decode query."}') from None
        if since_time.tzinfo is None:
            raise BadQuery(400, '{"message": "Unable to decode query."}')
    invalid = (
        (opts.tail_lines is not None and opts.tail_lines < 0)
        or (opts.limit_bytes is not None and opts.limit_bytes < 1)
        or (since_seconds is not None and since_time is not None)
        or (since_seconds is not None and since_seconds < 1)
    )
    if invalid:
        raise BadQuery(422, '{"message": "Invalid request."}')
    stream = values.get("stream", ["All"])[0]
    if stream != "All":  # PodLogsQuerySplitStreams is alpha and off in v1.36
        raise BadQuery(
            400,
            f'unable to return the given log stream: "{stream}". '
            "Please enable PodLogsQuerySplitStreams feature gate in kubelet",
        )
    now_ns = time.time_ns() if now_ns is None else now_ns
    if since_seconds is not None:
        opts.since_ns = now_ns - since_seconds * 1_000_000_000
    if since_time is not None:
        opts.since_ns = max(opts.since_ns, int(since_time.timestamp()) * 1_000_000_000 + since_time.microsecond * 1000)
    return opts, previous


def select_container_id(pod_name: str, status: dict[str, Any], container: str, previous: bool) -> str:
    """The container ID whose log to read; ValueError with the kubelet's message when there is none."""
    last = (status.get("lastState") or {}).get("terminated")
    state = status.get("state") or {}
    waiting, running, terminated = state.get("waiting"), state.get("running"), state.get("terminated")
    where = f'container "{container}" in pod "{pod_name}"'
    if previous:
        if not last or not last.get("containerID"):
            raise ValueError(f'previous terminated container "{container}" in pod "{pod_name}" not found')
        return last["containerID"]
    if running is not None:
        return status.get("containerID", "")
    if terminated is not None:
        if terminated.get("containerID"):
            return terminated["containerID"]
        if last and last.get("containerID"):
            return last["containerID"]
        raise ValueError(f"{where} is terminated")
    if last is not None:
        if not last.get("containerID"):
            raise ValueError(f"{where} is terminated")
        return last["containerID"]
    if waiting is not None:
        raise ValueError(f"{where} is waiting to start: {waiting.get('reason', '')}")
    raise ValueError(f"{where} is waiting to start - no logs yet")


def run_number(container_id: str, container: str, fallback: int) -> int:
    """The run (restart count) a container ID belongs to, for the <run>.log file name."""
    m = re.search(rf"-{re.escape(container)}-(\d+)$", container_id)
    return int(m[1]) if m else fallback


def log_path(pods_dir: str, pod: dict[str, Any], container: str, run: int) -> str:
    """<pods_dir>/<ns>_<pod>_<uid>/<container>/<run>.log; ValueError if that would leave the Pod's dir."""
    meta = pod["metadata"]
    pod_dir = os.path.realpath(os.path.join(pods_dir, f"{meta['namespace']}_{meta['name']}_{meta['uid']}"))
    path = os.path.realpath(os.path.join(pod_dir, container, f"{run}.log"))
    if not path.startswith(pod_dir + os.sep):
        raise ValueError(f'log of container "{container}" lies outside its pod directory')
    return path


async def container_logs(request: web.Request, ctx: KubeletAPIContext) -> web.StreamResponse:
    namespace, pod_name = request.match_info["namespace"], request.match_info["pod"]
    container = request.match_info["container"]
    problem = invalid_name(namespace, pod_name, container)
    if problem:
        return web.Response(status=400, text=problem)
    try:
        opts, previous = parse_query(request.query)
    except BadQuery as exc:
        return web.Response(status=exc.status, text=str(exc))
    worker = ctx.find_pod(namespace, pod_name)
    if worker is None:
        return web.Response(status=404, text=f'pod "{pod_name}" does not exist')
    spec = worker.pod["spec"]
    names = {c["name"] for c in (spec.get("containers") or []) + (spec.get("initContainers") or [])}
    names |= {c["name"] for c in spec.get("ephemeralContainers") or []}
    if container not in names:
        return web.Response(status=404, text=f'container "{container}" not found in pod "{pod_name}"')
    try:
        rec = worker.rec.container(container)
    except KeyError:
        return web.Response(status=400, text=f'container "{container}" in pod "{pod_name}" is not available')
    try:
        container_id = select_container_id(pod_name, rec.to_json(), container, previous)
        fallback = rec.restart_count - 1 if previous and rec.state == "running" else rec.restart_count
        run = run_number(container_id, container, fallback)
        path = log_path(str(ctx.pods_dir), worker.pod, container, run)
    except ValueError as exc:
        return web.Response(status=400, text=str(exc))

    async def still_running() -> bool:
        if request.transport is None or request.transport.is_closing():
            return False  # the client went away: drain what is there and end
        if worker.gone or ctx.find_pod(namespace, pod_name) is not worker:
            return False
        return rec.state == "running" and rec.container_id == container_id

    response = web.StreamResponse(headers={"Content-Type": "text/plain"})
    response.enable_chunked_encoding()
    await response.prepare(request)  # headers out now: a follower sees the stream open at once
    # No file yet (a container just starting) or ever (the emulated backend runs nothing, so it
    # prints nothing): an empty log, and a follower waits while the container runs.
    while not os.path.isfile(path):
        if not opts.follow or not await still_running():
            with contextlib.suppress(ConnectionResetError):
                await response.write_eof()
            return response
        await asyncio.sleep(NO_FILE_POLL)
    try:
        path = log_path(str(ctx.pods_dir), worker.pod, container, run)  # again: the directories may have changed
    except ValueError as exc:
        with contextlib.suppress(ConnectionResetError):
            await response.write(str(exc).encode())
        return response
    try:
        async for chunk in read_log(path, opts, still_running):
            if request.transport is None or request.transport.is_closing():
                break
            await response.write(chunk)
    except LogReadError as exc:
        with contextlib.suppress(ConnectionResetError):
            await response.write(str(exc).encode())
    except ConnectionResetError:
        log.debug("log client went away", extra=kv(pod=f"{namespace}/{pod_name}", container=container))
        return response
    with contextlib.suppress(ConnectionResetError):
        await response.write_eof()
    return response

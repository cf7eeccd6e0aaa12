"""GET /logs/ and /logs/{file}: the agent's own log directory, read-only (authorized as nodes/log).

The kubelet serves /var/log/ there with Go's file server (`kubectl get --raw
/api/v1/nodes/N/proxy/logs/`); here it is the agent's log directory (<state>/logs). A directory
answers with a listing of links, a file with its bytes. Nothing outside the directory is served:
".." and absolute parts are refused before the file system is touched, and a path whose real
location (symbolic links followed) lies outside is 404 like a missing file.
"""

from __future__ import annotations

import asyncio
import html
import os
import stat
from pathlib import Path
from urllib.parse import quote

from aiohttp import web

from agent import logs
from agent.kubelet_api.context import KubeletAPIContext


class Refused(Exception):
    pass


def resolve(root: Path, tail: str) -> Path:
    """The path under `root` a request names; Refused when it would leave `root`."""
    parts = [p for p in tail.split("/") if p not in ("", ".")]
    if any(p == ".." or "\x00" in p for p in parts):
        raise Refused(tail)
    base = os.path.realpath(root)
    target = os.path.realpath(os.path.join(base, *parts))
    if target != base and not target.startswith(base + os.sep):
        raise Refused(tail)
    return Path(target)


def listing(directory: Path) -> str:
    rows = []
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        name = entry.name + ("/" if entry.is_dir(follow_symlinks=False) else "")
        rows.append(f'<a href="{quote(name)}">{html.escape(name)}</a>\n')
    return '<!doctype html>\n<meta name="viewport" content="width=device-width">\n<pre>\n' + "".join(rows) + "</pre>\n"


def add_routes(app: web.Application, ctx: KubeletAPIContext) -> None:
    root = logs.log_dir(ctx.state_dir)

    async def serve(request: web.Request) -> web.StreamResponse:
        tail = request.match_info.get("tail", "")
        try:
            path = resolve(root, tail)
            info = await asyncio.to_thread(os.stat, path)
        except (Refused, OSError):
            return web.Response(status=404, text="404 page not found\n")
        if stat.S_ISDIR(info.st_mode):
            if not request.path.endswith("/"):
                raise web.HTTPMovedPermanently(request.path + "/")
            text = await asyncio.to_thread(listing, path)
            return web.Response(text=text, content_type="text/html")
        if not stat.S_ISREG(info.st_mode):
            return web.Response(status=404, text="404 page not found\n")
        return web.FileResponse(path, headers={"Content-Type": "text/plain; charset=utf-8"})

    async def bare(request: web.Request) -> web.StreamResponse:
        raise web.HTTPMovedPermanently("/logs/")

    app.router.add_get("/logs", bare)
    app.router.add_get("/logs/{tail:.*}", serve)

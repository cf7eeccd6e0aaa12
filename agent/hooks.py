"""Container lifecycle hooks (postStart, preStop) with the kubelet's semantics.

One handler run follows pkg/kubelet/lifecycle/handlers.go: exec in the container, an HTTP GET to
the Pod (redirects followed, any answer is a success: only a request that could not be made fails),
or a sleep. The result is None on success, else the kubelet's message for its log and the
container status (its events carry no message, so that no secret leaks into them).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from yarl import URL

from agent.probes import MAX_OUTPUT, http_error, http_request

JSON = dict[str, Any]
Exec = Callable[[list[str]], Awaitable[tuple[int, bytes]]]  # command -> (exit code, output)

USER_AGENT = "kube-lifecycle/1.36"


def pod_ref(pod: JSON) -> str:
    """format.Pod: name_namespace(uid)."""
    meta = pod.get("metadata") or {}
    return f"{meta.get('name', '')}_{meta.get('namespace', '')}({meta.get('uid', '')})"


def _go_list(items: list[str]) -> str:
    return "[" + " ".join(items) + "]"  # Go's %v of a []string


def _q(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # close to Go's %q


async def run_hook(handler: JSON, container: JSON, pod: JSON, pod_ip: str, exec_: Exec | None) -> str | None:
    """Run one lifecycle handler to its end; None on success, else the kubelet's failure message."""
    name, ref = container.get("name", ""), pod_ref(pod)
    if (action := handler.get("exec")) is not None:
        command = [str(a) for a in action.get("command") or []]
        output = b""
        try:
            if exec_ is None:
                raise RuntimeError("this runtime cannot exec into containers")
            code, output = await exec_(command)
            error = None if code == 0 else f"command '{' '.join(command)}' exited with {code}: "
        except asyncio.CancelledError:
            raise
        except Exception as e:
            error = str(e) or type(e).__name__
        if error is None:
            return None
        text = output[:MAX_OUTPUT].decode("utf-8", "replace")
        return (
            f"Exec lifecycle hook ({_go_list(command)}) for Container {_q(name)} in Pod {_q(ref)} failed - "
            f"error: {error}, message: {_q(text)}"
        )
    if (action := handler.get("httpGet")) is not None:
        error = await _http(action, container, pod_ip)
        if error is None:
            return None
        path = action.get("path") or ""
        return f"HTTP lifecycle hook ({path}) for Container {_q(name)} in Pod {_q(ref)} failed - error: {error}"
    if (action := handler.get("sleep")) is not None:
        await asyncio.sleep(max(0, int(action.get("seconds") or 0)))
        return None
    return f"Cannot run handler: invalid handler: {handler}"


async def _http(action: JSON, container: JSON, pod_ip: str) -> str | None:
    if action.get("port") == "":
        action = {**action, "port": 80}  # the kubelet's default for an empty named port
    try:
        url, headers, skip = http_request(action, container, pod_ip, USER_AGENT)
    except Exception as e:
        return str(e)
    connector = aiohttp.TCPConnector(ssl=False, force_close=True)
    try:
        async with (
            aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as session,
            session.get(URL(url), headers=headers, skip_auto_headers=skip, max_redirects=10) as resp,
        ):
            await resp.content.read(MAX_OUTPUT)  # the answer is read and dropped: any status will do
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as e:
        if isinstance(e, aiohttp.TooManyRedirects):
            return f'Get "{url}": stopped after 10 redirects'
        return http_error(url, e)
    return None

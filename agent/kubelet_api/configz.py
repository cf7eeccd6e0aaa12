"""GET /configz: the agent's effective configuration as JSON (authorized as nodes/configz).

As the kubelet's endpoint, the answer is one object under "kubeletconfig": the KubeletConfiguration
fields this agent has an equivalent for, then the agent's own settings under "kubeletEmu" (every
table of the config file, the handlers included, after defaults). Nothing secret is written: any
setting whose name speaks of a key (`tls_key_file`, `api_key`), token, password, secret or
credential is left out, whatever its value (a key file's path included).
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from aiohttp import web

from agent.kubelet_api.context import KubeletAPIContext

# Names of secret settings: tls_key_file, api_key, key_data, *token*, *password*, ... (not a bare
# "key", which is a taint's or a label's, and not words that merely contain it, like "monkey").
SECRET_NAME = re.compile(r"token|passw(or)?d|secret|credential|auth_?data|(^|[_-])key[_-]|[_-]key$", re.I)


def scrub(value: Any) -> Any:
    """JSON-ready data with secret-named fields left out (dataclasses, mappings, sequences)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): scrub(v) for k, v in value.items() if not SECRET_NAME.search(str(k))}
    if isinstance(value, list | tuple | set | frozenset):
        return [scrub(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def kubelet_config(ctx: KubeletAPIContext, port: int | None) -> dict[str, Any]:
    """The KubeletConfiguration fields (v1beta1 names) the agent's settings stand for."""
    cfg = ctx.config
    api, node, images = cfg.kubelet_api, cfg.node, cfg.images
    out: dict[str, Any] = {
        "kind": "KubeletConfiguration",
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "address": api.address,
        "authentication": {
            "anonymous": {"enabled": api.anonymous},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": api.client_ca_file or ""},
        },
        "authorization": {"mode": api.authorization_mode},
        "maxPods": node.max_pods,
        "podPidsLimit": node.pod_pids_limit,
        "cgroupRoot": "/" + node.cgroup_root,
        "cgroupDriver": node.cgroup_driver,
        "containerLogMaxSize": f"{node.container_log_max_size // 1024}Ki",
        "containerLogMaxFiles": node.container_log_max_files,
        "imageGCHighThresholdPercent": images.gc_high_percent,
        "imageGCLowThresholdPercent": images.gc_low_percent,
        "registerWithTaints": [scrub(t) for t in node.taints],
        "rotateCertificates": True,
        "serverTLSBootstrap": api.serving_cert == "csr",
    }
    if port is not None:
        out["port"] = port
    if api.tls_cert_file:
        out["tlsCertFile"] = api.tls_cert_file
    return out


def render(ctx: KubeletAPIContext, port: int | None) -> bytes:
    body = {"kubeletconfig": kubelet_config(ctx, port), "kubeletEmu": scrub(ctx.config)}
    return json.dumps(body, indent=None, separators=(",", ":")).encode()


def add_routes(app: web.Application, ctx: KubeletAPIContext) -> None:
    async def configz(request: web.Request) -> web.Response:
        sock = request.transport.get_extra_info("sockname") if request.transport else None
        port = sock[1] if isinstance(sock, tuple) and len(sock) >= 2 else None
        return web.Response(body=render(ctx, port), content_type="application/json")

    app.router.add_get("/configz", configz)

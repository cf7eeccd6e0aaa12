"""metrics-server for the dev cluster: `kubectl top pod` and `kubectl top node`.

    python3 -m devcluster.metrics_server        # build (or find) the pinned binary and print its path

build() installs `metrics-server` from the Go module proxy at VERSION with the local Go toolchain
(devcluster/gobuild.py, shared with bench/kwok.py) and caches it under
~/.cache/kubelet-emu/metrics-server-VERSION/.

start() runs it as a host process next to the control plane, with the client identity and the
serving certificate the dev cluster made (pki/metrics-server*.crt), and registers it as the
v1beta1.metrics.k8s.io APIService. The API server reaches it through the aggregation layer, at the
address an EndpointSlice gives: this host's own non-loopback address (the API server refuses
loopback endpoints), never a ClusterIP (no kube-proxy here: a ClusterIP is routed off the machine;
the Service is headless so that it has none). It scrapes each kubelet at the Node's InternalIP and
status port; kubelet-emu's serving certificate is self-signed unless the node was given one, so
kubelet TLS is not verified unless a CA is passed (all of this traffic stays on this host).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import socket
import time
from pathlib import Path

from devcluster import gobuild, manage

VERSION = "v0.8.0"
MODULE = "sigs.k8s.io/metrics-server"
SERVICE = "metrics-server"
NAMESPACE = "kube-system"
USER = "system:metrics-server"  # the CN of pki/metrics-server.crt (devcluster/certs.go)
RESOLUTION = "15s"  # metrics-server's default scrape interval
READY_TIMEOUT = 120.0


class MetricsServerError(manage.DevClusterError):
    pass


def cache_dir() -> Path:
    return gobuild.cache_dir("metrics-server", VERSION)


def pid_file(directory: Path) -> Path:
    return directory / "metrics-server.pid"


async def build(quiet: bool = False) -> Path:
    """The metrics-server binary at VERSION, built once with `go install` and cached."""
    return await gobuild.install("metrics-server", VERSION, f"{MODULE}/cmd/metrics-server", quiet=quiet)


def host_address() -> str:
    """This host's own non-loopback IPv4 address (the source address of its default route).
    Only a route is looked up: a UDP connect sends nothing."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.123", 9))  # a documentation address
        address = s.getsockname()[0]
        if not address.startswith("127."):
            return address
    raise MetricsServerError(
        "this host has no non-loopback IPv4 address with a route: the API server refuses loopback "
        "endpoints, so metrics-server has nowhere to be reached; bring up an interface with an address"
    )


def _free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def manifest(address: str, port: int, ca_bundle: bytes) -> str:
    """RBAC for metrics-server's identity, a headless Service without selector, an EndpointSlice
    with this host's address, and the APIService (JSON documents, one per line: valid YAML)."""
    rbac = "rbac.authorization.k8s.io"
    user = [{"kind": "User", "apiGroup": rbac, "name": USER}]
    docs: list[dict[str, object]] = [
        {
            "apiVersion": f"{rbac}/v1",
            "kind": "ClusterRole",
            "metadata": {"name": USER},
            "rules": [
                {"apiGroups": [""], "resources": ["nodes/metrics"], "verbs": ["get"]},
                {"apiGroups": [""], "resources": ["pods", "nodes"], "verbs": ["get", "list", "watch"]},
            ],
        },
        {  # lets view/edit/admin read the metrics API, as upstream's manifest does
            "apiVersion": f"{rbac}/v1",
            "kind": "ClusterRole",
            "metadata": {
                "name": "system:aggregated-metrics-reader",
                "labels": {
                    f"{rbac}/aggregate-to-view": "true",
                    f"{rbac}/aggregate-to-edit": "true",
                    f"{rbac}/aggregate-to-admin": "true",
                },
            },
            "rules": [
                {"apiGroups": ["metrics.k8s.io"], "resources": ["pods", "nodes"], "verbs": ["get", "list", "watch"]}
            ],
        },
        {
            "apiVersion": f"{rbac}/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": USER},
            "roleRef": {"apiGroup": rbac, "kind": "ClusterRole", "name": USER},
            "subjects": user,
        },
        {  # TokenReviews and SubjectAccessReviews for the requests it serves
            "apiVersion": f"{rbac}/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "metrics-server:system:auth-delegator"},
            "roleRef": {"apiGroup": rbac, "kind": "ClusterRole", "name": "system:auth-delegator"},
            "subjects": user,
        },
        {  # the front-proxy CA and header names, from kube-system/extension-apiserver-authentication
            "apiVersion": f"{rbac}/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "metrics-server-auth-reader", "namespace": NAMESPACE},
            "roleRef": {"apiGroup": rbac, "kind": "Role", "name": "extension-apiserver-authentication-reader"},
            "subjects": user,
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": SERVICE, "namespace": NAMESPACE},
            # Headless and without selector: no ClusterIP to route anywhere, endpoints from the slice.
            "spec": {"clusterIP": "None", "ports": [{"name": "https", "port": 443, "protocol": "TCP"}]},
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": f"{SERVICE}-host",
                "namespace": NAMESPACE,
                "labels": {
                    "kubernetes.io/service-name": SERVICE,
                    "endpointslice.kubernetes.io/managed-by": "dev-cluster.kubelet-emu",
                },
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": [address], "conditions": {"ready": True}}],
            "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
        },
        {
            "apiVersion": "apiregistration.k8s.io/v1",
            "kind": "APIService",
            "metadata": {"name": "v1beta1.metrics.k8s.io"},
            "spec": {
                "group": "metrics.k8s.io",
                "version": "v1beta1",
                "service": {"namespace": NAMESPACE, "name": SERVICE, "port": 443},
                "caBundle": base64.b64encode(ca_bundle).decode(),
                "groupPriorityMinimum": 100,
                "versionPriority": 100,
            },
        },
    ]
    return "---\n".join(json.dumps(d) + "\n" for d in docs)


def args(cluster: manage.Cluster, address: str, port: int, kubelet_ca: Path | None) -> list[str]:
    pki = cluster.dir / "pki"
    kubeconfig = str(cluster.dir / "metrics-server.kubeconfig")
    kubelet_tls = [f"--kubelet-certificate-authority={kubelet_ca}"] if kubelet_ca else ["--kubelet-insecure-tls"]
    return [
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        f"--bind-address={address}",
        f"--secure-port={port}",
        f"--tls-cert-file={pki / 'metrics-server-serving.crt'}",
        f"--tls-private-key-file={pki / 'metrics-server-serving.key'}",
        f"--cert-dir={cluster.dir / 'metrics-server-certs'}",
        # InternalIP only: a Hostname would be looked up in DNS, which may leave the machine.
        "--kubelet-preferred-address-types=InternalIP",
        "--kubelet-use-node-status-port",
        f"--metric-resolution={RESOLUTION}",
        *kubelet_tls,
    ]


def running(directory: Path) -> int | None:
    try:
        pid = int(pid_file(directory).read_text())
    except (OSError, ValueError):
        return None
    return pid if manage._pid_alive(pid) else None


async def _kubectl(cluster: manage.Cluster, *kargs: str, stdin: bytes | None = None) -> str:
    argv, env = manage.kubectl_argv(cluster, list(kargs))
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate(stdin)
    if proc.returncode != 0:
        raise MetricsServerError(f"kubectl {' '.join(kargs)}: {err.decode(errors='replace').strip()}")
    return out.decode()


async def start(cluster: manage.Cluster, kubelet_ca: Path | None = None, wait: bool = True) -> int:
    """Start metrics-server for `cluster` (or keep the one running) and register it; returns its pid.
    `wait`: until the APIService is Available."""
    pid = running(cluster.dir)
    if pid is None:
        binary = await build()
        address = host_address()
        port = _free_port(address)
        # Its RBAC first: it reads the front-proxy CA from kube-system at start and panics without it.
        await _kubectl(
            cluster, "apply", "-f", "-", stdin=manifest(address, port, cluster.ca_cert.read_bytes()).encode()
        )
        log_path = cluster.dir / "metrics-server.log"
        with open(log_path, "ab") as log:
            proc = await asyncio.create_subprocess_exec(
                str(binary), *args(cluster, address, port, kubelet_ca),
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,  # outlives this command; `dev-cluster down` stops it
            )  # fmt: skip
        pid = proc.pid
        pid_file(cluster.dir).write_text(str(pid))
        await _kubectl(
            cluster, "apply", "-f", "-", stdin=manifest(address, port, cluster.ca_cert.read_bytes()).encode()
        )
    if wait:
        await wait_available(cluster)
    return pid


async def wait_available(cluster: manage.Cluster, timeout: float = READY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if running(cluster.dir) is None:
            tail = (cluster.dir / "metrics-server.log").read_text(errors="replace").splitlines()[-10:]
            raise MetricsServerError("metrics-server exited; last lines of its log:\n" + "\n".join(tail))
        with contextlib.suppress(MetricsServerError):
            raw = await _kubectl(cluster, "get", "apiservice", "v1beta1.metrics.k8s.io", "-o", "json")
            for cond in json.loads(raw).get("status", {}).get("conditions", []):
                if cond.get("type") == "Available":
                    if cond.get("status") == "True":
                        return
                    last = f"{cond.get('reason')}: {cond.get('message')}"
        await asyncio.sleep(1)
    raise MetricsServerError(
        f"APIService v1beta1.metrics.k8s.io not Available after {timeout:.0f}s ({last or 'no condition'}); "
        f"see {cluster.dir / 'metrics-server.log'}"
    )


async def stop(directory: Path, timeout: float = 10.0) -> bool:
    """Stop the metrics-server started for the cluster in `directory`. Returns whether one ran."""
    pid = running(directory)
    pid_file(directory).unlink(missing_ok=True)
    if pid is None:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while manage._pid_alive(pid) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    if manage._pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    return True


if __name__ == "__main__":
    print(asyncio.run(build()))

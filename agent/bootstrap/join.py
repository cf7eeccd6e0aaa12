"""`kubelet-emu join https://SERVER:PORT --token ID.SECRET --discovery-token-ca-cert-hash sha256:HASH`:
kubeadm's token discovery, then the agent's TLS bootstrap.

1. cluster-info is read anonymously from kube-public, over TLS that does not verify yet (the CA is
   what is being discovered); nothing secret is sent.
2. Its kubeconfig must carry the bootstrapsigner's detached JWS for the token ID
   (`jws-kubeconfig-<id>`, HS256 keyed with the token secret): only someone holding the token
   could have signed it.
3. The CA in it must have the expected public-key hash (sha256 of its DER SubjectPublicKeyInfo).
4. cluster-info is read again, now verifying the server against that CA, and must be the same.

Any mismatch stops the join with one line naming the cause, before the token is sent anywhere.
Then the bootstrap kubeconfig (server, CA, token) is written with mode 0600, and the agent runs
with --bootstrap-kubeconfig: it requests its client certificate through a CSR (client.py).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import logging
import re
import ssl
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from agent.bootstrap import certinfo
from common.logfmt import kv

log = logging.getLogger("agent.bootstrap")

TOKEN = re.compile(r"^([a-z0-9]{6})\.([a-z0-9]{16})$")
CA_HASH = re.compile(r"^sha256:([0-9a-f]{64})$")
CLUSTER_INFO = "/api/v1/namespaces/kube-public/configmaps/cluster-info"
TIMEOUT = 15.0


class JoinError(Exception):
    """One line: why the join is refused."""


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def detached_jws(content: str, token_id: str, secret: str) -> str:
    """What the bootstrapsigner writes (for tests): header..signature, the payload left out."""
    header = _b64url(json.dumps({"alg": "HS256", "kid": token_id}, separators=(",", ":")).encode())
    signing_input = f"{header}.{_b64url(content.encode())}".encode()
    return f"{header}..{_b64url(hmac.new(secret.encode(), signing_input, hashlib.sha256).digest())}"


def verify_detached_jws(jws: str, content: str, token_id: str, secret: str) -> bool:
    parts = jws.split(".")
    if len(parts) != 3 or parts[1]:
        return False
    try:
        header = json.loads(_b64url_decode(parts[0]))
        signature = _b64url_decode(parts[2])
    except (ValueError, TypeError):
        return False
    if not isinstance(header, dict) or header.get("alg") != "HS256" or header.get("kid", token_id) != token_id:
        return False
    signing_input = f"{parts[0]}.{_b64url(content.encode())}".encode()
    return hmac.compare_digest(hmac.new(secret.encode(), signing_input, hashlib.sha256).digest(), signature)


async def _fetch_cluster_info(server: str, context: ssl.SSLContext) -> dict[str, Any]:
    url = server.rstrip("/") + CLUSTER_INFO
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session,
            session.get(url, ssl=context, headers={"Accept": "application/json"}) as resp,
        ):
            body = await resp.read()
            if resp.status in (401, 403):
                raise JoinError(
                    f"{server} does not let anonymous clients read kube-public/cluster-info ({resp.status}): "
                    "the cluster publishes no cluster-info for token discovery (kubeadm init does)"
                )
            if resp.status == 404:
                raise JoinError(f"{server} has no ConfigMap kube-public/cluster-info (kubeadm init makes it)")
            if resp.status >= 300:
                raise JoinError(f"reading cluster-info from {server}: {resp.status} {resp.reason}")
            return json.loads(body)
    except aiohttp.ClientConnectorCertificateError as exc:
        raise JoinError(f"{server} does not present a certificate of the pinned cluster CA: {exc}") from exc
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        detail = exc.os_error if isinstance(exc, aiohttp.ClientConnectorError) else exc
        raise JoinError(f"cannot reach {server}: {detail or type(exc).__name__}") from exc
    except ValueError as exc:
        raise JoinError(f"{server} answered something other than a ConfigMap for cluster-info") from exc


async def discover(
    server: str, token: str, ca_hashes: list[str], skip_ca_verification: bool = False
) -> tuple[str, bytes]:
    """(server, CA PEM) from the verified cluster-info; raises JoinError."""
    m = TOKEN.match(token)
    if not m:
        raise JoinError("the token must look like abcdef.0123456789abcdef ([a-z0-9]{6}.[a-z0-9]{16})")
    token_id, secret = m.groups()
    for h in ca_hashes:
        if not CA_HASH.match(h):
            raise JoinError(f"--discovery-token-ca-cert-hash {h!r} is not sha256:<64 hex digits>")
    if not ca_hashes and not skip_ca_verification:
        raise JoinError(
            "give --discovery-token-ca-cert-hash sha256:... (the join command printed on the control plane "
            "has it), or --discovery-token-unsafe-skip-ca-verification"
        )
    if not server.startswith("https://"):
        server = "https://" + server
    insecure = ssl.create_default_context()
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE  # the CA is not known yet; what is read is verified below
    cm = await _fetch_cluster_info(server, insecure)
    data = cm.get("data") or {}
    content = data.get("kubeconfig")
    if not isinstance(content, str):
        raise JoinError(f"cluster-info at {server} has no kubeconfig")
    signature = data.get(f"jws-kubeconfig-{token_id}")
    if not signature:
        raise JoinError(
            f"cluster-info at {server} carries no signature for token ID {token_id!r}: the token does not exist "
            "in this cluster or has expired (make a new one on the control plane: "
            "kubeadm token create --print-join-command)"
        )
    if not verify_detached_jws(signature, content, token_id, secret):
        raise JoinError(
            f"the cluster-info signature for token ID {token_id!r} does not verify with this token's secret: the "
            "token belongs to a different cluster, is mistyped, or someone altered cluster-info"
        )
    cluster_server, ca_pem = _cluster_of(content, server)
    try:
        actual = certinfo.first_certificate(ca_pem).spki_sha256
    except certinfo.CertError as exc:
        raise JoinError(f"the CA certificate in cluster-info at {server} cannot be read: {exc}") from exc
    if ca_hashes and actual not in ca_hashes:
        raise JoinError(
            f"the cluster CA's public key hash is {actual}, not {' or '.join(ca_hashes)}: this is not the cluster "
            "the join command was made for (or someone is in between); refusing to join"
        )
    pinned = ssl.create_default_context(cadata=ca_pem.decode())
    again = await _fetch_cluster_info(cluster_server, pinned)
    if (again.get("data") or {}).get("kubeconfig") != content:
        raise JoinError(f"cluster-info read from {cluster_server} with the pinned CA differs from the signed one")
    await _check_token(cluster_server, pinned, token, token_id)
    return cluster_server, ca_pem


async def _check_token(server: str, pinned: ssl.SSLContext, token: str, token_id: str) -> None:
    """The token goes out only now, to the verified server: does it still authenticate (not expired)?"""
    url = server + "/apis/authentication.k8s.io/v1/selfsubjectreviews"
    body = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session,
            session.post(url, json=body, ssl=pinned, headers=headers) as resp,
        ):
            if resp.status == 401:
                raise JoinError(
                    f"{server} rejects bootstrap token {token_id!r} (401 Unauthorized): it has expired or was "
                    "deleted (make a new one on the control plane: kubeadm token create --print-join-command)"
                )
    except (aiohttp.ClientError, TimeoutError, OSError):
        pass  # not decisive: the TLS bootstrap reports what goes wrong


def _cluster_of(content: str, server: str) -> tuple[str, bytes]:
    try:
        doc = yaml.safe_load(content)
        cluster = doc["clusters"][0]["cluster"]
        ca_pem = base64.b64decode(cluster["certificate-authority-data"])
        cluster_server = str(cluster.get("server") or server).rstrip("/")
    except (yaml.YAMLError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise JoinError(f"the kubeconfig in cluster-info at {server} names no cluster with a CA: {exc}") from exc
    return cluster_server, ca_pem


def write_bootstrap_kubeconfig(path: Path, server: str, ca_pem: bytes, token: str) -> None:
    from agent.bootstrap.csr_client import _write_private

    user, cluster = "tls-bootstrap-token-user", "kubernetes"
    ca = base64.b64encode(ca_pem).decode()
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": cluster, "cluster": {"server": server, "certificate-authority-data": ca}}],
        "contexts": [{"name": f"{user}@{cluster}", "context": {"cluster": cluster, "user": user}}],
        "current-context": f"{user}@{cluster}",
        "users": [{"name": user, "user": {"token": token}}],
    }
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_private(path, yaml.safe_dump(doc, sort_keys=False).encode())


def add_join_parser(sub: Any, default_state_dir: str) -> None:
    j = sub.add_parser(
        "join",
        help="join a cluster with a bootstrap token, as `kubeadm join` (the agent then runs as the node)",
        description="Verify the cluster with the token and the CA hash, write the bootstrap kubeconfig, then run the "
        "agent, which gets its client certificate through a CSR. The arguments are those "
        "`kubeadm token create --print-join-command` prints.",
    )
    j.add_argument("server", help="API server, https://HOST:PORT")
    j.add_argument("--token", required=True, help="bootstrap token ID.SECRET")
    j.add_argument("--discovery-token-ca-cert-hash", dest="ca_hashes", action="append", default=[],
                   metavar="sha256:HASH", help="the cluster CA's public key hash (repeatable)")  # fmt: skip
    j.add_argument("--discovery-token-unsafe-skip-ca-verification", dest="skip_ca", action="store_true",
                   help="trust cluster-info's CA without a hash (the token signature is still checked)")  # fmt: skip
    j.add_argument("--write-only", action="store_true",
                   help="only write the bootstrap kubeconfig (for a service running `kubelet-emu run`)")  # fmt: skip
    j.add_argument("--state-dir", default=default_state_dir, help="where the agent keeps its state")
    j.add_argument(
        "--bootstrap-kubeconfig", default=None, help="where to write it (default: STATE_DIR/bootstrap-kubeconfig)"
    )
    j.add_argument("--kubeconfig", default=None, help="the node kubeconfig to make (default: STATE_DIR/kubeconfig)")
    j.add_argument("--node-name", default=None, help="Node name (default: hostname)")
    j.add_argument("--config", help="agent configuration (TOML)")
    j.add_argument("--node-ip", help="InternalIP to advertise")
    j.add_argument("--port", type=int, default=None, help="kubelet API port")
    j.add_argument("-v", "--verbose", action="count", default=0)


def discover_and_write(args: argparse.Namespace) -> bool:
    """Discovery and the bootstrap kubeconfig; fills in the run arguments. True: go on running the agent."""
    import socket

    from agent import logs

    logs.setup(args.verbose)
    state = Path(args.state_dir)
    args.bootstrap_kubeconfig = args.bootstrap_kubeconfig or str(state / "bootstrap-kubeconfig")
    args.kubeconfig = args.kubeconfig or str(state / "kubeconfig")
    args.node_name = args.node_name or socket.gethostname().lower()
    started = time.monotonic()
    server, ca_pem = asyncio.run(discover(args.server, args.token, args.ca_hashes, args.skip_ca))
    write_bootstrap_kubeconfig(Path(args.bootstrap_kubeconfig), server, ca_pem, args.token)
    log.info(
        "cluster-info verified (token signature and CA public key hash); bootstrap kubeconfig written",
        extra=kv(server=server, ca_hash=certinfo.first_certificate(ca_pem).spki_sha256,
                 bootstrap_kubeconfig=args.bootstrap_kubeconfig, seconds=f"{time.monotonic() - started:.2f}"),
    )  # fmt: skip
    if args.write_only:
        print(
            f"kubelet-emu run --bootstrap-kubeconfig {args.bootstrap_kubeconfig} --kubeconfig {args.kubeconfig} "
            f"--state-dir {args.state_dir} --node-name {args.node_name}"
        )
        return False
    return True

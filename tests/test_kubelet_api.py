"""Issue 6: the kubelet HTTPS API, reached by real kubectl through the real API server, and directly.

One agent (process backend, `[kubelet_api] port = 0`) serves every test of this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import math
import os
import re
import signal
import socket
import ssl
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yarl
from conftest import (
    AgentProcess,
    Kubectl,
    agent_argv,
    agent_env,
    delete_node,
    eventually,
    remove_node_network,
    wait_node_ready,
)

from cgroups.manager import CgroupManager, detect_mode
from devcluster import manage

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(os.geteuid() != 0, reason="the process backend needs root for pod cgroups"),
]

CGROUP_ROOT = f"kubelet-emu-test-api-{uuid.uuid4().hex[:6]}"
CONFIG = f"""
default_runtime = "procs"
[node]
cgroup_root = "{CGROUP_ROOT}"
[runtimes.procs]
backend = "process"
[runtimes.fake]
backend = "emulated"
[network]
enabled = false  # Pods on the host network: these tests are about the kubelet API
[kubelet_api]
port = 0
"""
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z ")


def routable_ip() -> str | None:
    """A global unicast address of this host: the API server refuses to proxy to a node whose
    address is loopback (nodes/proxy checks isProxyableHostname), so the node advertises this one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("8.8.8.8", 9))  # no packet is sent: this only picks the outgoing address
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ipaddress.ip_address(ip).is_loopback else ip


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


class Node:
    def __init__(self, name: str, agent: AgentProcess, port: int, state: Path):
        self.name, self.agent, self.port, self.state = name, agent, port, state

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
async def node(
    cluster: manage.Cluster, kubectl: Kubectl, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Node]:
    name = unique("emu-api")
    tmp = tmp_path_factory.mktemp("kubelet-api")
    config, log_path, state = tmp / "agent.toml", tmp / "agent.log", tmp / "state"
    config.write_text(CONFIG)
    kubeconfig = await manage.node_kubeconfig(cluster.dir, name)
    args = [*agent_argv(), "run", "--kubeconfig", str(kubeconfig), "--node-name", name]
    args += ["--state-dir", str(state), "--config", str(config)]
    ip = routable_ip()
    if ip:
        args += ["--node-ip", ip]
    with open(log_path, "wb") as log:
        proc = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, env=agent_env()
        )
    agent: AgentProcess | None = None
    try:
        agent = AgentProcess(proc, log_path, name, config, state)
        obj = await wait_node_ready(kubectl, name, timeout=30)
        port = obj["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"]
        yield Node(name, agent, port, state)
    finally:
        await kubectl.run(
            "delete", "pods", "--field-selector", f"spec.nodeName={name}", "--grace-period=1",
            "--wait=true", "--timeout=60s", check=False,
        )  # fmt: skip
        if agent is not None:
            await agent.stop()
        elif proc.returncode is None:  # never leave the agent running, whatever failed above
            proc.terminate()
            await proc.wait()
        await remove_node_network(state, name)
        await delete_node(kubectl, name)
        CgroupManager(detect_mode(), root=CGROUP_ROOT).remove(CGROUP_ROOT, kill=True)


def pod_yaml(
    name: str, node: str, command: str, restart: str = "Always", container: str = "main", uid: int = 65534
) -> str:
    return f"""
apiVersion: v1
kind: Pod
metadata: {{name: {name}}}
spec:
  nodeName: {node}
  restartPolicy: {restart}
  terminationGracePeriodSeconds: 1
  securityContext: {{runAsUser: {uid}}}
  containers:
  - name: {container}
    image: busybox
    command: ["sh", "-c", {json.dumps(command)}]
"""


async def running_pod(kubectl: Kubectl, name: str) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        obj = await kubectl.get("pod", name)
        return obj if obj and obj["status"].get("phase") == "Running" else None

    return await eventually(check, 20, what=f"{name} Running")


async def logs_contain(kubectl: Kubectl, name: str, text: str) -> str:
    async def check() -> str | None:
        code, out, _ = await kubectl.run("logs", name, check=False)
        return out if code == 0 and text in out else None

    return await eventually(check, 15, what=f"{text!r} in the logs of {name}")


def client_ssl(cluster: manage.Cluster, cert: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the agent's certificate is self-signed; the API server does not check it either
    if cert:
        pki = cluster.dir / "pki"
        ctx.load_cert_chain(str(pki / f"{cert}.crt"), str(pki / f"{cert}.key"))
    return ctx


async def direct(
    cluster: manage.Cluster, node: Node, path: str, *, cert: str | None = None, token: str | None = None
) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    connector = aiohttp.TCPConnector(ssl=client_ssl(cluster, cert))
    async with aiohttp.ClientSession(connector=connector) as session:
        url = yarl.URL(node.url + path, encoded=True)  # keep %2f and .. exactly as written
        async with session.get(url, headers=headers) as resp:
            return resp.status, await resp.text()


# --- the node and the simple endpoints ------------------------------------------------------------


async def test_node_advertises_the_bound_port_and_health(cluster, kubectl, node):
    assert 0 < node.port < 65536 and node.port != 10250
    assert "kubelet API serving" in node.agent.log
    if routable_ip() is None:
        pytest.skip("this host has no global unicast address: the API server will not proxy to a loopback node")
    assert (await kubectl("get", "--raw", f"/api/v1/nodes/{node.name}/proxy/healthz")).strip() == "ok"
    assert (await kubectl("get", "--raw", f"/api/v1/nodes/{node.name}/proxy/healthz/ping")).strip() == "ok"
    cert_key = node.state / "pki" / "kubelet.key"
    assert cert_key.stat().st_mode & 0o077 == 0


async def test_pods_and_running_pods_through_the_api_server(kubectl, node):
    if routable_ip() is None:
        pytest.skip("this host has no global unicast address: the API server will not proxy to a loopback node")
    name = unique("p-list")
    await kubectl.apply(pod_yaml(name, node.name, "exec sleep 3600"))
    obj = await running_pod(kubectl, name)
    pods = json.loads(await kubectl("get", "--raw", f"/api/v1/nodes/{node.name}/proxy/pods"))
    assert pods["kind"] == "PodList"
    mine = [p for p in pods["items"] if p["metadata"]["name"] == name]
    assert len(mine) == 1 and mine[0]["metadata"]["uid"] == obj["metadata"]["uid"]
    assert mine[0]["status"]["phase"] == "Running"
    assert mine[0]["status"]["containerStatuses"][0]["state"].get("running") is not None
    running = json.loads(await kubectl("get", "--raw", f"/api/v1/nodes/{node.name}/proxy/runningpods/"))
    entry = [p for p in running["items"] if p["metadata"]["name"] == name]
    assert entry and entry[0]["spec"]["containers"] == [{"name": "main", "image": "busybox", "resources": {}}]
    await kubectl("delete", "pod", name, "--wait=false")


# --- kubectl logs ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def chatty(kubectl: Kubectl, node: Node) -> str:
    """Prints early lines, waits, prints late lines, then sleeps."""
    name = unique("p-logs")
    command = "echo early-1; echo early-2; echo oops >&2; sleep 6; echo late-1; echo late-2; exec sleep 3600"
    await kubectl.apply(pod_yaml(name, node.name, command))
    await running_pod(kubectl, name)
    await logs_contain(kubectl, name, "late-2")
    return name


async def test_logs_all_tail_timestamps_and_limit(kubectl, chatty):
    out = await kubectl("logs", chatty)
    assert out == "early-1\nearly-2\noops\nlate-1\nlate-2\n"
    assert await kubectl("logs", chatty, "--tail=2") == "late-1\nlate-2\n"
    assert await kubectl("logs", chatty, "--tail=0") == ""
    stamped = (await kubectl("logs", chatty, "--timestamps")).splitlines()
    assert len(stamped) == 5 and all(STAMP.match(line) for line in stamped), stamped
    assert [line.split(" ", 1)[1] for line in stamped] == out.splitlines()
    assert await kubectl("logs", chatty, "--limit-bytes=10") == "early-1\nea"


async def test_logs_since_time_and_since(kubectl, chatty):
    stamped = (await kubectl("logs", chatty, "--timestamps")).splitlines()
    late = datetime.fromisoformat(stamped[3].split(" ", 1)[0][:26] + "+00:00")  # microseconds are enough here
    early = datetime.fromisoformat(stamped[2].split(" ", 1)[0][:26] + "+00:00")
    assert (late - early).total_seconds() >= 5
    since_time = late.replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")  # kubectl sends whole seconds
    assert await kubectl("logs", chatty, f"--since-time={since_time}") == "late-1\nlate-2\n"
    # --since=S keeps what is newer than now - S: between the late lines and the early ones.
    seconds = math.floor(time.time() - late.timestamp()) + 3
    assert await kubectl("logs", chatty, f"--since={seconds}s") == "late-1\nlate-2\n"
    assert await kubectl("logs", chatty, "--since=1h") == "early-1\nearly-2\noops\nlate-1\nlate-2\n"


async def test_logs_follow_streams_and_ends_when_the_container_exits(cluster, kubectl, node):
    name = unique("p-follow")
    command = "echo first; sleep 4; echo second; sleep 2; echo third; exit 0"
    await kubectl.apply(pod_yaml(name, node.name, command, restart="Never"))
    await running_pod(kubectl, name)
    await logs_contain(kubectl, name, "first")
    argv, env = manage.kubectl_argv(cluster, ["logs", "-f", name])
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(*argv, env=env, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    arrivals: list[tuple[str, float]] = []
    async with asyncio.timeout(30):
        async for line in proc.stdout:
            arrivals.append((line.decode().rstrip("\n"), time.monotonic() - started))
        code = await proc.wait()
    assert code == 0
    assert [text for text, _ in arrivals] == ["first", "second", "third"]
    # "second" came while following (seconds after "first"), not all at once at the end.
    assert arrivals[1][1] - arrivals[0][1] > 1.0, arrivals
    ended = time.monotonic() - started
    assert ended < 15, f"the stream should end soon after the container exits, took {ended:.1f}s"


async def test_logs_previous_after_a_restart(kubectl, node, tmp_path):
    name = unique("p-restart")
    marker = tmp_path / "ran-once"
    command = f"if [ -e {marker} ]; then echo second-run; exec sleep 3600; fi; touch {marker}; echo first-run; exit 3"
    # Root: the marker lives in the test's own directory, which only root can enter.
    await kubectl.apply(pod_yaml(name, node.name, command, uid=0))

    async def restarted() -> dict[str, Any] | None:
        obj = await kubectl.get("pod", name)
        statuses = (obj or {}).get("status", {}).get("containerStatuses") or []
        ok = statuses and statuses[0].get("restartCount", 0) >= 1 and "running" in statuses[0]["state"]
        return obj if ok else None

    await eventually(restarted, 30, what=f"{name} restarted and running")
    await logs_contain(kubectl, name, "second-run")
    assert await kubectl("logs", name) == "second-run\n"
    assert await kubectl("logs", name, "--previous") == "first-run\n"


async def test_logs_previous_without_a_restart_is_the_kubelets_error(kubectl, chatty):
    code, _, err = await kubectl.run("logs", chatty, "--previous", check=False)
    assert code != 0
    assert f'previous terminated container "main" in pod "{chatty}" not found' in err


# --- security -------------------------------------------------------------------------------------


async def test_no_credentials_is_401(cluster, node, chatty):
    for path in ("/healthz", "/pods", f"/containerLogs/default/{chatty}/main"):
        status, body = await direct(cluster, node, path)
        assert (status, body) == (401, "Unauthorized"), path


async def test_api_server_client_certificate_is_allowed(cluster, node, chatty):
    status, body = await direct(
        cluster, node, f"/containerLogs/default/{chatty}/main?tailLines=1", cert="apiserver-kubelet-client"
    )
    assert (status, body) == (200, "late-2\n")


async def test_service_account_tokens_need_rbac_on_nodes_proxy(cluster, kubectl, node, chatty):
    reader, nobody = unique("sa-reader"), unique("sa-nobody")
    await kubectl("create", "serviceaccount", reader)
    await kubectl("create", "serviceaccount", nobody)
    role = unique("node-proxy")
    await kubectl("create", "clusterrole", role, "--verb=get", "--resource=nodes/proxy")
    await kubectl("create", "clusterrolebinding", role, f"--clusterrole={role}", f"--serviceaccount=default:{reader}")
    try:
        token_reader = (await kubectl("create", "token", reader)).strip()
        token_nobody = (await kubectl("create", "token", nobody)).strip()
        path = f"/containerLogs/default/{chatty}/main?tailLines=1"
        status, body = await direct(cluster, node, path, token=token_nobody)
        assert status == 403
        assert body.startswith(f"Forbidden (user=system:serviceaccount:default:{nobody}, verb=get, resource=nodes")
        assert "subresource(s)=[proxy]" in body

        async def allowed() -> tuple[int, str] | None:  # RBAC takes a moment to reach the authorizer cache
            answer = await direct(cluster, node, path, token=token_reader)
            return answer if answer[0] == 200 else None

        assert await eventually(allowed, 10) == (200, "late-2\n")
        assert (await direct(cluster, node, "/pods", token=token_nobody))[0] == 403
        assert (await direct(cluster, node, "/pods", token="not-a-token"))[0] == 401
    finally:
        await kubectl.run("delete", "clusterrolebinding,clusterrole", role, check=False)


@pytest.mark.parametrize(
    ("path", "statuses"),
    [
        ("/containerLogs/default/x/..%2f..%2fetc", {400, 404}),
        ("/containerLogs/default/..%2f..%2f..%2fetc/passwd", {400, 404}),
        ("/containerLogs/default/a..b/main", {400}),
        ("/containerLogs/..%2f..%2f/x/main", {400, 404}),
        ("/containerLogs/default/x/../../../etc/passwd", {400, 404}),
        ("/containerLogs/default/x/%2e%2e", {400}),
    ],
)
async def test_path_traversal_is_refused(cluster, node, path, statuses):
    status, body = await direct(cluster, node, path, cert="apiserver-kubelet-client")
    assert status in statuses, (status, body)
    assert "root:" not in body


async def test_unknown_pod_and_container_are_404(cluster, node, chatty):
    status, body = await direct(cluster, node, f"/containerLogs/default/{chatty}/nope", cert="apiserver-kubelet-client")
    assert (status, body) == (404, f'container "nope" not found in pod "{chatty}"')
    status, body = await direct(
        cluster, node, "/containerLogs/default/no-such-pod/main", cert="apiserver-kubelet-client"
    )
    assert (status, body) == (404, 'pod "no-such-pod" does not exist')


async def test_client_certificate_from_an_unknown_ca_gets_nothing(cluster, node, chatty, tmp_path):
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "mallory"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:masters"),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256())
    )  # fmt: skip
    (tmp_path / "m.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "m.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    ctx = client_ssl(cluster, None)
    ctx.load_cert_chain(str(tmp_path / "m.crt"), str(tmp_path / "m.key"))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session:
        try:
            async with session.get(f"{node.url}/containerLogs/default/{chatty}/main") as resp:
                status, body = resp.status, await resp.text()
        except (aiohttp.ClientError, ssl.SSLError, ConnectionError):
            return  # the TLS handshake refused the certificate
    assert status == 401 and "late" not in body


def open_log_files(pid: int, needle: str) -> list[str]:
    out = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if needle in target and target.endswith(".log"):
            out.append(target)
    return out


async def test_follow_stops_reading_when_the_client_goes_away(cluster, node, chatty):
    """The agent closes the log file soon after a following client hangs up."""
    ctx = client_ssl(cluster, "apiserver-kubelet-client")
    pid = node.agent.proc.pid
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session:
        resp = await session.get(f"{node.url}/containerLogs/default/{chatty}/main?follow=true")
        assert resp.status == 200
        assert (await resp.content.readline()) == b"early-1\n"
        assert open_log_files(pid, chatty), "the follower should hold the log file open"
        resp.close()  # hang up mid-stream
    closed = await eventually(lambda: asyncio.sleep(0, not open_log_files(pid, chatty)), 5, 0.2, "log file closed")
    assert closed


async def served_certificate(port: int, ca: Path | None = None, name: str = "127.0.0.1") -> Any:
    """The certificate the agent serves; with `ca`, the TLS handshake must verify against it for `name`
    (an address the node advertises)."""
    from cryptography import x509

    if ca is None:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    else:
        ctx = ssl.create_default_context(cafile=str(ca))
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=name)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    return x509.load_der_x509_certificate(der)


async def test_serving_certificate_from_a_csr_after_approval(cluster, kubectl, start_agent, tmp_path):
    from cryptography.x509.oid import NameOID

    name = unique("emu-csr")
    config = '[network]\nenabled = false\n[kubelet_api]\nport = 0\nserving_cert = "csr"\n'
    state = tmp_path / "csr-state"
    agent = await start_agent(name, config, state_dir=state)
    obj = await wait_node_ready(kubectl, name, timeout=30)
    port = obj["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"]
    # The address the API server reaches the node at: the issued certificate must be valid for it.
    internal = next(a["address"] for a in obj["status"]["addresses"] if a["type"] == "InternalIP")

    async def pending_csrs() -> list[dict[str, Any]]:
        items = (await kubectl.json("get", "csr"))["items"]
        return [
            c
            for c in items
            if c["spec"]["username"] == f"system:node:{name}"
            and c["spec"]["signerName"] == "kubernetes.io/kubelet-serving"
        ]

    csrs = await eventually(pending_csrs, 20, what="a kubelet-serving CSR from the node")
    try:
        assert len(csrs) == 1
        before = await served_certificate(port)
        assert before.issuer == before.subject  # self-signed while the request waits
        assert "kubectl certificate approve " + csrs[0]["metadata"]["name"] in agent.log
        await kubectl("certificate", "approve", csrs[0]["metadata"]["name"])

        async def cluster_signed() -> Any:
            cert = await served_certificate(port)
            return cert if cert.issuer != cert.subject else None

        cert = await eventually(cluster_signed, 20, what="the issued certificate in use")
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == f"system:node:{name}"
        assert cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "kubelet-emu-devcluster-ca"
        await served_certificate(port, ca=cluster.ca_cert, name=internal)  # verifies against the cluster CA

        # A restart reuses the issued certificate: served at once, no new request.
        await agent.stop()
        again = await start_agent(name, config, state_dir=state)
        await wait_node_ready(kubectl, name, timeout=30)

        async def serving_port() -> int | None:
            m = re.search(r'msg="kubelet API serving" .*port=(\d+)', again.log)
            return int(m[1]) if m else None

        port = await eventually(serving_port, 20, what="the restarted agent's port")
        assert (await served_certificate(port, ca=cluster.ca_cert, name=internal)).serial_number == cert.serial_number
        assert len(await pending_csrs()) == 1
    finally:
        for c in await pending_csrs():
            await kubectl.run("delete", "csr", c["metadata"]["name"], check=False)


async def agent_stats(node: Node) -> dict[str, Any]:
    path = node.state / "agent-stats.json"
    before = path.stat().st_mtime_ns if path.exists() else 0
    node.agent.proc.send_signal(signal.SIGUSR1)
    await eventually(lambda: asyncio.sleep(0, path.exists() and path.stat().st_mtime_ns != before), 5, 0.05, "stats")
    return json.loads(path.read_text())


async def test_token_and_access_reviews_are_cached(cluster, kubectl, node, chatty):
    sa = unique("sa-cached")
    role = unique("node-proxy-cached")
    await kubectl("create", "serviceaccount", sa)
    await kubectl("create", "clusterrole", role, "--verb=get", "--resource=nodes/proxy")
    await kubectl("create", "clusterrolebinding", role, f"--clusterrole={role}", f"--serviceaccount=default:{sa}")
    try:
        token = (await kubectl("create", "token", sa)).strip()
        path = f"/containerLogs/default/{chatty}/main?tailLines=1"

        async def allowed() -> bool:
            return (await direct(cluster, node, path, token=token))[0] == 200

        await eventually(allowed, 10)
        first = await agent_stats(node)
        for _ in range(10):
            assert await direct(cluster, node, path, token=token) == (200, "late-2\n")
        after = await agent_stats(node)
        assert after["kubelet_api_token_reviews"] == first["kubelet_api_token_reviews"]
        assert after["kubelet_api_access_reviews"] == first["kubelet_api_access_reviews"]
    finally:
        await kubectl.run("delete", "clusterrolebinding,clusterrole", role, check=False)


async def test_an_emulated_container_has_an_empty_log(cluster, kubectl, node):
    """Nothing runs, so nothing was printed: empty, and a follower waits until the container ends."""
    rc, name = unique("rc-fake"), unique("p-fake")
    await kubectl.apply(f"apiVersion: node.k8s.io/v1\nkind: RuntimeClass\nmetadata: {{name: {rc}}}\nhandler: fake\n")
    manifest = pod_yaml(name, node.name, "true", restart="Never").replace(
        "  restartPolicy:", f"  runtimeClassName: {rc}\n  restartPolicy:"
    )
    manifest = manifest.replace(
        "metadata: {name: " + name + "}",
        f"""metadata:
  name: {name}
  annotations: {{emulated.kubelet-emu.io/exit-after: "4s"}}""",
    )
    await kubectl.apply(manifest)
    await running_pod(kubectl, name)
    assert await kubectl("logs", name) == ""
    started = time.monotonic()
    code, out, _ = await kubectl.run("logs", "-f", name, check=False)
    waited = time.monotonic() - started
    assert (code, out) == (0, "")
    assert 1.0 < waited < 15, f"-f should last until the emulated container exits, took {waited:.1f}s"
    await kubectl.run("delete", "runtimeclass", rc, check=False)


# --- slow and malformed clients (issue 16) ---------------------------------------------------------


async def _closed_after(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, start: float) -> float:
    """Dribble header bytes until the server closes the connection; seconds it took."""
    try:
        while True:
            writer.write(b"X-Slow: a\r\n")
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                if await asyncio.wait_for(reader.read(1024), 1.0) == b"":
                    break
    except (ConnectionError, OSError, ssl.SSLError):
        pass
    writer.close()
    return time.monotonic() - start


async def test_clients_dribbling_headers_are_let_go(cluster, node):
    """Slowloris: 100 TLS clients send a header every second and never finish; a raw TCP client
    never starts the TLS handshake. The kubelet API closes all of them after its header timeout."""
    from agent.kubelet_api.slow_clients import HEADER_TIMEOUT

    async def dribbler() -> float:
        reader, writer = await asyncio.open_connection("127.0.0.1", node.port, ssl=client_ssl(cluster, None))
        opened = time.monotonic()
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        return await _closed_after(reader, writer, opened)

    raw_reader, raw_writer = await asyncio.open_connection("127.0.0.1", node.port)
    took = await asyncio.wait_for(asyncio.gather(*(dribbler() for _ in range(100))), HEADER_TIMEOUT + 30)
    assert max(took) <= HEADER_TIMEOUT + 4, sorted(took)[-5:]
    assert await asyncio.wait_for(raw_reader.read(1), 5) == b""  # no handshake: closed too
    raw_writer.close()
    status, _ = await direct(cluster, node, "/healthz", cert="apiserver-kubelet-client")
    assert status == 200  # well-behaved clients are served as before


async def test_malformed_requests_are_one_debug_line_not_tracebacks(cluster, node):
    before = len(node.agent.log)
    for request in (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nContent-Length: nope\r\n\r\n",
        b"GET /\x00 HTTP/1.1\r\n\r\n",
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", node.port, ssl=client_ssl(cluster, None))
        writer.write(request)
        answer = await asyncio.wait_for(reader.read(100), 10)
        writer.close()
        assert answer.split(b"\r\n")[0].endswith(b" 400 Bad Request"), answer
    await asyncio.sleep(0.5)
    added = node.agent.log[before:]
    assert "Traceback" not in added and "level=error" not in added, added[:2000]

"""kubectl exec, attach and port-forward through the real API server to a real agent's kubelet API.

kubectl (v1.36) speaks WebSocket to the API server, which translates exec/attach to SPDY/3.1 and
tunnels port-forward's SPDY toward this node (it declares no ExtendWebSocketsToKubelet feature), so
these tests drive the agent's SPDY server, streaming protocols and the process backend end to end.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import random
import re
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
import pytest
from aiohttp import web
from conftest import Kubectl, eventually, free_port, wait_node_ready
from helpers import check_exec_tty_and_resize

from agent.kubelet_api import remotecommand, spdy
from agent.kubelet_api.remotecommand import StreamOptions
from cgroups.manager import CgroupError, CgroupManager, detect_mode
from devcluster import manage
from runtimes.base import ContainerHandle, Sandbox
from runtimes.process.exec import connect_in_pod, exec_in_container

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the process backend needs root for cgroups and namespaces")

CGROUP_ROOT = f"kubelet-emu-stream-{uuid.uuid4().hex[:6]}"
CONFIG = f"""
default_runtime = "procs"
[node]
cgroup_root = "{CGROUP_ROOT}"
[runtimes.procs]
backend = "process"
[runtimes.fake]
backend = "emulated"
"""


def config() -> str:
    """A pod CIDR of the node's own: a new cluster hands every first node 10.244.0.0/24, which the
    bridge of a node another test run left behind may still route."""
    return CONFIG + f'[network]\npod_cidr = "10.{random.randint(100, 199)}.{random.randint(0, 255)}.0/24"\n'


@pytest.fixture(scope="module", autouse=True)
def cgroup_root() -> Iterator[None]:
    yield
    with contextlib.suppress(CgroupError, OSError):  # the test root itself, once every Pod is gone
        CgroupManager(detect_mode(), root=CGROUP_ROOT).remove(CGROUP_ROOT, kill=True)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
async def node(kubectl: Kubectl, start_agent) -> AsyncIterator[str]:  # type: ignore[no-untyped-def]
    name = unique("emu-stream")
    await start_agent(name, config())
    await wait_node_ready(kubectl, name)
    yield name
    # Process containers outlive a stopped agent by design: delete the Pods while it runs.
    await kubectl.run(
        "delete", "pods", "--field-selector", f"spec.nodeName={name}", "--grace-period=1",
        "--wait=true", "--timeout=60s", check=False,
    )  # fmt: skip


async def run_pod(
    kubectl: Kubectl, node: str, command: str, *, runtime_class: str = "", restart: str = "Always", extra: str = ""
) -> str:
    name = unique("p")
    rc = f"  runtimeClassName: {runtime_class}\n" if runtime_class else ""
    await kubectl.apply(f"""
apiVersion: v1
kind: Pod
metadata:
  name: {name}
spec:
  nodeName: {node}
  terminationGracePeriodSeconds: 1
  restartPolicy: {restart}
{rc}  containers:
  - name: main
    image: busybox
    command: ["sh", "-c", {command!r}]
{extra}""")

    async def running() -> bool:
        pod = await kubectl.get("pod", name)
        return bool(pod) and pod["status"].get("phase") == "Running"

    await eventually(running, 30, interval=0.2, what=f"pod {name} Running")
    return name


@pytest.mark.cluster
async def test_exec_prints_output_and_returns_the_exit_code(kubectl: Kubectl, node: str) -> None:
    pod = await run_pod(kubectl, node, "sleep 3600")
    started = time.monotonic()
    code, out, err = await kubectl.run("exec", pod, "--", "sh", "-c", "echo hi; echo oops >&2; exit 3", check=False)
    elapsed = time.monotonic() - started
    assert (code, out) == (3, "hi\n"), err
    assert "oops" in err and "command terminated with exit code 3" in err
    assert elapsed < 10, f"kubectl exec took {elapsed:.1f}s"

    code, out, err = await kubectl.run("exec", pod, "-c", "main", "--", "sh", "-c", "echo $HOSTNAME; pwd")
    assert code == 0 and out.split("\n")[0] == pod, err


@pytest.mark.cluster
async def test_exec_runs_in_the_containers_cgroup(kubectl: Kubectl, node: str) -> None:
    pod = await run_pod(kubectl, node, "sleep 3600")
    _, out, _ = await kubectl.run("exec", pod, "--", "cat", "/proc/self/cgroup")
    assert CGROUP_ROOT in out and "main" in out, out


@pytest.mark.cluster
async def test_exec_with_stdin(kubectl: Kubectl, node: str) -> None:
    pod = await run_pod(kubectl, node, "sleep 3600")
    code, out, err = await kubectl.run("exec", "-i", pod, "--", "cat", stdin="hello\nworld\n")
    assert (code, out) == (0, "hello\nworld\n"), err

    big = "".join(f"line {i:06d} {'x' * 90}\n" for i in range(3000))  # 300 kB: many SPDY frames each way
    code, out, err = await kubectl.run("exec", "-i", pod, "--", "sh", "-c", "wc -c; echo done >&2", stdin=big)
    assert code == 0 and out.strip() == str(len(big)) and "done" in err, err


def _pids_running(needle: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@pytest.mark.cluster
async def test_exec_command_stops_when_the_client_goes_away(kubectl: Kubectl, node: str) -> None:
    pod = await run_pod(kubectl, node, "sleep 3600")
    duration = f"{random.randint(10000, 99999)}.5"  # names the exec'd process on this host
    argv, env = manage.kubectl_argv(kubectl.cluster, ["exec", pod, "--", "sleep", duration])
    proc = await asyncio.create_subprocess_exec(*argv, env=env, stdout=asyncio.subprocess.DEVNULL)

    async def started() -> list[int]:
        return _pids_running(f"sleep {duration}")

    await eventually(started, 15, interval=0.2, what="the exec'd sleep")
    proc.kill()  # kubectl dies: the API server drops its SPDY connection to the node
    await proc.wait()

    async def stopped() -> bool:
        return not _pids_running(f"sleep {duration}")

    await eventually(stopped, 15, interval=0.2, what="the exec'd sleep to be stopped")


@pytest.mark.cluster
async def test_exec_with_a_tty_and_resize(kubectl: Kubectl, node: str) -> None:
    """kubectl exec -it on a real terminal: a shell with a TTY, its size, and a resize."""
    pod = await run_pod(kubectl, node, "sleep 3600")
    argv, env = manage.kubectl_argv(kubectl.cluster, ["exec", "-it", pod, "--", "sh"])
    await check_exec_tty_and_resize(argv, env)


@pytest.mark.cluster
async def test_port_forward_to_an_http_server_in_the_pod(kubectl: Kubectl, node: str) -> None:
    port = free_port()  # the Pod may share the host's network: a port nobody uses
    pod = await run_pod(kubectl, node, f"cd /etc && exec python3 -m http.server {port} --bind 127.0.0.1")
    status = (await kubectl.json("get", "pod", pod))["status"]
    assert status["podIP"] != status["hostIP"]  # its own network namespace: only reachable from inside
    local = free_port()
    argv, env = manage.kubectl_argv(kubectl.cluster, ["port-forward", f"pod/{pod}", f"{local}:{port}"])
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert b"Forwarding from" in line, line

        async def get(path: str) -> tuple[int, bytes]:
            reader, writer = await asyncio.open_connection("127.0.0.1", local)
            writer.write(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
            await writer.drain()
            response = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            head, _, body = response.partition(b"\r\n\r\n")
            return int(head.split()[1]), body

        async def served() -> tuple[int, bytes] | None:  # the server may still be starting
            try:
                return await get("/")
            except (OSError, ValueError, IndexError, TimeoutError):
                return None

        status, body = await eventually(served, 20, interval=0.5, what="an answer through the port-forward")
        assert status == 200 and b"passwd" in body
        hostname = Path("/etc/hostname").read_bytes()
        for _ in range(3):  # connection after connection on one forwarding session
            status, body = await get("/hostname")
            assert (status, body) == (200, hostname)
    finally:
        proc.terminate()
        await proc.wait()


@pytest.mark.cluster
async def test_port_forward_to_a_closed_port_reports_the_error(kubectl: Kubectl, node: str) -> None:
    pod = await run_pod(kubectl, node, "sleep 3600")
    closed, local = free_port(), free_port()
    argv, env = manage.kubectl_argv(kubectl.cluster, ["port-forward", f"pod/{pod}", f"{local}:{closed}"])
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        await asyncio.wait_for(proc.stdout.readline(), 20)
        reader, writer = await asyncio.open_connection("127.0.0.1", local)
        await asyncio.wait_for(reader.read(), 10)  # closed on us: nothing listens in the Pod
        writer.close()
        err = await asyncio.wait_for(proc.stderr.read(), 15)  # kubectl gives up on the session
        assert f"error forwarding port {closed}".encode() in err and b"Connect call failed" in err, err
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()


@pytest.mark.cluster
async def test_attach_follows_the_containers_output(kubectl: Kubectl, node: str) -> None:
    pod = await run_pod(
        kubectl, node, "sleep 1; for i in $(seq 1 20); do echo tick $i; echo tock $i >&2; sleep 0.2; done",
        restart="Never",
    )  # fmt: skip
    code, out, err = await kubectl.run("attach", pod, check=False)
    assert code == 0, err
    ticks = [int(n) for n in re.findall(r"tick (\d+)", out)]
    assert ticks and ticks == list(range(ticks[0], 21)), out  # from where it joined, in order, to the end
    assert "tock 20" in err


@pytest.mark.cluster
async def test_attach_with_stdin_once(kubectl: Kubectl, node: str) -> None:
    """stdin: true gives the container a stdin attach -i writes to; stdinOnce closes it when the
    first attach's input ends, so the container reads EOF."""
    pod = await run_pod(
        kubectl, node, "while read l; do echo got:$l; done; echo eof", restart="Never",
        extra="    stdin: true\n    stdinOnce: true\n",
    )  # fmt: skip
    code, out, err = await kubectl.run("attach", "-i", pod, stdin="a\nb\n", check=False)
    assert code == 0, err
    assert out.endswith("got:a\ngot:b\neof\n"), out

    other = await run_pod(kubectl, node, "sleep 3600")
    code, _, err = await kubectl.run("attach", "-i", other, stdin="x\n", check=False)
    assert code != 0 and "does not accept stdin" in err, err


@pytest.mark.cluster
async def test_exec_into_an_unknown_container_is_refused(kubectl: Kubectl, node: str) -> None:
    pod = await run_pod(kubectl, node, "sleep 3600")
    code, _, err = await kubectl.run("exec", pod, "-c", "nope", "--", "true", check=False)
    assert code != 0 and "nope" in err, err


@pytest.mark.cluster
async def test_exec_on_the_emulated_backend_says_it_cannot(kubectl: Kubectl, node: str) -> None:
    rc = unique("fake")
    await kubectl.apply(f"apiVersion: node.k8s.io/v1\nkind: RuntimeClass\nmetadata: {{name: {rc}}}\nhandler: fake\n")
    try:
        pod = await run_pod(kubectl, node, "sleep 3600", runtime_class=rc)
        code, _, err = await kubectl.run("exec", pod, "--", "true", check=False)
        assert code != 0 and "the emulated backend cannot exec into containers" in err, err
    finally:
        await kubectl.run("delete", "runtimeclass", rc, "--wait=false", check=False)


# --- the process backend inside a Pod network namespace (no cluster: a namespace made here) -------


@pytest.fixture
def netns() -> Iterator[str]:
    name = unique("emu-stream-test")
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


async def _serve_once(reply: bytes, port: int, netns: str | None) -> asyncio.subprocess.Process:
    """A one-shot TCP server answering `reply`, in `netns` or on the host."""
    code = (
        "import socket,sys;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
        f"s.bind(('127.0.0.1',{port}));s.listen();print('up',flush=True);c,_=s.accept();"
        f"c.sendall({reply!r}+c.recv(100));c.close()"
    )
    prefix = ["ip", "netns", "exec", Path(netns).name] if netns else []
    proc = await asyncio.create_subprocess_exec(*prefix, sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    assert await asyncio.wait_for(proc.stdout.readline(), 10) == b"up\n"
    return proc


async def test_port_forward_connects_inside_the_pods_network_namespace(netns: str) -> None:
    port = free_port()
    host = await _serve_once(b"host:", port, None)  # the same port on the host must not be the one reached
    pod = await _serve_once(b"pod:", port, netns)
    try:
        reader, writer = await connect_in_pod(Sandbox(id="s", pod_uid="u", netns=netns), port)
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.read(), 5) == b"pod:ping"
        writer.close()
        reader, writer = await connect_in_pod(Sandbox(id="s", pod_uid="u"), port)  # no netns: the host's
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.read(), 5) == b"host:ping"
        writer.close()
        with pytest.raises(ConnectionRefusedError):
            await connect_in_pod(Sandbox(id="s", pod_uid="u", netns=netns), free_port())
    finally:
        for proc in (host, pod):
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


async def test_exec_joins_the_pods_network_namespace(netns: str) -> None:
    spec = {"env": {"PATH": os.environ["PATH"]}, "cwd": "/", "cgroup_procs": [], "netns": netns}
    handle = ContainerHandle(id="c1", name="main", image="busybox", extra={"spec": spec})
    proc = await exec_in_container(handle, ["readlink", "/proc/self/ns/net"], tty=False, stdin=False)
    out = await proc.stdout.read()
    assert await proc.wait() == 0
    assert out.decode().strip() == f"net:[{os.stat(netns).st_ino}]"


# --- the remote-command protocol versions, against a local server (no cluster) ---------------------


class SpdyClient:
    """The API server's side of a kubelet stream session, made of the agent's own frame writers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.compressor, self.parser = spdy.HeaderCompressor(), spdy.FrameParser()
        self.next_id = 1
        self.data: dict[int, bytes] = {}
        self.finished: set[int] = set()

    @classmethod
    async def connect(cls, port: int, path: str, protocol: str) -> SpdyClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
            f"X-Stream-Protocol-Version: {protocol}\r\nContent-Length: 0\r\n\r\n".encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101") and protocol.encode() in head, head
        return cls(reader, writer)

    def open(self, stream_type: str) -> int:
        sid, self.next_id = self.next_id, self.next_id + 2
        self.writer.write(spdy.syn_stream_frame(self.compressor, sid, {"streamType": [stream_type]}))
        return sid

    def send(self, sid: int, data: bytes, fin: bool = False) -> None:
        self.writer.write(spdy.data_frame(sid, data, fin))

    async def until_finished(self, *sids: int) -> None:
        while not set(sids) <= self.finished:
            chunk = await asyncio.wait_for(self.reader.read(65536), 10)
            assert chunk, f"connection closed before streams {set(sids) - self.finished} ended"
            for frame in self.parser.feed(chunk):
                if isinstance(frame, spdy.DataFrame):
                    self.data[frame.stream_id] = self.data.get(frame.stream_id, b"") + frame.data
                    if frame.fin:
                        self.finished.add(frame.stream_id)


@pytest.fixture
async def exec_server() -> AsyncIterator[int]:
    """/exec?command=..: remotecommand.serve running the command on this host with exec_in_container."""
    spec = {"env": {"PATH": os.environ["PATH"]}, "cwd": "/", "cgroup_procs": []}
    handle = ContainerHandle(id="c1", name="main", image="busybox", extra={"spec": spec})

    async def route(request: web.Request) -> web.StreamResponse:
        opts = StreamOptions.from_query(dict(request.query))
        command = request.query.getall("command")
        return await remotecommand.serve(
            request, opts, lambda: exec_in_container(handle, command, opts.tty, opts.stdin), "exec in test"
        )

    app = web.Application()
    app.router.add_post("/exec", route)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield port
    await runner.cleanup()


SH = "/exec?command=sh&command=-c&command="


async def test_v4_reports_the_exit_code_as_a_status(exec_server: int) -> None:
    c = await SpdyClient.connect(
        exec_server, SH + "echo+hi%3Becho+err+%3E%262%3Bexit+3&output=1&error=1", "v4.channel.k8s.io"
    )
    error, stdout, stderr = c.open("error"), c.open("stdout"), c.open("stderr")
    await c.until_finished(error, stdout, stderr)
    assert (c.data[stdout], c.data[stderr]) == (b"hi\n", b"err\n")
    status = json.loads(c.data[error])
    assert status["status"] == "Failure" and status["reason"] == "NonZeroExitCode"
    assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "3"}]


async def test_v3_writes_only_a_failures_message(exec_server: int) -> None:
    c = await SpdyClient.connect(exec_server, SH + "exit+0&output=1", "v3.channel.k8s.io")
    error, stdout = c.open("error"), c.open("stdout")
    await c.until_finished(error, stdout)
    assert c.data.get(error, b"") == b""  # success: nothing but the end of the stream

    c = await SpdyClient.connect(exec_server, "/exec?command=no-such-command&output=1", "v3.channel.k8s.io")
    error, stdout = c.open("error"), c.open("stdout")
    await c.until_finished(error)
    assert b"no-such-command" in c.data[error] and not c.data[error].startswith(b"{")


async def test_v4_tty_applies_resizes_sent_in_pieces(exec_server: int) -> None:
    c = await SpdyClient.connect(exec_server, SH + "sleep+0.5%3Bstty+size&input=1&output=1&tty=1", "v4.channel.k8s.io")
    error, stdin, stdout, resize = c.open("error"), c.open("stdin"), c.open("stdout"), c.open("resize")
    c.send(resize, b'{"Width":100,')  # kubectl's JSON encoder output may arrive split anywhere
    await asyncio.sleep(0.1)
    c.send(resize, b'"Height":30}\n')
    await c.until_finished(error, stdout)
    assert c.data[stdout].strip() == b"30 100"
    assert json.loads(c.data[error]) == {"status": "Success"}
    c.send(stdin, b"", fin=True)


async def test_v2_tty_needs_no_resize_stream(exec_server: int) -> None:
    c = await SpdyClient.connect(exec_server, SH + "tty&input=1&output=1&tty=1", "v2.channel.k8s.io")
    error, _, stdout = c.open("error"), c.open("stdin"), c.open("stdout")
    await c.until_finished(error, stdout)
    assert c.data[stdout].startswith(b"/dev/pts/") and c.data.get(error, b"") == b""


# --- WebSocket clients (issue 17 item 10) ------------------------------------------------------


async def ws_exec(cluster: manage.Cluster, pod: str, command: list[str], protocol: str, stdin: bytes | None = None):
    """exec through the API server as a WebSocket client speaking `protocol`: the frames by channel."""
    pki = cluster.dir / "pki"
    ctx = ssl.create_default_context(cafile=str(cluster.ca_cert))
    ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    query = urlencode([("command", c) for c in command] + [("stdout", "1"), ("stderr", "1")]
                      + ([("stdin", "1")] if stdin is not None else []))  # fmt: skip
    url = f"{cluster.server}/api/v1/namespaces/default/pods/{pod}/exec?{query}".replace("https://", "wss://")
    text = protocol.startswith("base64")
    channels: dict[int, bytes] = {}
    timeout = aiohttp.ClientWSTimeout(ws_close=10)
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session,
        session.ws_connect(url, protocols=[protocol], timeout=timeout) as ws,
    ):
        assert ws.protocol == protocol
        if stdin is not None:
            if text:
                await ws.send_str("0" + base64.b64encode(stdin).decode())
            else:
                await ws.send_bytes(b"\x00" + stdin)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                channel, data = msg.data[0], msg.data[1:]
            elif msg.type == aiohttp.WSMsgType.TEXT:
                channel, data = int(msg.data[0]), base64.b64decode(msg.data[1:])
            else:
                break
            channels[channel] = channels.get(channel, b"") + data
    return channels


@pytest.mark.cluster
@pytest.mark.parametrize(
    "protocol", ["v5.channel.k8s.io", "v4.channel.k8s.io", "channel.k8s.io", "base64.channel.k8s.io"]
)
async def test_exec_over_websockets(cluster, kubectl: Kubectl, node: str, protocol: str) -> None:
    pod = await run_pod(kubectl, node, "sleep 3600")
    got = await asyncio.wait_for(ws_exec(cluster, pod, ["sh", "-c", "echo hi; echo oops >&2; exit 3"], protocol), 30)
    assert got.get(1) == b"hi\n" and got.get(2) == b"oops\n", got
    if protocol.startswith(("v4", "v5")):
        status = json.loads(got[3])
        assert status["status"] == "Failure" and status["reason"] == "NonZeroExitCode", status
        assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "3"}]
    else:
        assert b"exit" in got.get(3, b""), got  # before v4: only a failure's message
    got = await asyncio.wait_for(ws_exec(cluster, pod, ["sh", "-c", "head -c 5; echo ok"], protocol, b"hello"), 30)
    assert got.get(1) == b"hellook\n", got
    if protocol.startswith(("v4", "v5")):
        assert json.loads(got[3])["status"] == "Success"
    else:
        assert not got.get(3)


@pytest.mark.cluster
async def test_attach_over_websockets(cluster, kubectl: Kubectl, node: str) -> None:
    pod = await run_pod(kubectl, node, "while true; do echo tick; sleep 0.2; done")
    pki = cluster.dir / "pki"
    ctx = ssl.create_default_context(cafile=str(cluster.ca_cert))
    ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    url = f"{cluster.server}/api/v1/namespaces/default/pods/{pod}/attach?stdout=1&container=main"
    seen = b""
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session,
        session.ws_connect(url.replace("https://", "wss://"), protocols=["base64.channel.k8s.io"]) as ws,
    ):
        assert ws.protocol == "base64.channel.k8s.io"
        while b"tick" not in seen:
            msg = await asyncio.wait_for(ws.receive(), 10)
            assert msg.type == aiohttp.WSMsgType.TEXT, msg
            if msg.data[0] == "1":
                seen += base64.b64decode(msg.data[1:])
    assert seen.startswith(b"tick\n")

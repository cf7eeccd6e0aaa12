"""Small builders, host facts and terminal helpers shared by the tests (no fixtures here: see conftest.py)."""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import re
import signal
import struct
import subprocess
import termios
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from cgroups.detect import CgroupError, CgroupMode, detect_mode

# The process backend puts each Pod in its own cgroup: creating one needs root.
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the process backend needs root for pod cgroups")

# Three emulated handlers, for the RuntimeClass and Pod-lifecycle tests of the emulated backend.
EMULATED_HANDLERS = """
default_runtime = "alpha"
[runtimes.alpha]
backend = "emulated"
[runtimes.beta]
backend = "emulated"
[runtimes.gamma]
backend = "emulated"
"""


def unique(prefix: str) -> str:
    """A name no other test (or earlier session on the same cluster) has used."""
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def process_config(cgroup_root: str, node: str = "", runtimes: str = "") -> str:
    """An agent config whose default handler `procs` runs Pods as host processes, their cgroups
    under `cgroup_root`; `node` adds [node] settings, `runtimes` more sections."""
    return f"""
default_runtime = "procs"
[node]
cgroup_root = "{cgroup_root}"
{node}[runtimes.procs]
backend = "process"
{runtimes}"""


def runtime_class(name: str, handler: str, extra: str = "") -> str:
    return f"apiVersion: node.k8s.io/v1\nkind: RuntimeClass\nmetadata: {{name: {name}}}\nhandler: {handler}\n{extra}"


def pod(
    name: str,
    node: str | None,
    runtime_class: str | None = None,
    *,
    annotations: dict[str, str] | None = None,
    restart_policy: str = "Always",
    extra_spec: str = "",
    containers: str = "[{name: main, image: busybox}]",
) -> str:
    """A Pod manifest (YAML) for the emulated backend's tests."""
    lines = ["apiVersion: v1", "kind: Pod", "metadata:", f"  name: {name}"]
    if annotations:
        lines.append("  annotations:")
        lines += [f'    {k}: "{v}"' for k, v in annotations.items()]
    lines.append("spec:")
    if node:
        lines.append(f"  nodeName: {node}")
    if runtime_class:
        lines.append(f"  runtimeClassName: {runtime_class}")
    lines.append(f"  restartPolicy: {restart_policy}")
    lines.append(f"  containers: {containers}")
    if extra_spec:
        lines.append(extra_spec)
    return "\n".join(lines) + "\n"


def ctr(name: str = "c", requests: dict | None = None, limits: dict | None = None, **extra: Any) -> dict:
    """A container dict as the API server returns it, with only the resources given."""
    resources: dict[str, Any] = {}
    if requests is not None:
        resources["requests"] = requests
    if limits is not None:
        resources["limits"] = limits
    return {"name": name, "image": "busybox", "resources": resources, **extra}


def host_cgroup_mode() -> CgroupMode | None:
    """This machine's cgroup mode, or None where cgroups cannot be used."""
    try:
        return detect_mode()
    except CgroupError:
        return None


def set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


async def read_pty_until(fd: int, pattern: str, timeout: float) -> str:
    """Read the pty until `pattern` (a regex) shows up in the output."""
    loop = asyncio.get_running_loop()
    seen = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = asyncio.Event()
        loop.add_reader(fd, ready.set)
        try:
            await asyncio.wait_for(ready.wait(), max(0.01, deadline - time.monotonic()))
        except TimeoutError:
            break
        finally:
            loop.remove_reader(fd)
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
        if re.search(pattern, seen.decode(errors="replace")):
            return seen.decode(errors="replace")
    pytest.fail(f"no {pattern!r} on the terminal within {timeout}s; it showed: {seen.decode(errors='replace')!r}")


async def check_exec_tty_and_resize(argv: list[str], env: dict[str, str]) -> None:
    """Run `kubectl exec -it ... -- sh` (argv, env) on a real terminal and check what a user would:
    a TTY of the terminal's size, a resize that reaches the shell, and the shell's exit code."""
    master, slave = pty.openpty()
    set_winsize(slave, 33, 111)
    proc = await asyncio.create_subprocess_exec(
        *argv, env={**env, "TERM": "xterm"}, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
        preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
    )  # fmt: skip
    os.close(slave)
    try:
        os.write(master, b"tty; stty size; echo $((6*7))\n")
        out = await read_pty_until(master, r"\n42\r?\n", 20)
        assert "/dev/pts/" in out and "33 111" in out, out
        set_winsize(master, 40, 132)  # the terminal is resized: kubectl sees SIGWINCH and sends it on
        os.kill(proc.pid, signal.SIGWINCH)
        await asyncio.sleep(0.5)
        os.write(master, b"stty size\n")
        await read_pty_until(master, r"40 132", 10)
        os.write(master, b"exit 4\n")
        assert await asyncio.wait_for(proc.wait(), 15) == 4
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        os.close(master)


def free_test_cidr(prefix: str, seed: int) -> str:
    """A `prefix`.X.0/24 (prefix like "10.250") that nothing on this host routes yet; the search
    starts at X = seed % 200 so concurrent test modules pick different ones."""
    routes = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True).stdout
    for x in range(seed % 200, 256):
        if f"{prefix}.{x}." not in routes:
            return f"{prefix}.{x}.0/24"
    raise RuntimeError(f"no free {prefix}.X.0/24 on this host")


def exposed_files(state: Path, value: str) -> list[str]:
    """Files under `state` holding `value` that another user could read if the state directory
    itself were open: other-readable, with every directory below `state` other-searchable."""
    found = []
    for f in state.rglob("*"):
        if not f.is_file() or f.is_symlink() or value.encode() not in f.read_bytes():
            continue
        dirs = [d for d in f.parents if d.is_relative_to(state) and d != state]
        if f.stat().st_mode & 0o004 and all(d.stat().st_mode & 0o001 for d in dirs):
            found.append(str(f))
    return found

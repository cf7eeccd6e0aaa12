"""Pinned Go programs built from the Go module proxy and cached, for what runs beside the dev
control plane (metrics-server) and the benchmarks (KWOK).

Each program and version has its own directory, ~/.cache/kubelet-emu/<name>-<version>/, so a
release is built once and a version bump builds anew. The control plane itself is built from this
repository's source instead (manage.build).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from devcluster import manage

# after(go, work, env): writes the extra files next to the installed binary in `work`.
AfterInstall = Callable[[str, Path, dict[str, str]], Awaitable[None]]


class GoBuildError(manage.DevClusterError):
    pass


def cache_dir(name: str, version: str) -> Path:
    return manage.cache_root() / f"{name}-{version}"


async def run_go(go: str, *args: str, cwd: Path, env: dict[str, str]) -> str:
    """Run `go args...`; returns its stdout (stderr is kept apart: `go mod download -json`
    prints progress there) and raises GoBuildError with the end of stderr on failure."""
    proc = await asyncio.create_subprocess_exec(
        go, *args, cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise GoBuildError(f"go {' '.join(args)} failed:\n{err.decode(errors='replace')[-4000:]}")
    return out.decode()


async def install(
    name: str,
    version: str,
    package: str,
    *,
    files: Sequence[str] = (),
    after: AfterInstall | None = None,
    quiet: bool = False,
) -> Path:
    """cache_dir(name, version)/name: `go install package@version` (its binary must be `name`),
    done once. `after` may write `files` into the work directory; they are cached beside it.

    Everything is made in a per-process work directory and moved in at the end, the binary last,
    so that a build that fails or is interrupted never leaves a cache that looks complete."""
    directory = cache_dir(name, version)
    target = directory / name
    if target.exists() and all((directory / f).exists() for f in files):
        return target
    go = await manage.ensure_go()
    work = directory / f"tmp{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    try:
        if not quiet:
            print(f"building {name} {version} with {go} (the first build takes minutes)...", file=sys.stderr)
        started = time.monotonic()
        env = dict(os.environ, CGO_ENABLED="0", GOBIN=str(work))
        await run_go(go, "install", "-trimpath", f"{package}@{version}", cwd=work, env=env)
        if after is not None:
            await after(go, work, env)
        for file in files:
            (work / file).replace(directory / file)
        (work / name).replace(target)
        if not quiet:
            print(f"built {target} in {time.monotonic() - started:.0f}s", file=sys.stderr)
    finally:
        for leftover in work.iterdir():
            leftover.unlink()
        work.rmdir()
    return target

"""A registry image with a gRPC health server, for gRPC probes of runc containers: busybox plus
/bin/grpc-health, a static Go program built from tests/grpc_health/main.go with the standard
library only (no module download), cached under ~/.cache/kubelet-emu by the hash of its source.
Use with `pytest_plugins = ["registry_fixture", "grpc_health_image"]`."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from pathlib import Path

import pytest

from devcluster.manage import cache_root
from images.build import File, busybox_files, push_image

SOURCE = Path(__file__).resolve().parent / "grpc_health" / "main.go"


async def build_grpc_health() -> Path:
    """The binary, built once per version of its source (a few seconds with a warm Go cache)."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    binary = cache_root() / f"grpc-health-{digest}"
    if binary.exists():
        return binary
    go = shutil.which("go") or ("/usr/local/go/bin/go" if os.access("/usr/local/go/bin/go", os.X_OK) else None)
    if go is None:
        pytest.skip("Go is needed to build the gRPC health server image (install Go 1.24 or newer)")
    binary.parent.mkdir(parents=True, exist_ok=True)
    partial = binary.with_suffix(".partial")
    env = {**os.environ, "CGO_ENABLED": "0", "GOTOOLCHAIN": "local", "GOFLAGS": "", "GO111MODULE": "off"}
    proc = await asyncio.create_subprocess_exec(
        go, "build", "-trimpath", "-ldflags=-s -w", "-o", str(partial), str(SOURCE),
        cwd=SOURCE.parent, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"go build {SOURCE} failed: {out.decode(errors='replace').strip()}")
    partial.rename(binary)
    return binary


@pytest.fixture(scope="session")
async def grpc_health_ref(registry) -> str:
    """'127.0.0.1:PORT/grpc-health:1': busybox and /bin/grpc-health PORT serving|down."""
    binary = await build_grpc_health()
    files = {**busybox_files(), "bin/grpc-health": File(binary.read_bytes(), 0o755)}
    config = {"Entrypoint": ["/bin/grpc-health"], "Cmd": None, "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]}
    await push_image(registry.url, "grpc-health", "1", files, config=config)
    return f"{registry.host}/grpc-health:1"

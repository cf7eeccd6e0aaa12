"""The node's platform and the choice of one manifest from a manifest list / OCI index."""

from __future__ import annotations

import platform as _platform
from typing import Any

# uname -m -> (GOARCH, variant), as image indexes name them.
_MACHINES = {
    "x86_64": ("amd64", ""),
    "amd64": ("amd64", ""),
    "aarch64": ("arm64", "v8"),
    "arm64": ("arm64", "v8"),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "i386": ("386", ""),
    "i686": ("386", ""),
    "ppc64le": ("ppc64le", ""),
    "s390x": ("s390x", ""),
    "riscv64": ("riscv64", ""),
}


def node_platform() -> tuple[str, str, str]:
    """(os, architecture, variant) of this machine: ("linux", "amd64", "")."""
    machine = _platform.machine().lower()
    arch, variant = _MACHINES.get(machine, (machine, ""))
    return "linux", arch, variant


def normalize(os_name: str, arch: str, variant: str = "") -> tuple[str, str, str]:
    arch, variant = arch.lower(), variant.lower()
    if arch in ("aarch64", "arm64"):
        arch, variant = "arm64", "" if variant in ("", "v8") else variant
    if arch in ("x86_64", "x86-64"):
        arch = "amd64"
    return os_name.lower(), arch, variant


def select_manifest(index: dict[str, Any], want: tuple[str, str, str]) -> dict[str, Any] | None:
    """The index entry for `want`; an exact variant first, then one without a variant. Attestation
    manifests (platform unknown/unknown) never match."""
    w_os, w_arch, w_variant = normalize(*want)
    exact, loose = None, None
    for entry in index.get("manifests") or []:
        p = entry.get("platform") or {}
        os_name, arch, variant = normalize(p.get("os", ""), p.get("architecture", ""), p.get("variant", ""))
        if (os_name, arch) != (w_os, w_arch):
            continue
        if variant == w_variant and exact is None:
            exact = entry
        elif not variant and loose is None:
            loose = entry
    return exact or loose

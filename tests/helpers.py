"""Small builders and host facts shared by the unit tests (no fixtures here: see conftest.py)."""

from __future__ import annotations

from typing import Any

from cgroups.detect import CgroupError, CgroupMode, detect_mode


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

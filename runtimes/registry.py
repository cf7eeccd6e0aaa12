"""Finds the backend class for a handler: built-ins first, then plugins.

A third-party package adds a backend by declaring an entry point in the
group `kubelet_emu.backends`, e.g. in its pyproject.toml:

    [project.entry-points."kubelet_emu.backends"]
    firecracker = "my_package.backend:FirecrackerBackend"
"""

from __future__ import annotations

import importlib
from functools import cache
from importlib.metadata import entry_points

from runtimes.base import Backend

ENTRY_POINT_GROUP = "kubelet_emu.backends"

_BUILTIN = {
    "emulated": "runtimes.emulated.backend:EmulatedBackend",
    "process": "runtimes.process.backend:ProcessBackend",
    "oci": "runtimes.oci.backend:OciBackend",
}


def _load(target: str) -> type[Backend]:
    module, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise TypeError(f"{target} is not a runtimes.base.Backend subclass")
    return cls


@cache
def _plugins() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def known_backends() -> frozenset[str]:
    """Names a handler's `backend` key may take on this installation."""
    return frozenset(_BUILTIN) | frozenset(_plugins())


def backend_class(name: str) -> type[Backend]:
    target = _BUILTIN.get(name) or _plugins().get(name)
    if target is None:
        raise KeyError(f"no backend named {name!r}; known: {', '.join(sorted(known_backends()))}")
    return _load(target)

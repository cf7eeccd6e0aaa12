"""The oci backend: real containers through an OCI runtime (runc, crun, runsc, kata, youki).

    backend.py   OciBackend, the Backend the registry names "oci"
    spec.py      the OCI runtime spec (config.json) of a container; seccomp.py its profiles
    volumes.py   Pod volume contents on the host
    shim.py      the per-container shim and its launcher (python -S -m runtimes.oci.shim)
    attach.py    the shim's attach socket; stream.py the agent's side of exec, attach, port-forward
    pause.py     the Pod's namespace holder (the pause container's role)
    cgroups.py   the runtime's cgroups, wherever the runtime put them

OciBackend is imported on first use: the shims run this package under `python -S` (no
site-packages) and must not load the backend's dependencies.
"""

from __future__ import annotations

from typing import Any

__all__ = ["OciBackend"]


def __getattr__(name: str) -> Any:
    if name == "OciBackend":
        from runtimes.oci.backend import OciBackend

        return OciBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

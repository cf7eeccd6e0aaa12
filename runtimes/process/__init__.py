"""The process backend: each container is a host process in its own cgroup.

    backend.py   ProcessBackend, the Backend the registry names "process"
    shim.py      the per-container shim and its launcher (python -S -m runtimes.process.shim)
    exec.py      exec, attach and port-forward into its containers

ProcessBackend is imported on first use: the shims run this package under `python -S` (no
site-packages) and must not load the backend's dependencies.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ProcessBackend"]


def __getattr__(name: str) -> Any:
    if name == "ProcessBackend":
        from runtimes.process.backend import ProcessBackend

        return ProcessBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""A runtime handler as configured on this host: the `[runtimes.NAME]` table of the agent's config
(or one imported from containerd or CRI-O). The agent reads it (agent/config); a backend gets
its own (runtimes/base.py, Backend.handler).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Handler:
    name: str
    backend: str
    runtime_path: str | None = None
    runtime_root: str | None = None
    runtime_args: tuple[str, ...] = ()
    allow_host_path: bool = False
    allow_privileged: bool = False
    # process backend: the user and group of containers whose securityContext names none (nobody).
    default_run_as_user: int = 65534
    default_run_as_group: int = 65534
    user_namespaces: bool = False
    recursive_read_only_mounts: bool = False
    # Compared but not hashed (a dict is not hashable). Plain dicts, copied on construction, so
    # dataclasses.asdict, json and deepcopy work (e.g. for /configz); treat them as read-only.
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)
    source: str = ""  # file the table came from ("<built-in>" for the built-in default)

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", dict(self.options))
        object.__setattr__(self, "runtime_args", tuple(self.runtime_args))

"""The agent's logging: quiet by default, one logfmt line per record on stderr.

The format and `kv` (fields for a record: `extra=kv(node=..., pod=...)`) are in common/logfmt.py,
so that the layers below the agent log the same way.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from pathlib import Path

from common.logfmt import LogfmtFormatter
from common.logfmt import kv as kv  # for callers that took kv from here

LOG_FILE = "kubelet-emu.log"
LOG_FILE_BYTES = 10 * 1024 * 1024
LOG_FILE_BACKUPS = 3


def log_dir(state_dir: Path) -> Path:
    """The agent's log directory, served read-only at the kubelet API's /logs/ (as the kubelet
    serves /var/log/)."""
    return state_dir / "logs"


def setup(verbosity: int = 0, directory: Path | None = None) -> None:
    """verbosity 0: info (start, stop, problems); 1 or more: debug. With `directory`, records also go
    to <directory>/kubelet-emu.log (rotated at 10 MiB, 3 kept)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    handlers: list[logging.Handler] = [handler]
    if directory is not None:
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o750)
            fh = logging.handlers.RotatingFileHandler(
                directory / LOG_FILE, maxBytes=LOG_FILE_BYTES, backupCount=LOG_FILE_BACKUPS
            )
            os.chmod(directory / LOG_FILE, 0o640)
        except OSError as exc:
            print(
                f"kubelet-emu: cannot write the log under {directory}: {exc}; logging to stderr only", file=sys.stderr
            )
        else:
            fh.setFormatter(LogfmtFormatter())
            handlers.append(fh)
    root = logging.getLogger()
    root.handlers[:] = handlers
    root.setLevel(logging.DEBUG if verbosity > 0 else logging.INFO)
    # Third-party libraries speak only when something is wrong.
    for noisy in ("aiohttp", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Its kubeconfig warnings repeat what the agent reports itself, in one line.
    logging.getLogger("kubernetes_asyncio").setLevel(logging.ERROR)

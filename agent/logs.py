"""The agent's logging: quiet by default, one logfmt line per record on stderr.

The format and `kv` (fields for a record: `extra=kv(node=..., pod=...)`) are in common/logfmt.py,
so that the layers below the agent log the same way.
"""

from __future__ import annotations

import logging
import sys

from common.logfmt import LogfmtFormatter
from common.logfmt import kv as kv  # for callers that took kv from here


def setup(verbosity: int = 0) -> None:
    """verbosity 0: info (start, stop, problems); 1 or more: debug."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbosity > 0 else logging.INFO)
    # Third-party libraries speak only when something is wrong.
    for noisy in ("aiohttp", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Its kubeconfig warnings repeat what the agent reports itself, in one line.
    logging.getLogger("kubernetes_asyncio").setLevel(logging.ERROR)

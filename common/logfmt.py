"""Structured log records: one logfmt line per record.

Call sites pass fields with `extra=kv(node=..., pod=...)`; the formatter renders them after the
message so lines stay greppable. Any layer may log this way; agent/logs.py installs the formatter.
"""

from __future__ import annotations

import logging
import time
from typing import Any

_FIELDS = "kv_fields"


def kv(**fields: Any) -> dict[str, Any]:
    return {_FIELDS: fields}


def _quote(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n\t'):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [
            f"time={ts}.{int(record.msecs):03d}Z",
            f"level={record.levelname.lower()}",
            f"logger={record.name}",
            f"msg={_quote(record.getMessage())}",
        ]
        for key, value in getattr(record, _FIELDS, {}).items():
            parts.append(f"{key}={_quote(value)}")
        if record.exc_info:
            parts.append(f"error={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)

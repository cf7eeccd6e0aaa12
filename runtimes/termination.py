"""A terminated container's message, by the kubelet's rules (kuberuntime_container.go,
getTerminationMessage and readLastStringFromContainerLogs): what the container wrote to its
terminationMessagePath, at most 4096 bytes; with FallbackToLogsOnError, when that is empty and the
container failed, the tail of its log: the last 80 lines, at most the last 2048 bytes of them."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from runtimes.crilog import read_logs

TERMINATION_MESSAGE_MAX = 4096  # kubecontainer.MaxContainerTerminationMessageLength
TERMINATION_LOG_LINES = 80  # kubecontainer.MaxContainerTerminationMessageLogLines
TERMINATION_LOG_BYTES = 2048  # kubecontainer.MaxContainerTerminationMessageLogLength
DEFAULT_PATH = "/dev/termination-log"


def termination_message(container: Mapping[str, Any], message_file: Path, log_path: Path, exit_code: int) -> str | None:
    try:
        with open(message_file, "rb") as f:
            message = f.read(TERMINATION_MESSAGE_MAX).decode(errors="replace")
    except OSError:
        message = ""
    if not message and exit_code != 0 and container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
        tail = read_logs(str(log_path), tail_lines=TERMINATION_LOG_LINES)
        message = tail[-TERMINATION_LOG_BYTES:].decode(errors="replace")
    return message or None

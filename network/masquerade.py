"""The node's MASQUERADE rule for Pod traffic leaving the node, through the iptables command.

One rule per bridge, tagged with a comment naming the bridge, so several agents on one host
(each with its own bridge and CIDR) manage only their own rule.
"""

from __future__ import annotations

import asyncio
import shutil


class MasqueradeError(Exception):
    pass


def rule_spec(cidr: str, bridge: str) -> list[str]:
    """Traffic from the pod CIDR that leaves through anything but the bridge (so not to other Pods)."""
    return [
        "POSTROUTING",
        "-s",
        cidr,
        "!",
        "-o",
        bridge,
        "-m",
        "comment",
        "--comment",
        f"kubelet-emu pods on {bridge}",
        "-j",
        "MASQUERADE",
    ]


def iptables_binary() -> str | None:
    return shutil.which("iptables")


async def _iptables(*args: str) -> tuple[int, str]:
    binary = iptables_binary()
    if binary is None:
        raise MasqueradeError(
            "iptables is not installed; install it (apt-get install -y iptables) or turn masquerade off"
        )
    # -w: wait for the xtables lock instead of failing while another tool holds it.
    proc = await asyncio.create_subprocess_exec(
        binary, "-w", "5", "-t", "nat", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    return proc.returncode or 0, (err or out).decode(errors="replace").strip()


async def has_rule(cidr: str, bridge: str) -> bool:
    code, _ = await _iptables("-C", *rule_spec(cidr, bridge))
    return code == 0


async def ensure_rule(cidr: str, bridge: str) -> bool:
    """Add the rule unless it is there; True when it was added."""
    if await has_rule(cidr, bridge):
        return False
    code, message = await _iptables("-A", *rule_spec(cidr, bridge))
    if code != 0:
        raise MasqueradeError(f"cannot add the MASQUERADE rule for {cidr} on bridge {bridge}: {message}")
    return True


async def remove_rule(cidr: str, bridge: str) -> int:
    """Delete the rule (every copy of it); returns how many were deleted."""
    removed = 0
    while await has_rule(cidr, bridge):
        code, message = await _iptables("-D", *rule_spec(cidr, bridge))
        if code != 0:
            raise MasqueradeError(f"cannot delete the MASQUERADE rule for {cidr} on bridge {bridge}: {message}")
        removed += 1
    return removed

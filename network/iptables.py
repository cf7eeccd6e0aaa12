"""The node's iptables rules for Pod traffic, through the iptables command.

- nat POSTROUTING MASQUERADE: Pod traffic leaving the node (not via the bridge) takes the node's
  address (optional, PodNetworks(masquerade=True)).
- filter FORWARD ACCEPT in and out of the bridge: with br_netfilter loaded even traffic between
  two Pods on the bridge passes the FORWARD chain, and hosts with a DROP policy there (Docker
  sets one) would otherwise cut Pods off from each other and from the outside.

Every rule carries a comment naming the bridge, so several agents on one host (each with its own
bridge and CIDR) manage only their own rules.
"""

from __future__ import annotations

import asyncio
import shlex
import shutil
from dataclasses import dataclass


class IptablesError(Exception):
    pass


@dataclass(frozen=True)
class Rule:
    table: str
    chain: str
    match: tuple[str, ...]  # everything after the chain name

    def __str__(self) -> str:
        return f"-t {self.table} {self.chain} {' '.join(self.match)}"


def _comment(bridge: str) -> tuple[str, ...]:
    return ("-m", "comment", "--comment", f"kubelet-emu pods on {bridge}")


def masquerade_rule(cidr: str, bridge: str) -> Rule:
    """Traffic from the pod CIDR that leaves through anything but the bridge (so not to other Pods)."""
    return Rule("nat", "POSTROUTING", ("-s", cidr, "!", "-o", bridge, *_comment(bridge), "-j", "MASQUERADE"))


def forward_rules(bridge: str) -> list[Rule]:
    return [
        Rule("filter", "FORWARD", ("-i", bridge, *_comment(bridge), "-j", "ACCEPT")),
        Rule("filter", "FORWARD", ("-o", bridge, *_comment(bridge), "-j", "ACCEPT")),
    ]


# Where the agent puts rules: each is searched for rules carrying a bridge's comment.
CHAINS = (("filter", "FORWARD"), ("nat", "POSTROUTING"))


def parse_rules(table: str, listing: str, bridge: str) -> list[Rule]:
    """The rules in `iptables -t TABLE -S CHAIN` output that carry `bridge`'s comment, whatever their
    match (a MASQUERADE rule of a pod CIDR this node no longer knows, say)."""
    comment = _comment(bridge)[-1]
    rules = []
    for line in listing.splitlines():
        words = shlex.split(line)
        if len(words) < 3 or words[0] != "-A" or comment not in words:
            continue
        rules.append(Rule(table, words[1], tuple(words[2:])))
    return rules


async def rules_of(bridge: str) -> list[Rule]:
    """Every rule of `bridge` in the chains the agent uses (none when there is no iptables)."""
    if iptables_binary() is None:
        return []
    found: list[Rule] = []
    for table, chain in CHAINS:
        code, listing = await _iptables(table, "-S", chain)
        if code == 0:
            found += parse_rules(table, listing, bridge)
    return found


def iptables_binary() -> str | None:
    return shutil.which("iptables")


async def _iptables(table: str, *args: str) -> tuple[int, str]:
    binary = iptables_binary()
    if binary is None:
        raise IptablesError("no iptables: install it (apt-get install -y iptables) or turn masquerade off")
    # -w: wait for the xtables lock instead of failing while another tool holds it.
    proc = await asyncio.create_subprocess_exec(
        binary, "-w", "5", "-t", table, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    text = out if proc.returncode == 0 else (err or out)  # stderr may carry warnings on success
    return proc.returncode or 0, text.decode(errors="replace").strip()


async def has_rule(rule: Rule) -> bool:
    code, _ = await _iptables(rule.table, "-C", rule.chain, *rule.match)
    return code == 0


async def ensure_rule(rule: Rule, first: bool = False) -> bool:
    """Add the rule unless it is there (at the top of its chain when `first`, ahead of any DROP
    rules); True when it was added."""
    if await has_rule(rule):
        return False
    position = ("-I", rule.chain, "1") if first else ("-A", rule.chain)
    code, message = await _iptables(rule.table, *position, *rule.match)
    if code != 0:
        raise IptablesError(f"cannot add iptables rule {rule}: {message}")
    return True


async def remove_rule(rule: Rule) -> int:
    """Delete the rule (every copy of it); returns how many were deleted."""
    removed = 0
    while await has_rule(rule):
        code, message = await _iptables(rule.table, "-D", rule.chain, *rule.match)
        if code != 0:
            raise IptablesError(f"cannot delete iptables rule {rule}: {message}")
        removed += 1
    return removed

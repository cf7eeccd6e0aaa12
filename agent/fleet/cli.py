"""The `kubelet-emu fleet` command line: run a fleet, or `fleet ctl` one that runs."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any


def add_fleet_parser(sub: Any, default_state_dir: str) -> None:
    fleet = sub.add_parser(
        "fleet",
        help="run many emulated nodes from one process ([fleet] table); `fleet ctl` changes a node's health",
        description="kubelet-emu fleet --config F --kubeconfig K [--count N]; "
        "kubelet-emu fleet ctl --state-dir D --health not-ready NODE...",
    )
    fleet.add_argument("--config", help="agent configuration (TOML) with a [fleet] table and emulated handlers only")
    fleet.add_argument("--kubeconfig", help="a fleet credential (kubelet-emu dev-cluster fleet-kubeconfig)")
    fleet.add_argument("--count", type=int, help="number of nodes (a [fleet] without groups); overrides count")
    fleet.add_argument("--state-dir", default=default_state_dir + "-fleet", help="where the fleet keeps its state")
    fleet.add_argument("--node-ip", help="InternalIP every node advertises (default: the address toward the API)")
    fleet.add_argument("--allow-admin", action="store_true", help="run even with an admin (system:masters) credential")
    fleet.add_argument("-v", "--verbose", action="count", default=0, help="more log output (debug)")
    fsub = fleet.add_subparsers(dest="fleet_command")
    ctl = fsub.add_parser("ctl", help="make fleet nodes NotReady or silent on purpose, or ready again")
    ctl.add_argument("--state-dir", default=default_state_dir + "-fleet", help="the running fleet's --state-dir")
    ctl.add_argument(
        "--health",
        required=True,
        choices=("ready", "not-ready", "silent"),
        help="not-ready: Ready=False; silent: no heartbeats (the node goes Unknown); ready: healthy",
    )
    ctl.add_argument("nodes", nargs="+", help="node names")


def cmd_fleet(args: argparse.Namespace) -> int:
    from agent.fleet.ctl import set_health

    if args.fleet_command == "ctl":
        try:
            pid = set_health(Path(args.state_dir), args.nodes, args.health)
        except (ValueError, OSError) as exc:
            print(f"kubelet-emu fleet ctl: {exc}", file=sys.stderr)
            return 2
        print(f"{len(args.nodes)} node(s) set to {args.health} (fleet pid {pid})")
        return 0
    if not args.config or not args.kubeconfig:
        print("kubelet-emu fleet: --config and --kubeconfig are required", file=sys.stderr)
        return 2
    if args.count is not None and args.count < 0:
        print("kubelet-emu fleet: --count must be zero or more", file=sys.stderr)
        return 2

    from agent import logs
    from agent.fleet.runner import FleetOptions, run
    from agent.kube import KubeconfigError

    logs.setup(args.verbose)
    opts = FleetOptions(
        kubeconfig=args.kubeconfig,
        config_path=args.config,
        state_dir=Path(args.state_dir),
        count=args.count,
        node_ip=args.node_ip,
        allow_admin=args.allow_admin,
    )
    try:
        return asyncio.run(run(opts))
    except KubeconfigError as exc:
        print(f"kubelet-emu fleet: {exc}", file=sys.stderr)
        return 2

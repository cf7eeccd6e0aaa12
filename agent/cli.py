"""The `kubelet-emu` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
from pathlib import Path

from agent import __version__


def _default_state_dir() -> str:
    return "/var/lib/kubelet-emu" if os.geteuid() == 0 else str(Path.home() / ".local/state/kubelet-emu/agent")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kubelet-emu", description="A Kubernetes node agent that runs Pods "
                                "through the runtime handler their RuntimeClass names.")  # fmt: skip
    p.add_argument("--version", action="version", version=f"kubelet-emu {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="join the cluster as a Node and run the Pods bound to it")
    run.add_argument("--kubeconfig", required=True, help="kubeconfig with this node's identity")
    run.add_argument(
        "--bootstrap-kubeconfig",
        help="bootstrap credentials (a bootstrap token) for a client certificate when --kubeconfig is missing "
        "or its certificate expired: the agent requests one with a CSR and writes --kubeconfig (TLS bootstrap)",
    )
    run.add_argument("--node-name", default=socket.gethostname().lower(), help="Node name (default: hostname)")
    run.add_argument("--config", help="agent configuration (TOML): handlers, node labels and taints")
    run.add_argument("--state-dir", default=_default_state_dir(), help="where the agent keeps its state")
    run.add_argument("--node-ip", help="InternalIP to advertise (default: the address that routes to the API server)")
    run.add_argument(
        "--port", type=int, default=None, help="kubelet API port (overrides [kubelet_api] port; default 10250)"
    )
    run.add_argument("-v", "--verbose", action="count", default=0, help="more log output (debug)")

    from agent.bootstrap.join import add_join_parser

    add_join_parser(sub, _default_state_dir())

    from agent.fleet.cli import add_fleet_parser

    add_fleet_parser(sub, _default_state_dir())

    handlers = sub.add_parser("handlers", help="print and validate the runtime handler table")
    handlers.add_argument("--config", help="agent configuration (TOML)")

    cg = sub.add_parser("cgroups", help="the limits in force for each Pod's cgroup beside the breakdown behind them")
    cg.add_argument("pod", nargs="?", help="only this Pod, as NAMESPACE/POD")
    cg.add_argument("--json", action="store_true", help="print JSON instead of tables")
    cg.add_argument("--state-dir", default=_default_state_dir(), help="the agent's state dir")
    cg.add_argument("--config", help="agent configuration (TOML): cgroup root, driver and pod_pids_limit")

    doctor = sub.add_parser("doctor", help="check this host for what the configuration needs (like kubeadm preflight)")
    doctor.add_argument("--config", help="agent configuration (TOML); default: the built-in one")
    doctor.add_argument(
        "--for", dest="purpose", choices=("run", "demo", "tests"), default="run",
        help="what to check for: the agent (default), the demo, or the test suite",
    )  # fmt: skip
    doctor.add_argument(
        "--install", action="store_true", help="as root on Debian/Ubuntu, apt-get install the missing packages"
    )

    reset = sub.add_parser(
        "reset",
        help="remove what an agent made on this host (containers, Pod network, cgroups, state), as kubeadm reset",
    )
    reset.add_argument("--state-dir", default=_default_state_dir(), help="the agent's state dir")
    reset.add_argument("--config", help="the agent's configuration (default: what the agent recorded at start)")
    reset.add_argument("--node-name", help="the node name, for its bridge (default: what the agent recorded)")
    reset.add_argument("--force", action="store_true", help="stop an agent still running on the state dir first")
    reset.add_argument("--all", action="store_true", help="remove the image store and the state dir too")

    demo = sub.add_parser("demo", help="start the dev cluster, an agent and the examples, and show them")
    demo.add_argument("--dir", type=Path, default=None, help="cluster directory (default: the dev-cluster default)")
    demo.add_argument("--port", type=int, default=6443)
    demo.add_argument("--down", action="store_true", help="stop the demo's agent and cluster")

    dev = sub.add_parser("dev-cluster", help="a real local control plane for tests and demos")
    dsub = dev.add_subparsers(dest="dev_command", required=True)
    from devcluster.manage import default_dir

    d_up = dsub.add_parser("up", help="build if needed, start, wait until ready, print the admin kubeconfig")
    d_up.add_argument("--dir", type=Path, default=default_dir())
    d_up.add_argument("--port", type=int, default=6443, help="kube-apiserver port on 127.0.0.1")
    d_up.add_argument("--node-monitor-grace-period", default="50s")
    d_down = dsub.add_parser("down", help="stop the cluster and its processes")
    d_down.add_argument("--dir", type=Path, default=default_dir())
    d_kubectl = dsub.add_parser("kubectl", help="run kubectl against the cluster: dev-cluster kubectl -- ARGS")
    d_kubectl.add_argument("--dir", type=Path, default=default_dir())
    d_kubectl.add_argument("args", nargs=argparse.REMAINDER)
    d_up.add_argument(
        "--cluster-signing-duration", default=None, help="lifetime of certificates signed for CSRs (default 8760h)"
    )
    d_token = dsub.add_parser("token", help="bootstrap tokens, as kubeadm token")
    d_token_sub = d_token.add_subparsers(dest="token_command", required=True)
    d_token_create = d_token_sub.add_parser("create", help="make a bootstrap token and print the join command")
    d_token_create.add_argument("--dir", type=Path, default=default_dir())
    d_token_create.add_argument(
        "--ttl", default=None, help="how long the token is valid, e.g. 2h (default 24h; 0: forever)"
    )
    d_node = dsub.add_parser("node-kubeconfig", help="mint a node identity and print its kubeconfig path")
    d_node.add_argument("--dir", type=Path, default=default_dir())
    d_node.add_argument("node")
    d_fleet = dsub.add_parser(
        "fleet-kubeconfig",
        help="apply examples/fleet/rbac.yaml and mint a fleet credential (never admin); print its kubeconfig path",
    )
    d_fleet.add_argument("--dir", type=Path, default=default_dir())
    d_fleet.add_argument("--name", default="fleet", help="the credential's name (user kubelet-emu:fleet:NAME)")
    dsub.add_parser("build", help="only build (or find in the cache) the control-plane binary")
    return p


def _fail(message: str, code: int = 1) -> int:
    print(f"kubelet-emu: {message}", file=sys.stderr)
    return code


def cmd_run(args: argparse.Namespace) -> int:
    from agent import logs, preflight
    from agent.config import ConfigError, load_config
    from agent.kube import KubeconfigError
    from agent.runner import RunOptions, run

    logs.setup(args.verbose)
    from runtimes.registry import known_backends

    try:
        config = load_config(args.config, known_backends())
    except ConfigError as exc:
        return _fail(str(exc), 2)
    # The same checks as `kubelet-emu doctor`: a missing piece stops the agent in one line each.
    checks = preflight.host_checks(config, "run", with_port=False)
    failed = preflight.failures(checks)
    for check in failed:
        _fail(preflight.one_line(check))
    if failed:
        return 2
    for check in checks:
        if not check.ok:
            logging.getLogger("agent.preflight").warning(preflight.one_line(check))
    opts = RunOptions(
        config_path=args.config,
        kubeconfig=args.kubeconfig,
        node_name=args.node_name,
        config=config,
        state_dir=Path(args.state_dir),
        node_ip=args.node_ip,
        kubelet_port=args.port,
        bootstrap_kubeconfig=args.bootstrap_kubeconfig,
    )
    try:
        return asyncio.run(run(opts))
    except KubeconfigError as exc:
        return _fail(str(exc), 2)


def cmd_join(args: argparse.Namespace) -> int:
    from agent.bootstrap.join import JoinError, discover_and_write

    try:
        if not discover_and_write(args):
            return 0  # --write-only
    except JoinError as exc:
        return _fail(f"join refused: {exc}", 1)
    return cmd_run(args)


def cmd_handlers(args: argparse.Namespace) -> int:
    from agent.config import ConfigError, format_handler_table, load_config
    from runtimes.registry import known_backends

    try:
        config = load_config(args.config, known_backends())
    except ConfigError as exc:
        return _fail(str(exc), 2)
    print(format_handler_table(config))
    return 0


def cmd_cgroups(args: argparse.Namespace) -> int:
    import json

    from agent.cgroups_report import collect, format_table, pod_key
    from agent.config import ConfigError, load_config
    from cgroups.manager import CgroupError, CgroupManager
    from runtimes.registry import known_backends

    if args.pod is not None and (args.pod.count("/") != 1 or "" in args.pod.split("/")):
        return _fail(f"{args.pod!r} is not a Pod: give it as NAMESPACE/POD, e.g. default/web")
    try:
        config = load_config(args.config, known_backends())
    except ConfigError as exc:
        return _fail(str(exc), 2)
    if not os.path.isdir(args.state_dir):
        return _fail(f"state dir {args.state_dir} does not exist: pass the agent's --state-dir")
    try:
        manager = CgroupManager(root=config.node.cgroup_root, driver=config.node.cgroup_driver)
    except (CgroupError, ValueError) as exc:
        return _fail(f"cgroups unavailable: {exc}")
    try:
        reports = collect(args.state_dir, manager, args.pod, config.node.pod_pids_limit)
    except OSError as exc:
        return _fail(f"cannot read state dir {args.state_dir}: {exc}")
    if args.pod is not None and not reports:
        known = ", ".join(sorted({pod_key(r) for r in collect(args.state_dir, manager)})) or "none"
        return _fail(f"no Pod {args.pod} with a cgroup in {args.state_dir} (Pods with cgroups: {known})")
    if args.json:
        print(json.dumps(reports, indent=2))
    elif not reports:
        print(f"no Pods with cgroups in {args.state_dir}")
    else:
        print(format_table(reports))
    return 0


def cmd_reset(args: argparse.Namespace) -> int:
    from agent.config import ConfigError, load_config
    from agent.reset import reset
    from runtimes.registry import known_backends

    config = None
    if args.config:
        try:
            config = load_config(args.config, known_backends())
        except ConfigError as exc:
            return _fail(str(exc), 2)
    return asyncio.run(
        reset(
            Path(args.state_dir), config, args.node_name, default_node=socket.gethostname().lower(), force=args.force,
            remove_all=args.all, warn=lambda line: print(f"kubelet-emu reset: {line}", file=sys.stderr),
        )
    )  # fmt: skip


def cmd_dev_cluster(args: argparse.Namespace) -> int:
    from devcluster import manage

    try:
        if args.dev_command == "build":
            print(asyncio.run(manage.build()))
        elif args.dev_command == "up":
            cluster = asyncio.run(
                manage.up(
                    args.dir,
                    args.port,
                    args.node_monitor_grace_period,
                    cluster_signing_duration=args.cluster_signing_duration,
                )
            )
            print(cluster.admin_kubeconfig)
        elif args.dev_command == "down":
            if not asyncio.run(manage.down(args.dir)):
                print(f"no dev cluster was running in {args.dir}", file=sys.stderr)
        elif args.dev_command == "token":
            if manage.read_cluster(args.dir) is None:
                return _fail(f"no dev cluster is running in {args.dir}: run `kubelet-emu dev-cluster up` first")
            print(asyncio.run(manage.token_create(args.dir, args.ttl)))
        elif args.dev_command == "node-kubeconfig":
            print(asyncio.run(manage.node_kubeconfig(args.dir, args.node)))
        elif args.dev_command == "fleet-kubeconfig":
            from devcluster.fleet_credential import fleet_kubeconfig

            running = manage.read_cluster(args.dir)
            if running is None:
                return _fail(f"no dev cluster is running in {args.dir}: run `kubelet-emu dev-cluster up` first")
            print(asyncio.run(fleet_kubeconfig(running, args.name)))
        elif args.dev_command == "kubectl":
            cluster = manage.read_cluster(args.dir)
            if cluster is None:
                return _fail(f"no dev cluster is running in {args.dir}: run `kubelet-emu dev-cluster up` first")
            kargs = args.args[1:] if args.args[:1] == ["--"] else args.args
            argv, env = manage.kubectl_argv(cluster, kargs)
            os.execvpe(argv[0], argv, env)
    except manage.DevClusterError as exc:
        return _fail(str(exc))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from agent import preflight
    from agent.config import ConfigError, load_config
    from runtimes.registry import known_backends

    config_file = args.config
    if config_file is None and args.purpose in ("demo", "tests"):
        config_file = str(Path(__file__).resolve().parent.parent / "examples" / "demo" / "agent.toml")
    try:
        config = load_config(config_file, known_backends(), check_paths=False)  # the paths are checked below
    except ConfigError as exc:
        return _fail(str(exc), 2)
    checks = preflight.host_checks(config, args.purpose)
    if args.install:
        try:
            if preflight.install_missing(checks):
                checks = preflight.host_checks(config, args.purpose)
        except RuntimeError as exc:
            return _fail(str(exc))
    print(f"kubelet-emu doctor: checks for {args.purpose} (config: {config_file or 'built-in default'})")
    print(preflight.report(checks))
    failed = preflight.failures(checks)
    if failed:
        command = preflight.how_to_install(checks)
        hint = f"; install the missing packages with: {command}" if command else ""
        print(f"{len(failed)} required check(s) failed{hint}", file=sys.stderr)
        return 1
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from agent import demo
    from devcluster import manage

    directory = args.dir or manage.default_dir()
    try:
        return asyncio.run(demo.down(directory) if args.down else demo.demo(directory, args.port))
    except manage.DevClusterError as exc:
        return _fail(str(exc))


def _cmd_fleet(args: argparse.Namespace) -> int:
    from agent.fleet.cli import cmd_fleet

    return cmd_fleet(args)


# Import names that differ from the PyPI names, for the missing-package message.
_DISTRIBUTIONS = {"yaml": "PyYAML"}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {
        "run": cmd_run,
        "handlers": cmd_handlers,
        "cgroups": cmd_cgroups,
        "doctor": cmd_doctor,
        "reset": cmd_reset,
        "dev-cluster": cmd_dev_cluster,
        "demo": cmd_demo,
        "join": cmd_join,
        "fleet": _cmd_fleet,
    }
    try:
        return handlers[args.command](args)
    except ModuleNotFoundError as exc:  # an install without its dependencies: say which, not a traceback
        if not exc.name or exc.name.split(".")[0] in {"agent", "runtimes", "cgroups", "images", "network"}:
            raise
        package = _DISTRIBUTIONS.get(exc.name.split(".")[0], exc.name.split(".")[0])
        return _fail(f"the Python package {package} is missing: pip install {package} (or pip install -e .)", 2)


if __name__ == "__main__":
    sys.exit(main())

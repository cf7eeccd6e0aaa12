"""Wires the agent together for `kubelet-emu run` and stops it cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import state_lock
from agent.bootstrap.client import ensure_client_certificate
from agent.bootstrap.rotation import ClientCertRotator, managed_pki_dir
from agent.config import AgentConfig, ConfigError, load_config
from agent.events import EventRecorder
from agent.hostinfo import address_toward, read_host_info
from agent.housekeeping import Housekeeping
from agent.image_pull import image_gc_loop
from agent.kube import Kube
from agent.kubelet_api.context import KubeletAPIContext
from agent.kubelet_api.server import DEFAULT_PORT, KubeletAPIError, KubeletAPIServer, bind
from agent.kubelet_api.tls import ServingNames
from agent.node import NodeAgent
from agent.node_status import NodeFacts
from agent.pod_network import NodePodNetwork, pod_networks
from agent.pods import PodController
from agent.reset import write_node_record
from agent.tls_memory import shrink_tls_read_buffers
from common.logfmt import kv
from runtimes.process.security import node_credential_paths
from runtimes.registry import backend_class, known_backends

log = logging.getLogger("agent")

STOP_TIMEOUT = 4.0  # the whole shutdown must fit in 5 s
Service = Coroutine[Any, Any, None]  # a long-running part of the agent, run in its task group


@dataclass(frozen=True)
class RunOptions:
    kubeconfig: str
    node_name: str
    config: AgentConfig
    state_dir: Path
    node_ip: str | None = None
    kubelet_port: int | None = None  # --port: overrides [kubelet_api] port
    config_path: str | None = None  # re-read on SIGHUP
    bootstrap_kubeconfig: str | None = None  # TLS bootstrap when the kubeconfig's certificate is missing or expired


async def agent_main(node: NodeAgent, pods: PodController, services: list[Service]) -> None:
    await node.register()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(node.run(), name="node")
        tg.create_task(pods.run(), name="pods")
        for service in services:
            tg.create_task(service)


async def _remove_orphan_networks(pods: PodController) -> None:
    """After a restart: free the namespaces and addresses of Pods deleted while the agent was away."""
    await pods.pods.synced.wait()
    await pods.network.ready.wait()
    removed = await pods.network.cleanup_orphans(set(pods.workers))
    if removed:
        log.info("removed networks of deleted pods", extra=kv(count=len(removed)))


def _needs(config: AgentConfig, feature: str) -> bool:
    return any(getattr(backend_class(h.backend), feature) for h in config.handlers.values())


def attach_services(config: AgentConfig, opts: RunOptions, kube: Kube, pods: PodController) -> list[Service]:
    """The image store and the Pod network, made only once a handler's backend needs them (pyroute2
    alone costs ~10 MiB, which an emulated-only node should not pay). Returns what to run for the
    services made now (also after a SIGHUP that adds the first such handler)."""
    started: list[Service] = []
    if pods.images is None and _needs(config, "uses_images"):
        pods.images = _image_service(config, opts.state_dir)
        started.append(image_gc_loop(pods))
    if pods.network is None and _needs(config, "uses_pod_network"):
        networks = pod_networks(config.network, opts.node_name, opts.state_dir)
        if networks is not None:
            pods.network = NodePodNetwork(networks, kube, opts.node_name, config.network.pod_cidr)
            started += [pods.network.run(), _remove_orphan_networks(pods)]
    return started


def _image_service(config: AgentConfig, state_dir: Path) -> object:
    from images.service import ImageService

    settings = config.images
    return ImageService(
        state_dir / "images",
        mirrors={host: list(urls) for host, urls in settings.mirrors.items()},
        insecure_registries=set(settings.insecure_registries),
        gc_high_percent=settings.gc_high_percent,
        gc_low_percent=settings.gc_low_percent,
    )


def reload_config(opts: RunOptions, node: NodeAgent, pods: PodController, kube: Kube) -> None:
    """SIGHUP: re-read --config; a broken file is reported and the running config kept."""
    try:
        config = load_config(opts.config_path, known_backends())
    except ConfigError as exc:
        log.error("configuration not reloaded: " + str(exc))
        return
    for warning in config.warnings:
        log.warning(warning)
    for service in attach_services(config, opts, kube, pods):  # before the new handlers get backends
        pods.spawn(service)
    node.set_config(config)
    pods.set_config(config)
    pods.events.policy = config.events
    with contextlib.suppress(OSError):
        write_node_record(opts.state_dir, opts.node_name, config)
    log.info("configuration reloaded", extra=kv(handlers=",".join(sorted(config.handlers))))


async def run(opts: RunOptions) -> int:
    opts.state_dir.mkdir(parents=True, exist_ok=True)
    try:
        state_lock.acquire(opts.state_dir)  # held until the process exits
        write_node_record(opts.state_dir, opts.node_name, opts.config)  # for `kubelet-emu reset`
    except state_lock.StateDirBusyError as exc:
        log.error(str(exc))
        return 2
    except OSError as exc:
        log.error(f"cannot write to the state dir {opts.state_dir}: {exc}; make it writable or use another --state-dir")
        return 2
    shrink_tls_read_buffers()
    await ensure_client_certificate(opts.kubeconfig, opts.bootstrap_kubeconfig, opts.node_name, opts.state_dir / "pki")
    kube = await Kube.from_kubeconfig(opts.kubeconfig)
    api_settings = opts.config.kubelet_api
    api: KubeletAPIServer | None = None
    if api_settings.enabled:
        try:
            # Bound first: the Node advertises its port.
            api = KubeletAPIServer(bind(api_settings, opts.kubelet_port, opts.state_dir))
        except KubeletAPIError as exc:
            log.error(str(exc))
            await kube.close()
            return 2
    facts = NodeFacts(
        name=opts.node_name,
        host=read_host_info(str(opts.state_dir)),
        config=opts.config,
        internal_ip=opts.node_ip or address_toward(kube.host),
        kubelet_port=api.port if api else (opts.kubelet_port or DEFAULT_PORT),
    )
    node = NodeAgent(kube, facts)
    events = EventRecorder(kube, opts.node_name, policy=opts.config.events)
    pods = PodController(kube, node, opts.config, opts.state_dir, events)
    node.recovery_hooks += [pods.pods.retry_now, pods.runtime_classes.retry_now]
    pods.node_credentials = tuple(
        node_credential_paths(opts.kubeconfig, (api_settings.tls_cert_file, api_settings.tls_key_file))
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_config, opts, node, pods, kube)
    stats_path = opts.state_dir / "agent-stats.json"
    loop.add_signal_handler(signal.SIGUSR1, write_stats, stats_path, kube, pods, api)

    log.info(
        "kubelet-emu starting",
        extra=kv(node=opts.node_name, server=kube.host, handlers=",".join(opts.config.handlers), pid=os.getpid()),
    )
    for warning in opts.config.warnings:
        log.warning(warning)
    if api is not None:
        ctx = KubeletAPIContext(opts.node_name, pods, kube, opts.config, opts.state_dir)
        names = ServingNames.of(opts.node_name, facts.host.hostname, facts.internal_ip)
        try:
            await api.start(ctx, api_settings, kube, opts.kubeconfig, names)
        except KubeletAPIError as exc:
            log.error(str(exc))
            await api.close()
            await kube.close()
            return 2

    # Made only now that nothing can fail before they run: a coroutine made and dropped on an
    # early return would be reported as never awaited.
    services = attach_services(opts.config, opts, kube, pods)
    services.append(Housekeeping(pods).run())  # what belongs to no current Pod: at start, then every minute
    pki_dir = managed_pki_dir(opts.kubeconfig)
    if pki_dir is not None:  # a bootstrapped identity: renewed before it expires
        rotator = ClientCertRotator(kube, opts.kubeconfig, opts.node_name, pki_dir, opts.bootstrap_kubeconfig)
        services.append(rotator.run())
    main = asyncio.create_task(agent_main(node, pods, services), name="agent")
    stopper = asyncio.create_task(stop.wait(), name="stop")
    try:
        done, _ = await asyncio.wait({main, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if main in done:
            main.result()  # re-raise a crash
            return 1
        log.info("stopping", extra=kv(node=opts.node_name))
        main.cancel()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(main, STOP_TIMEOUT)
        return 0
    finally:
        stopper.cancel()
        if api is not None:
            await api.close()
        await pods.close()
        if pods.images is not None:
            await pods.images.close()
        if pods.network is not None:
            await pods.network.stop()
        write_stats(stats_path, kube, pods, api)
        await kube.close()


def write_stats(path: Path, kube: Kube, pods: PodController, api: KubeletAPIServer | None = None) -> None:
    """API requests made over the agent's life, for benchmarks (the /metrics endpoint comes later)."""
    stats = {
        "requests_by_verb": kube.requests_by_verb,
        "status_writes": pods.status_writes,
        "status_corrections": pods.status_corrections,
        "events_posted": pods.events.posted,
        "pod_watch_relists": pods.pods.relists,
        "pod_watch_restarts": pods.pods.watch_restarts,
    }
    if api is not None and api.authenticator is not None and api.authorizer is not None:
        # What the kubelet API's caches save: reviews sent, not requests served.
        stats["kubelet_api_token_reviews"] = api.authenticator.token_reviews
        stats["kubelet_api_access_reviews"] = api.authorizer.reviews
    path.write_text(json.dumps(stats, indent=2))

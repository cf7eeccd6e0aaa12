"""Issue 22: emulation profiles per handler ([runtimes.NAME.options] of an emulated handler).

The draws are checked as pure functions; the rest against the real control plane with a real
agent: what kubectl shows (phase, exit code, start times), what /stats/summary reports, and
whether the terminated status reaches the API before a deletion.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import uuid
from datetime import datetime

import pytest
from conftest import Kubectl, eventually, wait_node_ready

from agent.config import load_config
from devcluster import manage
from runtimes.emulated.profile import Distribution, parse_profile

SEEDED = 22


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def pod(
    name: str,
    node: str,
    runtime_class: str | None = None,
    restart_policy: str = "Always",
    containers: str = "[{name: main, image: busybox}]",
) -> str:
    rc = f"  runtimeClassName: {runtime_class}\n" if runtime_class else ""
    return (
        f"apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  nodeName: {node}\n{rc}"
        f"  restartPolicy: {restart_policy}\n  containers: {containers}\n"
    )


PROFILES = f"""
default_runtime = "plain"
[node]
max_pods = 300
[runtimes.plain]
backend = "emulated"
[runtimes.slow]
backend = "emulated"
[runtimes.slow.options]
start_latency = {{ distribution = "lognormal", median = "4s", p99 = "12s" }}
seed = {SEEDED}
[runtimes.failing]
backend = "emulated"
[runtimes.failing.options]
failure_probability = 1.0
failure_exit_code = 42
[runtimes.job]
backend = "emulated"
[runtimes.job.options]
run_time = "2s"
[runtimes.busy]
backend = "emulated"
[runtimes.busy.options]
cpu_usage = "250m"
memory_usage = "64Mi"
[runtimes.quiet]
backend = "emulated"
[runtimes.quiet.options]
final_status = false
"""


# --- pure: the distributions and the parsed profile ----------------------------------------------


def test_lognormal_draws_have_the_configured_median_and_p99():
    rng = random.Random(1)
    d = Distribution.lognormal(2.0, 10.0)
    draws = sorted(d.draw(rng) for _ in range(20000))
    assert statistics.median(draws) == pytest.approx(2.0, rel=0.05)
    assert draws[int(0.99 * len(draws))] == pytest.approx(10.0, rel=0.1)


def test_fixed_and_uniform_draws():
    rng = random.Random(1)
    assert Distribution("fixed", 1.5).draw(rng) == 1.5
    draws = [Distribution("uniform", 1.0, 3.0).draw(rng) for _ in range(1000)]
    assert 1.0 <= min(draws) < 1.1 and 2.9 < max(draws) <= 3.0


def test_every_profile_key_loads_without_warnings(tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text(
        """
[runtimes.kata]
backend = "emulated"
[runtimes.kata.options]
start_latency = { distribution = "lognormal", median = "2s", p99 = "10s" }
image_pull = { distribution = "uniform", min = "1s", max = 4 }
failure_probability = 0.05
failure_exit_code = 3
run_time = { distribution = "fixed", value = "30s" }
cpu_usage = "250m"
memory_usage = "160Mi"
final_status = false
seed = 7
"""
    )
    cfg = load_config(config)
    assert cfg.warnings == ()
    profile = parse_profile(cfg.handlers["kata"].options)
    assert profile.image_pull == Distribution("uniform", 1.0, 4.0)
    assert profile.run_time == Distribution("fixed", 30.0)
    assert profile.usage == (250, 160 * 2**20)
    assert (profile.failure_probability, profile.failure_exit_code, profile.final_status) == (0.05, 3, False)
    assert parse_profile({}).final_status is True  # the kubelet's behaviour unless asked


# --- real cluster ----------------------------------------------------------------------------------


@pytest.fixture
async def node(kubectl, start_agent):
    name = unique("p22b")
    agent = await start_agent(name, PROFILES)
    await wait_node_ready(kubectl, name)
    classes = {h: unique(f"rc-{h}") for h in ("slow", "failing", "job", "busy", "quiet")}
    await kubectl.apply(
        "\n---\n".join(
            f"apiVersion: node.k8s.io/v1\nkind: RuntimeClass\nmetadata: {{name: {rc}}}\nhandler: {h}\n"
            for h, rc in classes.items()
        )
    )
    yield name, agent, classes
    await kubectl.run("delete", "pods", "--field-selector", f"spec.nodeName={name}", "--wait=false", check=False)
    await kubectl.run("delete", "runtimeclass", *classes.values(), "--wait=false", check=False)


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _terminated(obj: dict) -> dict | None:
    statuses = obj.get("status", {}).get("containerStatuses") or []
    return (statuses[0].get("state") or {}).get("terminated") if statuses else None


@pytest.mark.cluster
async def test_lognormal_start_latency_shows_in_creation_to_running(kubectl, node):
    name, _, classes = node
    prefix = unique("slow")
    count = 200
    await kubectl.apply("---\n".join(pod(f"{prefix}-{i}", name, classes["slow"]) for i in range(count)))

    async def all_running() -> list[dict] | None:
        items = (await kubectl.json("get", "pods", "--field-selector", f"spec.nodeName={name}"))["items"]
        mine = [p for p in items if p["metadata"]["name"].startswith(prefix)]
        running = [p for p in mine if p["status"].get("phase") == "Running"]
        return running if len(running) == count else None

    pods = await eventually(all_running, timeout=120, interval=2, what=f"{count} slow Pods Running")
    # creationTimestamp and startedAt have whole seconds: over 200 Pods the truncation averages out.
    latencies = [
        (
            _time(p["status"]["containerStatuses"][0]["state"]["running"]["startedAt"])
            - _time(p["metadata"]["creationTimestamp"])
        ).total_seconds()
        for p in pods
    ]
    median = statistics.median(latencies)
    assert 4.0 * 0.8 <= median <= 4.0 * 1.2, f"median creation-to-Running {median:.2f}s, configured 4s"
    assert max(latencies) > 6.0  # a spread, not a fixed delay


@pytest.mark.cluster
async def test_failure_probability_one_fails_every_pod_with_the_exit_code(kubectl, node):
    name, _, classes = node
    pods = [unique("fail") for _ in range(3)]
    await kubectl.apply("---\n".join(pod(p, name, classes["failing"], restart_policy="Never") for p in pods))
    for p in pods:

        async def failed(p: str = p) -> dict | None:
            obj = await kubectl.get("pod", p)
            return obj if obj and obj["status"].get("phase") == "Failed" else None

        obj = await eventually(failed, timeout=30, what=f"{p} Failed")
        terminated = _terminated(obj)
        assert terminated and terminated["exitCode"] == 42 and terminated["reason"] == "Error"


@pytest.mark.cluster
async def test_run_time_makes_a_job_like_pod_succeed(kubectl, node):
    name, _, classes = node
    p = unique("job")
    await kubectl.apply(pod(p, name, classes["job"], restart_policy="OnFailure"))

    async def succeeded() -> dict | None:
        obj = await kubectl.get("pod", p)
        return obj if obj and obj["status"].get("phase") == "Succeeded" else None

    obj = await eventually(succeeded, timeout=30, what=f"{p} Succeeded")
    terminated = _terminated(obj)
    assert terminated and terminated["exitCode"] == 0 and terminated["reason"] == "Completed"
    ran = (_time(terminated["finishedAt"]) - _time(terminated["startedAt"])).total_seconds()
    assert 1.0 <= ran <= 4.0  # 2 s, timestamps in whole seconds


@pytest.mark.cluster
async def test_stats_summary_reports_the_configured_usage(kubectl, node):
    name, _, classes = node
    p = unique("busy")
    two = "[{name: a, image: busybox}, {name: b, image: busybox}]"
    await kubectl.apply(pod(p, name, classes["busy"], containers=two))

    async def reported() -> dict | None:
        summary = json.loads(await kubectl("get", "--raw", f"/api/v1/nodes/{name}/proxy/stats/summary"))
        found = [s for s in summary["pods"] if s["podRef"]["name"] == p]
        return found[0] if found and len(found[0].get("containers") or []) == 2 else None

    stats = await eventually(reported, timeout=30, what=f"{p} in /stats/summary")
    for c in stats["containers"]:
        assert c["memory"]["workingSetBytes"] == 64 * 2**20
        assert c["cpu"]["usageNanoCores"] == 250_000_000
    assert stats["memory"]["workingSetBytes"] == 128 * 2**20
    assert stats["cpu"]["usageNanoCores"] == 500_000_000


async def _phases_until_deleted(kubectl: Kubectl, pod_name: str) -> list[str]:
    """Delete the Pod while watching it; the phases the API server showed after the deletion began."""
    argv, env = manage.kubectl_argv(
        kubectl.cluster, ["get", "pod", pod_name, "--watch", "--output-watch-events", "-o", "json"]
    )
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    assert proc.stdout is not None
    decoder = json.JSONDecoder()
    buffer, phases, deleting = "", [], False
    try:
        async with asyncio.timeout(60):
            await asyncio.sleep(1)  # the watch is open
            await kubectl("delete", "pod", pod_name, "--wait=false")
            while True:
                chunk = await proc.stdout.read(65536)
                assert chunk, "kubectl watch ended before the Pod was deleted"
                buffer += chunk.decode()
                while buffer.strip():
                    try:
                        event, end = decoder.raw_decode(buffer.lstrip())
                    except json.JSONDecodeError:
                        break
                    buffer = buffer.lstrip()[end:]
                    obj = event["object"]
                    deleting = deleting or bool(obj["metadata"].get("deletionTimestamp"))
                    if deleting:
                        terminated = _terminated(obj)
                        phases.append(f"{event['type']}:{obj['status'].get('phase')}:{bool(terminated)}")
                    if event["type"] == "DELETED":
                        return phases
    finally:
        proc.kill()
        await proc.wait()


@pytest.mark.cluster
async def test_final_status_write_is_made_by_default_and_skipped_on_request(kubectl, node):
    name, _, classes = node
    written, skipped = unique("final"), unique("nofinal")
    await kubectl.apply(pod(written, name) + "---\n" + pod(skipped, name, classes["quiet"]))
    for p in (written, skipped):
        await eventually(lambda p=p: _running(kubectl, p), timeout=30, what=f"{p} Running")

    # Default (the kubelet's way): the terminated containers and the final phase reach the API.
    phases = await _phases_until_deleted(kubectl, written)
    assert any(e.startswith("MODIFIED:") and e.endswith(":True") for e in phases), phases
    # final_status = false: from Running straight to gone, one write less per Pod.
    phases = await _phases_until_deleted(kubectl, skipped)
    assert not any(e.endswith(":True") for e in phases), phases
    assert phases[-1].startswith("DELETED:Running"), phases


async def _running(kubectl: Kubectl, p: str) -> dict | None:
    obj = await kubectl.get("pod", p)
    return obj if obj and obj["status"].get("phase") == "Running" else None

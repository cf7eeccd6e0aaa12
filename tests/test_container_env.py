"""Container environments: envFrom, env, $(VAR) expansion, the downward API, ConfigMaps and Secrets."""

from __future__ import annotations

import base64
import os
from typing import Any

import pytest

from runtimes.container_env import EnvError, container_env, expand

NODE, HOST_IP, POD_IP = "node-a", "10.0.0.5", "10.244.1.7"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


OBJECTS: dict[tuple[str, str, str], dict[str, Any]] = {
    ("ConfigMap", "default", "app"): {"data": {"MODE": "prod", "LEVEL": "3", "1ST": "one", "BAD=KEY": "x"}},
    ("ConfigMap", "default", "other"): {"data": {"MODE": "test"}},
    ("Secret", "default", "db"): {"metadata": {"name": "db"}, "data": {"user": b64("admin"), "pass": b64("s3cr3t")}},
}


class DictLookup:
    """container_env's lookup callback answered from a dict, recording what was asked. This file
    unit-tests the pure environment rules; tests/test_process.py reads real ConfigMaps and Secrets
    through the real API."""

    def __init__(self, objects: dict[tuple[str, str, str], dict[str, Any]] = OBJECTS):
        self.objects = objects
        self.calls: list[tuple[str, str, str]] = []

    async def __call__(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        self.calls.append((kind, namespace, name))
        return self.objects.get((kind, namespace, name))


def make_pod(container: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "web-0",
            "namespace": "default",
            "uid": "1234-abcd",
            "labels": {"app": "web", "tier": "front"},
            "annotations": {"note": 'say "hi"\n'},
        },
        "spec": {"nodeName": NODE, "serviceAccountName": "builder", "containers": [container], **spec},
    }


async def env_of(container: dict[str, Any], api: DictLookup | None = None, **kwargs: Any) -> dict[str, str]:
    pod = kwargs.pop("pod", None) or make_pod(container)
    pairs = await container_env(pod, container, api or DictLookup(), NODE, HOST_IP, POD_IP, **kwargs)
    assert len(pairs) == len({k for k, _ in pairs}), "names must be unique"
    return dict(pairs)


# --- expansion -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$(A)", "a"),
        ("x-$(A)-$(B)-y", "x-a-b b-y"),
        ("$(MISSING)", "$(MISSING)"),
        ("$$(A)", "$(A)"),
        ("$$$(A)", "$a"),
        ("$$", "$"),
        ("cost: 5$", "cost: 5$"),
        ("$x$(A)", "$xa"),
        ("$(A", "$(A"),
        ("$()", "$()"),
        ("$(A)$(A)", "aa"),
        ("no refs", "no refs"),
        ("", ""),
    ],
)
def test_expand_like_kubernetes(text: str, expected: str) -> None:
    assert expand(text, {"A": "a", "B": "b b"}) == expected


def test_expand_does_not_recurse() -> None:
    assert expand("$(A)", {"A": "$(B)", "B": "b"}) == "$(B)"


# --- envFrom and env -----------------------------------------------------------------------------


async def test_env_from_then_env_overrides_and_prefix() -> None:
    container = {
        "name": "c",
        "envFrom": [{"configMapRef": {"name": "app"}}, {"prefix": "DB_", "secretRef": {"name": "db"}}],
        "env": [{"name": "MODE", "value": "debug"}, {"name": "PLAIN", "value": "1"}],
    }
    pairs = await container_env(make_pod(container), container, DictLookup(), NODE, HOST_IP, POD_IP)
    env = dict(pairs)
    assert env["MODE"] == "debug"  # env wins over envFrom
    assert env["LEVEL"] == "3"
    assert env["DB_user"] == "admin" and env["DB_pass"] == "s3cr3t"
    assert env["1ST"] == "one"  # valid since relaxed env var names (1.34+)
    assert "BAD=KEY" not in env  # could never be an environment variable
    assert [k for k, _ in pairs][-1] == "PLAIN"


async def test_later_env_from_overrides_earlier() -> None:
    container = {"name": "c", "envFrom": [{"configMapRef": {"name": "app"}}, {"configMapRef": {"name": "other"}}]}
    assert (await env_of(container))["MODE"] == "test"


async def test_value_expansion_uses_vars_defined_so_far() -> None:
    container = {
        "name": "c",
        "envFrom": [{"configMapRef": {"name": "app"}}],
        "env": [
            {"name": "URL", "value": "http://$(HOST):$(PORT)/$(MODE)"},
            {"name": "HOST", "value": "db"},
            {"name": "PORT", "value": "5432"},
            {"name": "URL2", "value": "http://$(HOST):$(PORT)"},
            {"name": "ESCAPED", "value": "$$(HOST)"},
            {"name": "EMPTY", "value": ""},
            {"name": "HOST", "value": "$(HOST)-2"},
        ],
    }
    env = await env_of(container)
    assert env["URL"] == "http://$(HOST):$(PORT)/prod"  # HOST and PORT came later
    assert env["URL2"] == "http://db:5432"
    assert env["ESCAPED"] == "$(HOST)"
    assert env["EMPTY"] == ""
    assert env["HOST"] == "db-2"


async def test_missing_objects() -> None:
    missing_cm = {"name": "c", "envFrom": [{"configMapRef": {"name": "x"}}]}
    with pytest.raises(EnvError, match=r'^configmap "x" not found$') as info:
        await env_of(missing_cm)
    assert info.value.reason == "CreateContainerConfigError"

    missing_secret = {"name": "c", "env": [{"name": "P", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k"}}}]}
    with pytest.raises(EnvError, match=r'^secret "nope" not found$'):
        await env_of(missing_secret)

    optional = {
        "name": "c",
        "envFrom": [{"configMapRef": {"name": "x", "optional": True}}, {"secretRef": {"name": "y", "optional": True}}],
        "env": [
            {"name": "A", "valueFrom": {"configMapKeyRef": {"name": "x", "key": "k", "optional": True}}},
            {"name": "B", "valueFrom": {"secretKeyRef": {"name": "db", "key": "nokey", "optional": True}}},
            {"name": "C", "value": "c"},
        ],
    }
    assert await env_of(optional) == {"C": "c"}


async def test_key_refs() -> None:
    container = {
        "name": "c",
        "env": [
            {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "app", "key": "MODE"}}},
            {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "pass"}}},
            {"name": "USER", "valueFrom": {"secretKeyRef": {"name": "db", "key": "user"}}},
        ],
    }
    api = DictLookup()
    assert await env_of(container, api) == {"MODE": "prod", "PASSWORD": "s3cr3t", "USER": "admin"}
    assert api.calls == [("ConfigMap", "default", "app"), ("Secret", "default", "db")]  # each object read once

    bad_key = {"name": "c", "env": [{"name": "P", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}}]}
    with pytest.raises(EnvError, match=r"^couldn't find key password in Secret default/db$"):
        await env_of(bad_key)
    bad_cm_key = {"name": "c", "env": [{"name": "P", "valueFrom": {"configMapKeyRef": {"name": "app", "key": "k"}}}]}
    with pytest.raises(EnvError, match=r"^couldn't find key k in ConfigMap default/app$"):
        await env_of(bad_cm_key)


async def test_secret_bytes_survive() -> None:
    raw = b"\xff\x00bin"
    api = DictLookup({("Secret", "default", "bin"): {"data": {"k": base64.b64encode(raw).decode()}}})
    container = {"name": "c", "env": [{"name": "B", "valueFrom": {"secretKeyRef": {"name": "bin", "key": "k"}}}]}
    assert os.fsencode((await env_of(container, api))["B"]) == raw


async def test_lookup_errors_become_env_errors() -> None:
    async def broken(kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        raise RuntimeError("apiserver unavailable")

    container = {"name": "c", "envFrom": [{"configMapRef": {"name": "app"}}]}
    with pytest.raises(EnvError, match="apiserver unavailable"):
        await container_env(make_pod(container), container, broken, NODE, HOST_IP, POD_IP)


# --- downward API ------------------------------------------------------------------------------


def field(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}}


async def test_field_refs() -> None:
    container = {
        "name": "c",
        "env": [
            field("NAME", "metadata.name"),
            field("NS", "metadata.namespace"),
            field("UID", "metadata.uid"),
            field("APP", "metadata.labels['app']"),
            field("NOLABEL", "metadata.labels['nope']"),
            field("NOTE", "metadata.annotations['note']"),
            field("LABELS", "metadata.labels"),
            field("ANNOTATIONS", "metadata.annotations"),
            field("NODE", "spec.nodeName"),
            field("SA", "spec.serviceAccountName"),
            field("HOST_IP", "status.hostIP"),
            field("HOST_IPS", "status.hostIPs"),
            field("POD_IP", "status.podIP"),
            field("POD_IPS", "status.podIPs"),
            {"name": "GREETING", "value": "$(NAME) on $(NODE)"},
        ],
    }
    env = await env_of(container)
    assert env == {
        "NAME": "web-0",
        "NS": "default",
        "UID": "1234-abcd",
        "APP": "web",
        "NOLABEL": "",
        "NOTE": 'say "hi"\n',
        "LABELS": 'app="web"\ntier="front"',
        "ANNOTATIONS": 'note="say \\"hi\\"\\n"',
        "NODE": NODE,
        "SA": "builder",
        "HOST_IP": HOST_IP,
        "HOST_IPS": HOST_IP,
        "POD_IP": POD_IP,
        "POD_IPS": POD_IP,
        "GREETING": f"web-0 on {NODE}",
    }
    dual = await env_of(
        {"name": "c", "env": [field("IPS", "status.podIPs"), field("HIPS", "status.hostIPs")]},
        pod_ips=[POD_IP, "fd00::7"],
        host_ips=[HOST_IP, "fd00::5"],
    )
    assert dual == {"IPS": f"{POD_IP},fd00::7", "HIPS": f"{HOST_IP},fd00::5"}


async def test_bad_field_refs() -> None:
    with pytest.raises(EnvError, match=r"field label not supported: spec\.bogus"):
        await env_of({"name": "c", "env": [field("X", "spec.bogus")]})
    with pytest.raises(EnvError, match="unsupported pod version: v2"):
        await env_of({"name": "c", "env": [{"name": "X", "valueFrom": {"fieldRef": {"apiVersion": "v2"}}}]})


def res(name: str, resource: str, divisor: str | None = None, container: str | None = None) -> dict[str, Any]:
    ref: dict[str, Any] = {"resource": resource}
    if divisor is not None:
        ref["divisor"] = divisor
    if container is not None:
        ref["containerName"] = container
    return {"name": name, "valueFrom": {"resourceFieldRef": ref}}


async def test_resource_field_refs() -> None:
    container = {
        "name": "app",
        "resources": {
            "limits": {"cpu": "1500m", "memory": "64Mi"},
            "requests": {"cpu": "250m", "memory": "32Mi", "ephemeral-storage": "1Gi"},
        },
        "env": [
            res("CPU_LIMIT", "limits.cpu"),  # 1.5 cores, rounded up
            res("CPU_LIMIT_M", "limits.cpu", "1m"),
            res("CPU_REQ", "requests.cpu", "100m"),  # 2.5 -> 3
            res("CPU_REQ_CORES", "requests.cpu"),  # 0.25 -> 1
            res("MEM_LIMIT", "limits.memory"),
            res("MEM_LIMIT_MI", "limits.memory", "1Mi"),
            res("MEM_REQ_M", "requests.memory", "1M"),  # 33554432 / 1e6 -> 34
            res("EPH_REQ_GI", "requests.ephemeral-storage", "1Gi"),
            res("EPH_LIMIT", "limits.ephemeral-storage"),  # no limit: node allocatable
            res("SIDE_MEM", "limits.memory", "1Mi", container="side"),  # no limit: node allocatable
        ],
    }
    side = {"name": "side", "resources": {"requests": {"memory": "8Mi"}}}
    pod = make_pod(container)
    pod["spec"]["containers"].append(side)
    allocatable = {"cpu": "4", "memory": "8Gi", "ephemeral-storage": "100Gi", "pods": "110"}
    env = await env_of(container, pod=pod, node_allocatable=allocatable)
    assert env == {
        "CPU_LIMIT": "2",
        "CPU_LIMIT_M": "1500",
        "CPU_REQ": "3",
        "CPU_REQ_CORES": "1",
        "MEM_LIMIT": str(64 * 1024 * 1024),
        "MEM_LIMIT_MI": "64",
        "MEM_REQ_M": "34",
        "EPH_REQ_GI": "1",
        "EPH_LIMIT": str(100 * 1024**3),
        "SIDE_MEM": str(8 * 1024),
    }


async def test_resource_defaults_to_allocatable_and_errors() -> None:
    container = {"name": "c", "env": [res("CPU", "limits.cpu"), res("MEM", "limits.memory", "1Gi")]}
    env = await env_of(container, node_allocatable={"cpu": "3500m", "memory": "7Gi"})
    assert env == {"CPU": "4", "MEM": "7"}
    assert await env_of({"name": "c", "env": [res("CPU", "requests.cpu", "1m")]}) == {"CPU": "0"}

    with pytest.raises(EnvError, match=r"unsupported container resource : limits\.gpu"):
        await env_of({"name": "c", "env": [res("X", "limits.gpu")]})
    with pytest.raises(EnvError, match="container ghost not found"):
        await env_of({"name": "c", "env": [res("X", "limits.cpu", container="ghost")]})


# --- Service variables (issue 17 item 7) -------------------------------------------------------


def svc(name: str, namespace: str, ip: str, *ports: dict[str, Any], kind: str = "ClusterIP") -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"clusterIP": ip, "type": kind, "ports": list(ports)},
    }


SERVICES = [
    svc("kubernetes", "default", "10.96.0.1", {"name": "https", "port": 443}),
    svc("db", "default", "10.96.0.9", {"port": 5432}),
    svc("web-front", "shop", "10.96.3.4", {"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}),
    svc("headless", "shop", "None", {"port": 80}),
    svc("ext", "shop", "10.96.3.5", {"port": 80}, kind="ExternalName"),
    svc("v6", "shop", "fd00::5", {"port": 8080}),
]


async def list_services(namespace: str) -> list[dict[str, Any]]:
    return [s for s in SERVICES if s["metadata"]["namespace"] == namespace]


async def test_service_links_like_the_kubelet() -> None:
    container = {"name": "c", "env": [{"name": "V6_SERVICE_PORT", "value": "mine"},
                                      {"name": "URL", "value": "$(WEB_FRONT_PORT)/x"}]}  # fmt: skip
    pod = make_pod(container)
    pod["metadata"]["namespace"] = "shop"
    env = await env_of(container, pod=pod, services=list_services)
    assert env["KUBERNETES_SERVICE_HOST"] == "10.96.0.1" and env["KUBERNETES_SERVICE_PORT_HTTPS"] == "443"
    assert "DB_SERVICE_HOST" not in env  # another namespace's
    assert env["WEB_FRONT_SERVICE_HOST"] == "10.96.3.4" and env["WEB_FRONT_SERVICE_PORT"] == "80"
    assert env["WEB_FRONT_PORT_53_UDP"] == "udp://10.96.3.4:53" and env["WEB_FRONT_PORT_53_UDP_PROTO"] == "udp"
    assert env["WEB_FRONT_PORT_80_TCP_ADDR"] == "10.96.3.4" and env["WEB_FRONT_PORT_80_TCP_PORT"] == "80"
    assert not [k for k in env if k.startswith(("HEADLESS", "EXT_"))]
    assert env["V6_PORT"] == "tcp://[fd00::5]:8080" and env["V6_SERVICE_PORT"] == "mine"
    assert env["URL"] == "tcp://10.96.3.4:80/x"

    pod["spec"]["enableServiceLinks"] = False
    env = await env_of(container, pod=pod, services=list_services)
    assert sorted(k for k in env if k.endswith("_SERVICE_HOST")) == ["KUBERNETES_SERVICE_HOST"]
    assert env["URL"] == "$(WEB_FRONT_PORT)/x"

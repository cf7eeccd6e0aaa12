"""A container's environment, built the way the kubelet builds it.

Follows pkg/kubelet/kubelet_pods.go makeEnvironmentVariables (v1.36) and the $(VAR) expansion of
third_party/forked/golang/expansion, with the Service variables of getServiceEnvVarMap and
pkg/kubelet/envvars (FOO_SERVICE_HOST, FOO_PORT_80_TCP_ADDR...). Only the IPs go into variables:
nothing here ever sends traffic to a ClusterIP.
"""

from __future__ import annotations

import base64
import binascii
from collections import ChainMap
from collections.abc import Awaitable, Callable, Iterable, Mapping
from decimal import ROUND_CEILING, Decimal
from typing import TYPE_CHECKING, Any

from cgroups.quantity import parse_quantity
from runtimes.base import CreateContainerConfigError, ServiceLister

if TYPE_CHECKING:
    from runtimes.base import BackendContext

JSON = dict[str, Any]
Lookup = Callable[[str, str, str], Awaitable[JSON | None]]  # (kind, namespace, name) -> object or None

MASTER_SERVICE_NAMESPACE = "default"  # the kubelet's masterServiceNamespace
MASTER_SERVICES = ("kubernetes",)


class EnvError(CreateContainerConfigError):
    """The environment cannot be built; the container waits with reason CreateContainerConfigError."""


# --- $(VAR) expansion --------------------------------------------------------------------------


def expand(text: str, env: Mapping[str, str]) -> str:
    """Expand $(VAR) references as Kubernetes does: defined -> value, undefined -> left as is,
    `$$` -> `$`, any other `$x` kept, an unclosed `$(` kept."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c != "$" or i + 1 == n:  # a lone trailing "$" is copied like any other character
            out.append(c)
            i += 1
            continue
        nxt = text[i + 1]
        if nxt == "$":
            out.append("$")
            i += 2
        elif nxt == "(":
            close = text.find(")", i + 2)
            if close < 0:
                out.append("$(")
                i += 2
            else:
                name = text[i + 2 : close]
                out.append(env.get(name, f"$({name})"))
                i = close + 1
        else:
            out.append("$" + nxt)
            i += 2
    return "".join(out)


# --- Service variables ---------------------------------------------------------------------------


def _env_name(name: str) -> str:
    return name.replace("-", "_").upper()  # envvars.makeEnvVariableName


def _ip_set(service: JSON) -> bool:
    ip = (service.get("spec") or {}).get("clusterIP") or ""
    return ip not in ("", "None")


def service_env_vars(services: Iterable[JSON]) -> dict[str, str]:
    """envvars.FromServices: for each Service with a cluster IP, FOO_SERVICE_HOST, FOO_SERVICE_PORT
    (the first port), FOO_SERVICE_PORT_<NAME> for named ports, and Docker's link variables."""
    env: dict[str, str] = {}
    for service in services:
        spec = service.get("spec") or {}
        ports = spec.get("ports") or []
        if not _ip_set(service) or not ports:
            continue
        ip = spec["clusterIP"]
        prefix = _env_name(service["metadata"]["name"])
        env[f"{prefix}_SERVICE_HOST"] = ip
        env[f"{prefix}_SERVICE_PORT"] = str(ports[0].get("port"))
        for port in ports:
            if port.get("name"):
                env[f"{prefix}_SERVICE_PORT_{_env_name(port['name'])}"] = str(port.get("port"))
        host = f"[{ip}]" if ":" in ip else ip  # net.JoinHostPort
        for i, port in enumerate(ports):
            protocol = port.get("protocol") or "TCP"
            number = str(port.get("port"))
            url = f"{protocol.lower()}://{host}:{number}"
            if i == 0:
                env[f"{prefix}_PORT"] = url
            port_prefix = f"{prefix}_PORT_{number}_{protocol.upper()}"
            env[port_prefix] = url
            env[f"{port_prefix}_PROTO"] = protocol.lower()
            env[f"{port_prefix}_PORT"] = number
            env[f"{port_prefix}_ADDR"] = ip
    return env


async def service_env(pod: JSON, services: ServiceLister) -> dict[str, str]:
    """getServiceEnvVarMap: the master Services (`kubernetes` in `default`) always, and with
    enableServiceLinks (the default) every Service of the Pod's namespace, which wins over a
    master Service of the same name. ExternalName and headless Services give nothing."""
    namespace = pod.get("metadata", {}).get("namespace") or "default"
    links = (pod.get("spec") or {}).get("enableServiceLinks") is not False
    master = await services(MASTER_SERVICE_NAMESPACE)
    own = (master if namespace == MASTER_SERVICE_NAMESPACE else await services(namespace)) if links else []

    def usable(service: JSON) -> bool:
        return _ip_set(service) and (service.get("spec") or {}).get("type") != "ExternalName"

    chosen: dict[str, JSON] = {}
    for service in master:
        if usable(service) and service["metadata"]["name"] in MASTER_SERVICES:
            chosen[service["metadata"]["name"]] = service
    for service in own:
        if usable(service):
            chosen[service["metadata"]["name"]] = service
    kept = list(chosen.values())
    return service_env_vars(sorted(kept, key=lambda s: s["metadata"]["name"]))


def env_context(context: BackendContext) -> dict[str, Any]:
    """container_env's keyword arguments from what the agent hands a backend."""
    return {
        "node_allocatable": context.allocatable() if context.allocatable is not None else None,
        "services": context.services,
    }


# --- the environment -----------------------------------------------------------------------------


def _is_env_var_name(name: str) -> bool:
    # Since RelaxedEnvironmentVariableValidation (GA in 1.34) the apiserver accepts any printable
    # ASCII but '=' and the 1.36 kubelet copies envFrom keys unchecked; we still drop names that
    # could not be put in an environment at all.
    return bool(name) and all(" " <= ch <= "~" for ch in name) and "=" not in name


async def container_env(
    pod: JSON,
    container: JSON,
    lookup: Lookup,
    node_name: str,
    host_ip: str,
    pod_ip: str,
    *,
    node_allocatable: Mapping[str, str] | None = None,
    host_ips: list[str] | None = None,
    pod_ips: list[str] | None = None,
    services: ServiceLister | None = None,
) -> list[tuple[str, str]]:
    """The container's environment as (name, value) pairs: envFrom first, then env in order, then
    the Service variables (when `services` is given) the spec does not set itself. $(VAR) in env
    values may refer to Service variables too, as in the kubelet."""
    namespace = pod.get("metadata", {}).get("namespace") or "default"
    objects: dict[tuple[str, str], JSON | None] = {}  # one lookup per object, as the kubelet caches them

    async def get(kind: str, name: str) -> JSON | None:
        if (kind, name) not in objects:
            try:
                objects[kind, name] = await lookup(kind, namespace, name)
            except EnvError:
                raise
            except Exception as e:  # an API error: the kubelet reports it as the message
                raise EnvError(str(e) or type(e).__name__) from e
        return objects[kind, name]

    def not_found(kind: str, name: str) -> EnvError:
        return EnvError(f'{kind.lower()} "{name}" not found')  # the apiserver's NotFound wording

    svc_env: dict[str, str] = {}
    if services is not None:
        try:
            svc_env = await service_env(pod, services)
        except EnvError:
            raise
        except Exception as e:
            raise EnvError(str(e) or type(e).__name__) from e

    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix") or ""
        for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            ref = source.get(key)
            if ref is None:
                continue
            obj = await get(kind, ref.get("name", ""))
            if obj is None:
                if ref.get("optional"):
                    continue
                raise not_found(kind, ref.get("name", ""))
            for k, v in _data(obj, kind).items():
                if _is_env_var_name(prefix + k):
                    env[prefix + k] = v

    for var in container.get("env") or []:
        name = var["name"]
        value = var.get("value") or ""
        source = var.get("valueFrom")
        if value:
            value = expand(value, ChainMap(env, svc_env))
        elif source:
            if "fieldRef" in source:
                value = _field_ref(source["fieldRef"], pod, node_name, host_ip, pod_ip, host_ips, pod_ips)
            elif "resourceFieldRef" in source:
                value = _resource_field_ref(source["resourceFieldRef"], pod, container, node_allocatable or {})
            else:
                kind, ref = (
                    ("ConfigMap", source["configMapKeyRef"])
                    if "configMapKeyRef" in source
                    else ("Secret", source.get("secretKeyRef"))
                )
                if ref is None:
                    raise EnvError(f"env {name}: unsupported valueFrom {sorted(source)}")
                obj = await get(kind, ref.get("name", ""))
                if obj is None:
                    if ref.get("optional"):
                        continue
                    raise not_found(kind, ref.get("name", ""))
                data = _data(obj, kind)
                if ref.get("key") not in data:
                    if ref.get("optional"):
                        continue
                    raise EnvError(f"couldn't find key {ref.get('key')} in {kind} {namespace}/{ref.get('name')}")
                value = data[ref["key"]]
        env[name] = value
    return list(env.items()) + [(k, v) for k, v in svc_env.items() if k not in env]


def _data(obj: JSON, kind: str) -> dict[str, str]:
    """The object's `data` as strings; Secret values arrive base64-encoded."""
    data = obj.get("data") or {}
    if kind != "Secret":
        return {k: str(v) for k, v in data.items()}
    out = {}
    for k, v in data.items():
        try:
            raw = base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError, TypeError):
            raise EnvError(f"secret {obj.get('metadata', {}).get('name')}: key {k} is not valid base64") from None
        # surrogateescape keeps non-UTF-8 bytes intact: os.fsencode turns them back into the same bytes.
        out[k] = raw.decode("utf-8", "surrogateescape")
    return out


# --- downward API: fieldRef ----------------------------------------------------------------------


def _field_ref(
    ref: JSON,
    pod: JSON,
    node_name: str,
    host_ip: str,
    pod_ip: str,
    host_ips: list[str] | None,
    pod_ips: list[str] | None,
) -> str:
    version = ref.get("apiVersion") or "v1"
    if version != "v1":
        raise EnvError(f"unsupported pod version: {version}")
    path = ref.get("fieldPath", "")
    meta = pod.get("metadata", {})
    spec = pod.get("spec", {})
    if path.endswith("']") and "['" in path and not path.startswith("['"):
        base, key = path[:-2].split("['", 1)
        if base == "metadata.labels":
            return (meta.get("labels") or {}).get(key, "")
        if base == "metadata.annotations":
            return (meta.get("annotations") or {}).get(key, "")
        raise EnvError(f"field label does not support subscript: {path}")
    pod_ips = pod_ips or ([pod_ip] if pod_ip else [])
    host_ips = host_ips or ([host_ip] if host_ip else [])
    match path:
        case "metadata.name":
            return meta.get("name", "")
        case "metadata.namespace":
            return meta.get("namespace", "")
        case "metadata.uid":
            return meta.get("uid", "")
        case "metadata.labels":
            return _format_map(meta.get("labels") or {})
        case "metadata.annotations":
            return _format_map(meta.get("annotations") or {})
        case "spec.nodeName" | "spec.host":
            return node_name or spec.get("nodeName", "")
        case "spec.serviceAccountName":
            return spec.get("serviceAccountName", "")
        case "status.hostIP":
            return host_ips[0] if host_ips else ""
        case "status.hostIPs":
            return ",".join(host_ips)
        case "status.podIP":
            return pod_ips[0] if pod_ips else ""
        case "status.podIPs":
            return ",".join(pod_ips)
        case "spec.restartPolicy" | "spec.schedulerName" | "status.phase":
            raise EnvError(f"unsupported fieldPath: {path}")  # valid for volumes only
    raise EnvError(f"field label not supported: {path}")


def _format_map(m: Mapping[str, str]) -> str:
    """fieldpath.FormatMap: sorted `key="value"` lines, values quoted like Go's %q."""
    return "\n".join(f"{k}={_go_quote(m[k])}" for k in sorted(m))


_GO_ESCAPES = {'"': '\\"', "\\": "\\\\", "\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r"}
_GO_ESCAPES |= {"\t": "\\t", "\v": "\\v"}


def _go_quote(s: str) -> str:
    out = []
    for ch in s:
        if ch in _GO_ESCAPES:
            out.append(_GO_ESCAPES[ch])
        elif ch.isprintable():
            out.append(ch)
        elif ord(ch) < 0x80:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) <= 0xFFFF:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    return '"' + "".join(out) + '"'


# --- downward API: resourceFieldRef ------------------------------------------------------------


def _resource_field_ref(ref: JSON, pod: JSON, container: JSON, allocatable: Mapping[str, str]) -> str:
    spec = pod.get("spec", {})
    target, merge = container, True
    if name := ref.get("containerName"):
        # Like the kubelet, only regular containers get node-allocatable defaults for their limits.
        found = [(c, True) for c in spec.get("containers") or [] if c.get("name") == name]
        found += [(c, False) for c in spec.get("initContainers") or [] if c.get("name") == name]
        if not found:
            raise EnvError(f"container {name} not found")
        target, merge = found[0]
    resources = target.get("resources") or {}
    limits = dict(resources.get("limits") or {})
    if merge:
        for res in ("cpu", "memory", "ephemeral-storage"):
            if _quantity(limits.get(res, 0)) == 0 and res in allocatable:
                limits[res] = allocatable[res]
    pools = {"limits": limits, "requests": resources.get("requests") or {}}

    resource = ref.get("resource", "")
    kind, _, res = resource.partition(".")
    supported = res in ("cpu", "memory", "ephemeral-storage") or res.startswith("hugepages-")
    if kind not in pools or not supported:
        raise EnvError(f"unsupported container resource : {resource}")
    value = _quantity(pools[kind].get(res, 0))
    divisor = _quantity(ref.get("divisor") or 0) or Decimal(1)
    if res == "cpu":  # Quantity.MilliValue() rounds up, then the quotient is rounded up
        return str(_ceil_div(_ceil(value * 1000), _ceil(divisor * 1000)))
    return str(_ceil_div(_ceil(value), _ceil(divisor)))  # Quantity.Value() rounds up as well


def _quantity(value: Any) -> Decimal:
    try:
        return parse_quantity(value)
    except ValueError as e:
        raise EnvError(str(e)) from None


def _ceil(d: Decimal) -> int:
    return int(d.to_integral_value(rounding=ROUND_CEILING))


def _ceil_div(a: int, b: int) -> int:
    if b <= 0:
        raise EnvError("resourceFieldRef divisor must be positive")
    return -(-a // b)

"""Unit tests of the OCI runtime spec generation (runtimes/oci/spec.py): pure, no runc, no root."""

from __future__ import annotations

from typing import Any

import pytest

from cgroups.resources import ResourceConfig, container_resource_config
from runtimes.base import CreateContainerConfigError
from runtimes.oci.spec import (
    ALL_CAPABILITIES,
    DEFAULT_CAPABILITIES,
    MASKED_PATHS,
    READONLY_PATHS,
    HostVolume,
    PodNamespaces,
    SpecInput,
    build_spec,
    capabilities,
    host_capabilities,
    hosts_file,
    merge_env,
    pod_hostname,
    process_args,
    resolv_conf,
)

PASSWD = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001:app:/home/app:/bin/sh\n"
GROUP = "root:x:0:\napp:x:1001:\nwheel:x:10:app,other\naudio:x:29:other\nstaff:x:50:\n"
NS = PodNamespaces(network="/run/netns/p", ipc="/proc/9/ns/ipc", uts="/proc/9/ns/uts", pid="/proc/9/ns/pid")


def pod(spec: dict[str, Any] | None = None, **meta: Any) -> dict:
    return {
        "metadata": {"name": "web", "namespace": "team", "uid": "u-1", **meta},
        "spec": {"containers": [], **(spec or {})},
    }


def make(container: dict | None = None, pod_spec: dict | None = None, **overrides: Any) -> SpecInput:
    values: dict[str, Any] = {
        "pod": pod(pod_spec),
        "container": {"name": "c", "image": "busybox", **(container or {})},
        "image_config": {"Cmd": ["sh"]},
        "env": [],
        "rootfs": "/b/rootfs",
        "hostname": "web",
        "cgroups_path": "/kubepods/podu-1/c",
        "resources": ResourceConfig(),
        "namespaces": NS,
        "volumes": {},
        "etc_files": {
            "/etc/hosts": "/p/etc/hosts",
            "/etc/hostname": "/p/etc/hostname",
            "/etc/resolv.conf": "/p/etc/resolv.conf",
        },
        "shm_path": "/p/shm",
        "passwd": PASSWD,
        "group": GROUP,
        "handler_name": "runc",
    }
    values.update(overrides)
    return SpecInput(**values)


def mount(spec: dict, destination: str) -> dict:
    found = [m for m in spec["mounts"] if m["destination"] == destination]
    assert len(found) == 1, f"{destination}: {found}"
    return found[0]


# --- command and args ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "args", "want"),
    [
        (None, None, ["/entry", "--flag", "default"]),  # image Entrypoint + Cmd
        (["/bin/app"], None, ["/bin/app"]),  # command replaces Entrypoint and drops Cmd
        (["/bin/app"], ["x"], ["/bin/app", "x"]),
        (None, ["x", "y"], ["/entry", "--flag", "x", "y"]),  # args alone replace Cmd
    ],
)
def test_command_and_args_resolve_against_entrypoint_and_cmd(command, args, want) -> None:
    image = {"Entrypoint": ["/entry", "--flag"], "Cmd": ["default"]}
    container = {k: v for k, v in (("command", command), ("args", args)) if v is not None}
    assert process_args(container, image, {}) == want


def test_cmd_only_image_and_args_replace_it() -> None:
    assert process_args({}, {"Cmd": ["sh", "-c", "x"]}, {}) == ["sh", "-c", "x"]
    assert process_args({"args": ["echo", "hi"]}, {"Cmd": ["sh"]}, {}) == ["echo", "hi"]


def test_command_expands_container_env_only() -> None:
    argv = process_args({"command": ["echo", "$(A)", "$(B)", "$$(A)"]}, {}, {"A": "1"})
    assert argv == ["echo", "1", "$(B)", "$(A)"]


def test_no_command_at_all_is_a_config_error() -> None:
    with pytest.raises(CreateContainerConfigError, match="no command"):
        build_spec(make(image_config={}))


# --- environment -----------------------------------------------------------------------------------


def test_env_merges_image_then_container_which_wins() -> None:
    env = merge_env(["PATH=/img/bin", "A=image", "B=image", "EMPTY"], [("A", "ctr"), ("C", "ctr")], "web")
    assert env == ["PATH=/img/bin", "HOSTNAME=web", "A=ctr", "B=image", "EMPTY=", "C=ctr"]


def test_env_has_a_default_path() -> None:
    spec = build_spec(make(env=[("X", "1")]))
    assert spec["process"]["env"][0].startswith("PATH=/usr/local/sbin")
    assert "X=1" in spec["process"]["env"] and "HOSTNAME=web" in spec["process"]["env"]


# --- working directory and user --------------------------------------------------------------------


def test_cwd_from_working_dir_then_image_then_root() -> None:
    assert (
        build_spec(make({"workingDir": "/w"}, image_config={"Cmd": ["x"], "WorkingDir": "/i"}))["process"]["cwd"]
        == "/w"
    )
    assert build_spec(make(image_config={"Cmd": ["x"], "WorkingDir": "/i"}))["process"]["cwd"] == "/i"
    assert build_spec(make())["process"]["cwd"] == "/"


def user_of(**kw: Any) -> dict:
    return build_spec(make(**kw))["process"]["user"]


def test_user_defaults_to_root() -> None:
    assert user_of() == {"uid": 0, "gid": 0}


def test_run_as_user_container_over_pod_and_primary_group_from_passwd() -> None:
    assert user_of(pod_spec={"securityContext": {"runAsUser": 5, "runAsGroup": 6}}) == {"uid": 5, "gid": 6}
    got = user_of(container={"securityContext": {"runAsUser": 1000}}, pod_spec={"securityContext": {"runAsUser": 5}})
    assert got == {"uid": 1000, "gid": 1001, "additionalGids": [10]}  # app's group, and wheel lists app


def test_image_user_numeric_and_named() -> None:
    assert user_of(image_config={"Cmd": ["x"], "User": "7:8"}) == {"uid": 7, "gid": 8}
    assert user_of(image_config={"Cmd": ["x"], "User": "app"}) == {"uid": 1000, "gid": 1001, "additionalGids": [10]}
    assert user_of(image_config={"Cmd": ["x"], "User": "app:staff"}) == {
        "uid": 1000,
        "gid": 50,
        "additionalGids": [10],
    }  # supplementary groups are those /etc/group lists the user in, as runc computes them)


def test_image_user_unknown_name_is_a_config_error() -> None:
    with pytest.raises(CreateContainerConfigError, match="'ghost' is not in the image's /etc/passwd"):
        user_of(image_config={"Cmd": ["x"], "User": "ghost"})


def test_run_as_user_overrides_image_user() -> None:
    assert user_of(image_config={"Cmd": ["x"], "User": "app"}, container={"securityContext": {"runAsUser": 42}}) == {
        "uid": 42,
        "gid": 0,
    }


def test_supplemental_groups_and_fs_group() -> None:
    got = user_of(pod_spec={"securityContext": {"runAsUser": 5, "supplementalGroups": [100, 101], "fsGroup": 2000}})
    assert got == {"uid": 5, "gid": 0, "additionalGids": [100, 101, 2000]}


def test_run_as_non_root() -> None:
    with pytest.raises(CreateContainerConfigError, match="runAsNonRoot and image will run as root"):
        user_of(container={"securityContext": {"runAsNonRoot": True}})
    with pytest.raises(CreateContainerConfigError, match="non-numeric user"):
        user_of(container={"securityContext": {"runAsNonRoot": True}}, image_config={"Cmd": ["x"], "User": "app"})
    assert user_of(container={"securityContext": {"runAsNonRoot": True, "runAsUser": 9}})["uid"] == 9


# --- capabilities and privileges -------------------------------------------------------------------


def test_default_capabilities_in_every_set() -> None:
    caps = build_spec(make())["process"]["capabilities"]
    assert caps["bounding"] == caps["effective"] == caps["permitted"] == list(DEFAULT_CAPABILITIES)
    assert "CAP_SYS_ADMIN" not in caps["bounding"] and "CAP_NET_RAW" in caps["bounding"]


@pytest.mark.parametrize(
    ("add", "drop", "check"),
    [
        (["NET_ADMIN"], ["NET_RAW"], lambda c: "CAP_NET_ADMIN" in c and "CAP_NET_RAW" not in c),
        ([], ["ALL"], lambda c: c == []),
        (["CHOWN"], ["ALL"], lambda c: c == ["CAP_CHOWN"]),
        (["ALL"], [], lambda c: c == list(ALL_CAPABILITIES)),
        (["ALL"], ["CHOWN"], lambda c: "CAP_CHOWN" not in c and len(c) == len(ALL_CAPABILITIES) - 1),
        (["CAP_SYS_TIME"], [], lambda c: c[-1] == "CAP_SYS_TIME"),  # the CAP_ prefix is accepted too
    ],
)
def test_capabilities_add_and_drop(add, drop, check) -> None:
    assert check(capabilities({"capabilities": {"add": add, "drop": drop}}, privileged=False, host=ALL_CAPABILITIES))


def test_privileged_and_all_get_the_hosts_own_capabilities() -> None:
    # containerd grants the runtime's own set: a host without CAP_SYS_RESOURCE (bit 24) in its
    # bounding set gives none, and runc never fails with "unable to apply caps".
    status = "Name:\tx\nCapInh:\t0000000000000000\nCapPrm:\t000001fffeffffff\nCapEff:\t000001fffeffffff\n"
    status += "CapBnd:\t000001fffeffffff\nCapAmb:\t0000000000000000\n"
    host = host_capabilities(status)
    assert host == [c for c in ALL_CAPABILITIES if c != "CAP_SYS_RESOURCE"]
    assert host_capabilities(status.replace("CapEff:\t000001fffeffffff", "CapEff:\t0000000000000001")) == ["CAP_CHOWN"]
    assert capabilities({}, privileged=True, host=host) == host
    assert capabilities({"capabilities": {"add": ["ALL"]}}, privileged=False, host=host) == host
    assert "CAP_SYS_RESOURCE" in capabilities({"capabilities": {"add": ["SYS_RESOURCE"]}}, privileged=False, host=host)
    assert capabilities({}, privileged=True) == host_capabilities()


def test_privileged_refused_unless_the_handler_allows_it() -> None:
    with pytest.raises(CreateContainerConfigError, match="privileged containers are not allowed on runtime handler"):
        build_spec(make({"securityContext": {"privileged": True}}))
    spec = build_spec(make({"securityContext": {"privileged": True}}, allow_privileged=True))
    assert spec["process"]["capabilities"]["bounding"] == host_capabilities()
    assert "maskedPaths" not in spec["linux"] and "readonlyPaths" not in spec["linux"]
    assert "ro" not in mount(spec, "/sys")["options"]
    # The host's devices made in a /dev of its own, as containerd does: never a bind of the host's
    # /dev, where runc would make the termination log's mount point.
    assert mount(spec, "/dev")["type"] == "tmpfs"
    null = next(d for d in spec["linux"]["devices"] if d["path"] == "/dev/null")
    assert (null["type"], null["major"], null["minor"]) == ("c", 1, 3)
    assert not any(d["path"].startswith("/dev/pts/") for d in spec["linux"]["devices"])
    assert spec["linux"]["resources"]["devices"] == [{"allow": True, "access": "rwm"}]


def test_termination_message_path() -> None:
    assert mount(build_spec(make(termination_log="/r/tl")), "/dev/termination-log")["source"] == "/r/tl"
    spec = build_spec(make({"terminationMessagePath": "/tmp/why"}, termination_log="/r/tl"))
    assert mount(spec, "/tmp/why")["options"] == ["rbind", "rw"]


def test_seccomp_unconfined_by_default_runtime_default_and_localhost() -> None:
    assert "seccomp" not in build_spec(make())["linux"]
    runtime_default = {"seccompProfile": {"type": "RuntimeDefault"}}
    seccomp = build_spec(make(pod_spec={"securityContext": runtime_default}))["linux"]["seccomp"]
    assert seccomp["defaultAction"] == "SCMP_ACT_ALLOW"
    denied = {n for rule in seccomp["syscalls"] if rule["action"] == "SCMP_ACT_ERRNO" for n in rule["names"]}
    assert {"mount", "unshare", "setns", "keyctl", "kexec_load", "reboot", "ptrace", "clone3"} <= denied
    clone_rules = [r for r in seccomp["syscalls"] if r["names"] == ["clone"]]
    assert len(clone_rules) == 7 and all(r["args"][0]["op"] == "SCMP_CMP_MASKED_EQ" for r in clone_rules)
    # A capability the container holds keeps its syscalls; the container's type wins over the Pod's.
    with_admin = {**runtime_default, "capabilities": {"add": ["SYS_ADMIN"]}}
    seccomp = build_spec(make({"securityContext": with_admin}))["linux"]["seccomp"]
    names = {n for rule in seccomp["syscalls"] for n in rule["names"]}
    assert "mount" not in names and "clone" not in names and "keyctl" in names
    unconfined = {"securityContext": {"seccompProfile": {"type": "Unconfined"}}}
    assert "seccomp" not in build_spec(make(unconfined, {"securityContext": runtime_default}))["linux"]
    localhost = {"securityContext": {"seccompProfile": {"type": "Localhost", "localhostProfile": "p.json"}}}
    profile = {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": []}
    assert build_spec(make(localhost, localhost_seccomp=profile))["linux"]["seccomp"] == profile
    with pytest.raises(CreateContainerConfigError, match=r"'p.json' \(Localhost\) is not on this node"):
        build_spec(make(localhost))
    assert "seccomp" not in build_spec(make({"securityContext": {"privileged": True, **runtime_default}},
                                            allow_privileged=True))["linux"]  # fmt: skip


def test_unprivileged_masked_and_readonly_paths_and_devices() -> None:
    spec = build_spec(make())
    assert spec["linux"]["maskedPaths"] == list(MASKED_PATHS)
    assert spec["linux"]["readonlyPaths"] == list(READONLY_PATHS)
    assert "/proc/kcore" in MASKED_PATHS and "/proc/sys" in READONLY_PATHS
    assert spec["linux"]["resources"]["devices"] == [{"allow": False, "access": "rwm"}]


def test_no_new_privileges_only_when_escalation_is_disallowed() -> None:
    assert build_spec(make({"securityContext": {"allowPrivilegeEscalation": False}}))["process"]["noNewPrivileges"]
    assert not build_spec(make())["process"]["noNewPrivileges"]


def test_read_only_root_filesystem() -> None:
    spec = build_spec(make({"securityContext": {"readOnlyRootFilesystem": True}}))
    assert spec["root"] == {"path": "/b/rootfs", "readonly": True}
    assert "ro" in mount(spec, "/etc/hosts")["options"]
    spec = build_spec(make())
    assert spec["root"]["readonly"] is False and "rw" in mount(spec, "/etc/hosts")["options"]


# --- mounts ----------------------------------------------------------------------------------------


def test_standard_mounts() -> None:
    spec = build_spec(make())
    assert mount(spec, "/proc")["type"] == "proc"
    assert "ro" in mount(spec, "/sys")["options"]
    assert mount(spec, "/dev")["type"] == "tmpfs"
    assert mount(spec, "/dev/pts")["type"] == "devpts"
    assert mount(spec, "/dev/mqueue")["type"] == "mqueue"
    assert mount(spec, "/dev/shm") == {
        "destination": "/dev/shm",
        "type": "bind",
        "source": "/p/shm",
        "options": ["rbind", "rw"],
    }
    for name in ("hosts", "hostname", "resolv.conf"):
        assert mount(spec, f"/etc/{name}")["source"] == f"/p/etc/{name}"
    assert mount(build_spec(make(shm_path=None)), "/dev/shm")["type"] == "tmpfs"


POD_VOLUMES = [
    {"name": "cache", "emptyDir": {}},
    {"name": "cfg", "configMap": {"name": "app"}},
    {"name": "host", "hostPath": {"path": "/var/log"}},
    {"name": "claim", "persistentVolumeClaim": {"claimName": "x"}},
]
HOST_VOLUMES = {"cache": HostVolume("/p/volumes/cache"), "cfg": HostVolume("/p/volumes/cfg", read_only=True)}


def test_volume_mounts_bind_with_read_only_and_sub_path() -> None:
    container = {
        "volumeMounts": [
            {"name": "cache", "mountPath": "/cache"},
            {"name": "cache", "mountPath": "/ro", "readOnly": True, "subPath": "part"},
            {"name": "cfg", "mountPath": "/etc/app"},
        ]
    }
    spec = build_spec(make(container, {"volumes": POD_VOLUMES}, volumes=HOST_VOLUMES))
    assert mount(spec, "/cache") == {
        "destination": "/cache",
        "type": "bind",
        "source": "/p/volumes/cache",
        "options": ["rbind", "rprivate", "rw"],
    }
    assert mount(spec, "/ro")["source"] == "/p/volumes/cache/part" and "ro" in mount(spec, "/ro")["options"]
    assert "ro" in mount(spec, "/etc/app")["options"]  # configMap volumes are always read-only


def test_host_path_refused_unless_the_handler_allows_it() -> None:
    container = {"volumeMounts": [{"name": "host", "mountPath": "/logs"}]}
    with pytest.raises(CreateContainerConfigError, match="volume 'host' is a hostPath, which runtime handler 'runc'"):
        build_spec(make(container, {"volumes": POD_VOLUMES}, volumes=HOST_VOLUMES))
    spec = build_spec(
        make(
            container,
            {"volumes": POD_VOLUMES},
            allow_host_path=True,
            volumes={**HOST_VOLUMES, "host": HostVolume("/var/log")},
        )
    )
    assert mount(spec, "/logs")["source"] == "/var/log"


def test_unsupported_or_unknown_volumes_are_config_errors() -> None:
    with pytest.raises(CreateContainerConfigError, match="persistentVolumeClaim"):
        build_spec(
            make(
                {"volumeMounts": [{"name": "claim", "mountPath": "/d"}]}, {"volumes": POD_VOLUMES}, volumes=HOST_VOLUMES
            )
        )
    with pytest.raises(CreateContainerConfigError, match="names no volume"):
        build_spec(make({"volumeMounts": [{"name": "nope", "mountPath": "/d"}]}, {"volumes": POD_VOLUMES}))
    with pytest.raises(CreateContainerConfigError, match="subPath"):
        build_spec(
            make(
                {"volumeMounts": [{"name": "cache", "mountPath": "/d", "subPath": "../x"}]},
                {"volumes": POD_VOLUMES},
                volumes=HOST_VOLUMES,
            )
        )


# --- namespaces, cgroups, resources ----------------------------------------------------------------


def ns_of(spec: dict) -> dict:
    return {n["type"]: n.get("path") for n in spec["linux"]["namespaces"]}


def test_namespaces_pod_shared_network_ipc_uts_own_pid_and_mount() -> None:
    spec = build_spec(make())
    assert ns_of(spec) == {"mount": None, "pid": None, "ipc": NS.ipc, "network": NS.network, "uts": NS.uts}
    assert spec["hostname"] == "web"


def test_share_process_namespace_joins_the_pod_pid_namespace() -> None:
    assert ns_of(build_spec(make(pod_spec={"shareProcessNamespace": True})))["pid"] == NS.pid


def test_host_network_ipc_pid_leave_those_namespaces_out() -> None:
    spec = build_spec(make(pod_spec={"hostNetwork": True, "hostIPC": True, "hostPID": True}))
    assert ns_of(spec) == {"mount": None}
    assert "hostname" not in spec


def test_cgroups_path_and_resources() -> None:
    container = {"resources": {"requests": {"cpu": "250m"}, "limits": {"cpu": "500m", "memory": "64Mi"}}}
    spec = build_spec(make(container, resources=container_resource_config(container)))
    assert spec["linux"]["cgroupsPath"] == "/kubepods/podu-1/c"
    resources = spec["linux"]["resources"]
    assert resources["cpu"] == {"shares": 256, "quota": 50000, "period": 100000}
    assert resources["memory"] == {"limit": 64 * 2**20, "swap": 64 * 2**20}
    assert "memory" not in build_spec(make())["linux"]["resources"]


def test_oom_score_adj_by_qos_class() -> None:
    gib = 2**30
    guaranteed = {"name": "c", "resources": {"limits": {"cpu": "1", "memory": "1Gi"}}}
    burstable = {"name": "c", "resources": {"requests": {"memory": "1Gi"}}}
    best_effort = {"name": "c"}
    for container, want in ((guaranteed, -997), (burstable, 750), (best_effort, 1000)):
        spec = build_spec(make(container, {"containers": [container]}, node_memory=4 * gib))
        assert spec["process"]["oomScoreAdj"] == want
    huge = {"name": "c", "resources": {"requests": {"memory": "8Gi"}}}
    assert build_spec(make(huge, {"containers": [huge]}, node_memory=4 * gib))["process"]["oomScoreAdj"] == 2
    cpu_only = {"name": "c", "resources": {"requests": {"cpu": "1"}}}
    assert build_spec(make(cpu_only, {"containers": [cpu_only]}, node_memory=4 * gib))["process"]["oomScoreAdj"] == 999


def test_sysctls_and_annotations() -> None:
    spec = build_spec(
        make(
            pod_spec={"securityContext": {"sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}]}},
            annotations={"io.kubernetes.pod.name": "web"},
        )
    )
    assert spec["linux"]["sysctl"] == {"net.ipv4.ip_unprivileged_port_start": "0"}
    assert spec["annotations"] == {"io.kubernetes.pod.name": "web"}
    assert spec["ociVersion"].startswith("1.")


# --- /etc files ------------------------------------------------------------------------------------


def test_hostname_is_spec_hostname_or_pod_name() -> None:
    assert pod_hostname(pod()) == "web"
    assert pod_hostname(pod({"hostname": "h1"})) == "h1"
    assert len(pod_hostname(pod(name="x" * 80))) == 63


def test_hosts_file_has_pod_ip_and_aliases() -> None:
    text = hosts_file(pod({"hostAliases": [{"ip": "10.1.1.1", "hostnames": ["a", "b"]}]}), ["10.0.0.5"], "web")
    assert text.startswith("# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n")
    assert "10.0.0.5\tweb\n" in text and "10.1.1.1\ta\tb\n" in text
    assert "127.0.1.1\tweb\n" in hosts_file(pod(), [], "web")


HOST_RESOLV = "# generated\nnameserver 10.0.0.2\nnameserver 10.0.0.3\nsearch corp.example\noptions ndots:2 rotate\n"


def test_resolv_conf_from_host_with_dns_config_merged() -> None:
    text = resolv_conf(
        pod(
            {
                "dnsConfig": {
                    "nameservers": ["1.1.1.1"],
                    "searches": ["a.example"],
                    "options": [{"name": "ndots", "value": "5"}, {"name": "edns0"}],
                }
            }
        ),
        HOST_RESOLV,
    )
    assert text == (
        "nameserver 10.0.0.2\nnameserver 10.0.0.3\nnameserver 1.1.1.1\n"
        "search corp.example a.example\noptions ndots:5 rotate edns0\n"
    )


def test_resolv_conf_dns_policy_none_uses_only_dns_config() -> None:
    text = resolv_conf(pod({"dnsPolicy": "None", "dnsConfig": {"nameservers": ["9.9.9.9"]}}), HOST_RESOLV)
    assert text == "nameserver 9.9.9.9\n"


def test_oom_score_adj_kept_at_the_hosts_floor() -> None:
    """Without CAP_SYS_RESOURCE runc cannot lower oom_score_adj below its own: a Guaranteed
    container gets the floor instead of -997 (and `runc create` does not fail)."""
    guaranteed = {"resources": {"limits": {"cpu": "1", "memory": "64Mi"}}}
    inp = make(guaranteed)
    inp.pod["spec"]["containers"] = [inp.container]
    assert build_spec(inp)["process"]["oomScoreAdj"] == -997
    floored = make(guaranteed, oom_score_adj_floor=0)
    floored.pod["spec"]["containers"] = [floored.container]
    assert build_spec(floored)["process"]["oomScoreAdj"] == 0
    best_effort = make(oom_score_adj_floor=0)
    best_effort.pod["spec"]["containers"] = [best_effort.container]
    assert build_spec(best_effort)["process"]["oomScoreAdj"] == 1000


def test_update_resources_for_an_in_place_resize() -> None:
    from cgroups.resources import ResourceConfig
    from runtimes.oci.spec import update_resources

    config = ResourceConfig(cpu_shares=1024, cpu_quota=100000, cpu_period=100000, memory_limit=256 * 2**20)
    assert update_resources(config) == {
        "cpu": {"shares": 1024, "quota": 100000, "period": 100000},
        "memory": {"limit": 256 * 2**20, "swap": 256 * 2**20},
    }
    # A limit that goes away is written as -1 (unlimited): an absent field would keep the old one.
    assert update_resources(ResourceConfig(cpu_shares=2)) == {
        "cpu": {"shares": 2, "quota": -1, "period": 100000},
        "memory": {"limit": -1, "swap": -1},
    }

"""Unit tests for agent.config: native keys, containerd/CRI-O imports, precedence, errors, warnings."""

from __future__ import annotations

import dataclasses
import os
import stat
from decimal import Decimal
from pathlib import Path

import pytest

from agent.config import (
    DEFAULT_BACKENDS,
    AgentConfig,
    ConfigError,
    Handler,
    NodeSettings,
    Taint,
    cpu_millis,
    format_handler_table,
    load_config,
    memory_bytes,
    parse_quantity,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "agent-config.toml"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def executable(path: Path) -> Path:
    write(path, "#!/bin/sh\nexit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def bin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A PATH holding only fake runc and crun, so PATH look-ups do not depend on the host."""
    d = tmp_path / "bin"
    executable(d / "runc")
    executable(d / "crun")
    monkeypatch.setenv("PATH", str(d))
    return d


@pytest.fixture
def empty_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "nobin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "nobin"))


def load_error(path: Path, **kwargs: object) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(path, **kwargs)  # type: ignore[arg-type]
    message = str(exc.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------
# Built-in default and native keys


def test_no_file_gives_built_in_default() -> None:
    cfg = load_config(None)
    assert cfg.source is None
    assert cfg.default_runtime == "default"
    assert cfg.missing_handler == "fail"
    assert cfg.warnings == ()
    assert cfg.handlers == {"default": Handler(name="default", backend="emulated", source="<built-in>")}
    assert cfg.node == NodeSettings(labels={}, taints=())


def test_every_native_key(tmp_path: Path) -> None:
    runc = executable(tmp_path / "sbin" / "runc")
    cfg_file = write(
        tmp_path / "agent.toml",
        f"""
default_runtime = "runc"
missing_handler = "retry"

[node]
labels = {{ "example.com/zone" = "a", "example.com/rack" = "r1" }}
taints = [
  {{ key = "example.com/x", value = "y", effect = "NoSchedule" }},
  {{ key = "example.com/evict", effect = "NoExecute" }},
]
max_pods = 250
handler_labels = false
pod_pids_limit = 4096

[node.reserved]
cpu = "1500m"
memory = "1.5Gi"

[runtimes.runc]
backend = "oci"
runtime_path = "{runc}"
runtime_root = "/run/kubelet-emu/runc"
runtime_args = ["--debug", "--log-format=json"]
allow_host_path = true
allow_privileged = true

[runtimes.runc.features]
user_namespaces = true
recursive_read_only_mounts = true

[runtimes.runc.options]
systemd_cgroup = true
nested = {{ a = [1, 2] }}

[runtimes.fast]
backend = "emulated"
""",
    )
    cfg = load_config(cfg_file)
    assert cfg.warnings == ()
    assert cfg.source == str(cfg_file)
    assert cfg.default_runtime == "runc"
    assert cfg.missing_handler == "retry"
    assert cfg.node == NodeSettings(
        labels={"example.com/zone": "a", "example.com/rack": "r1"},
        taints=(
            Taint("example.com/x", "y", "NoSchedule"),
            Taint("example.com/evict", "", "NoExecute"),
        ),
        max_pods=250,
        handler_labels=False,
        pod_pids_limit=4096,
        reserved_cpu_millis=1500,
        reserved_memory_bytes=1536 * 1024 * 1024,
    )
    assert cfg.handlers["runc"] == Handler(
        name="runc",
        backend="oci",
        runtime_path=str(runc),
        runtime_root="/run/kubelet-emu/runc",
        runtime_args=("--debug", "--log-format=json"),
        allow_host_path=True,
        allow_privileged=True,
        user_namespaces=True,
        recursive_read_only_mounts=True,
        options={"systemd_cgroup": True, "nested": {"a": [1, 2]}},
        source=str(cfg_file),
    )
    assert cfg.handlers["fast"] == Handler(name="fast", backend="emulated", source=str(cfg_file))


def test_defaults_for_omitted_keys(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path / "a.toml", '[runtimes.fast]\nbackend = "emulated"\n'))
    assert cfg.default_runtime is None
    assert cfg.missing_handler == "fail"
    assert cfg.node == NodeSettings(labels={}, taints=(), max_pods=110, handler_labels=True, pod_pids_limit=-1)
    assert cfg.node.reserved_cpu_millis == 0 and cfg.node.reserved_memory_bytes == 0
    h = cfg.handlers["fast"]
    assert (h.runtime_path, h.runtime_root, h.runtime_args, h.options) == (None, None, (), {})
    assert not (h.allow_host_path or h.allow_privileged or h.user_namespaces or h.recursive_read_only_mounts)


def test_taints_as_array_of_tables_and_numeric_reserved(tmp_path: Path) -> None:
    cfg = load_config(
        write(
            tmp_path / "a.toml",
            """
[node.reserved]
cpu = 2
memory = 1000000
[[node.taints]]
key = "a"
effect = "PreferNoSchedule"
""",
        )
    )
    assert cfg.node.taints == (Taint("a", "", "PreferNoSchedule"),)
    assert (cfg.node.reserved_cpu_millis, cfg.node.reserved_memory_bytes) == (2000, 1_000_000)


def test_runtime_path_is_checked_for_any_backend(tmp_path: Path) -> None:
    tool = executable(tmp_path / "tool")
    cfg = load_config(write(tmp_path / "a.toml", f'[runtimes.p]\nbackend = "process"\nruntime_path = "{tool}"\n'))
    assert cfg.handlers["p"].runtime_path == str(tool)
    missing = tmp_path / "nope"
    cfg_file = write(tmp_path / "b.toml", f'[runtimes.p]\nbackend = "process"\nruntime_path = "{missing}"\n')
    assert "does not exist" in load_error(cfg_file)


def test_bare_runtime_path_is_looked_up_on_path(tmp_path: Path, bin_dir: Path) -> None:
    cfg = load_config(write(tmp_path / "a.toml", '[runtimes.runc]\nbackend = "oci"\nruntime_path = "runc"\n'))
    assert cfg.handlers["runc"].runtime_path == str(bin_dir / "runc")


def test_plugin_backends(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "a.toml", '[runtimes.wasm]\nbackend = "wasmtime"\n')
    cfg = load_config(cfg_file, known_backends=[*DEFAULT_BACKENDS, "wasmtime"])
    assert cfg.handlers["wasm"].backend == "wasmtime"
    assert 'unknown backend "wasmtime"' in load_error(cfg_file)


def test_example_file_loads_without_warnings(tmp_path: Path) -> None:
    runc = executable(tmp_path / "runc")
    text = EXAMPLE.read_text()
    assert '"/usr/sbin/runc"' in text
    cfg = load_config(write(tmp_path / "agent-config.toml", text.replace("/usr/sbin/runc", str(runc))))
    assert cfg.warnings == ()
    assert cfg.default_runtime == "fast"
    assert {n: h.backend for n, h in cfg.handlers.items()} == {"fast": "emulated", "procs": "process", "runc": "oci"}
    assert cfg.handlers["runc"].runtime_path == str(runc)


def test_config_objects_are_frozen_and_hashable() -> None:
    cfg = load_config(None)
    handler = cfg.handlers["default"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        handler.backend = "oci"  # type: ignore[misc]
    assert hash(handler) == hash(Handler(name="default", backend="emulated", source="<built-in>"))
    assert hash(Handler("x", "oci", options={"a": 1})) == hash(Handler("x", "oci", options={"b": 2}))
    assert Handler("x", "oci", options={"a": 1}) != Handler("x", "oci", options={"b": 2})
    assert isinstance(hash(cfg), int)
    assert dataclasses.asdict(cfg)["handlers"]["default"]["backend"] == "emulated"


# ---------------------------------------------------------------------------------------------
# Imports: containerd v2/v3 and CRI-O with drop-ins


CONTAINERD_V2 = """
version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
oom_score = -999
disabled_plugins = []

[grpc]
  address = "/run/containerd/containerd.sock"
  max_recv_message_size = 16777216

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.9"
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    discard_unpacked_layers = true
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      pod_annotations = []
      privileged_without_host_devices = false
      base_runtime_spec = ""
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        Root = "/run/containerd/runc"
        SystemdCgroup = true
        NoPivotRoot = false
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.plain]
      snapshotter = "native"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kata]
      runtime_type = "io.containerd.kata.v2"
      runtime_path = "{kata}"
      privileged_without_host_devices = true
      pod_annotations = ["io.katacontainers.*"]
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kata.options]
        ConfigPath = "/opt/kata/share/defaults/kata-containers/configuration.toml"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runsc]
      runtime_type = "io.containerd.runsc.v1"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runsc.options]
        TypeUrl = "io.containerd.runsc.v1.options"
        BinaryName = "{runsc}"

[plugins."io.containerd.internal.v1.opt"]
  path = "/opt/containerd"

[metrics]
  address = "127.0.0.1:1338"
"""

CONTAINERD_V3 = """
version = 3
root = '/var/lib/containerd'
imports = ['/etc/containerd/conf.d/*.toml']

[grpc]
  address = '/run/containerd/containerd.sock'

[plugins]
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = 'overlayfs'
    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = 'registry.k8s.io/pause:3.10'

  [plugins.'io.containerd.cri.v1.runtime']
    enable_selinux = false
    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = 'crun'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes]
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
          runtime_type = 'io.containerd.runc.v2'
          sandboxer = 'podsandbox'
          [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
            SystemdCgroup = false
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.crun]
          runtime_type = 'io.containerd.runc.v2'
          [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.crun.options]
            BinaryName = '{crun}'
            Root = '/run/containerd/crun'
    [plugins.'io.containerd.cri.v1.runtime'.cni]
      bin_dirs = ['/opt/cni/bin']
"""


def test_containerd_v2_import(tmp_path: Path, bin_dir: Path) -> None:
    runc, kata, runsc = (executable(tmp_path / "opt" / n) for n in ("runc", "kata-shim", "runsc"))
    ctr = write(tmp_path / "containerd" / "config.toml", CONTAINERD_V2.format(runc=runc, kata=kata, runsc=runsc))
    agent = write(tmp_path / "agent.toml", f'import = ["{ctr}"]\n')
    cfg = load_config(agent)
    assert cfg.warnings == ()  # the many unused containerd keys are not reported
    assert cfg.default_runtime == "runc"
    assert cfg.handlers == {
        "runc": Handler("runc", "oci", str(runc), "/run/containerd/runc", source=str(ctr)),
        # no runtime_type and no binary: runc shim default, runc from PATH
        "plain": Handler("plain", "oci", str(bin_dir / "runc"), source=str(ctr)),
        "kata": Handler("kata", "oci", str(kata), source=str(ctr)),
        "runsc": Handler("runsc", "oci", str(runsc), source=str(ctr)),
    }


def test_containerd_v3_import(tmp_path: Path, bin_dir: Path) -> None:
    crun = executable(tmp_path / "opt" / "crun")
    ctr = write(tmp_path / "config.toml", CONTAINERD_V3.format(crun=crun))
    cfg = load_config(write(tmp_path / "agent.toml", f'import = ["{ctr}"]\n'))
    assert cfg.warnings == ()
    assert cfg.default_runtime == "crun"
    assert cfg.handlers == {
        "runc": Handler("runc", "oci", str(bin_dir / "runc"), source=str(ctr)),
        "crun": Handler("crun", "oci", str(crun), "/run/containerd/crun", source=str(ctr)),
    }


CRIO_CONF = """
[crio]
root = "/var/lib/containers/storage"
runroot = "/run/containers/storage"
storage_driver = "overlay"
log_dir = "/var/log/crio/pods"

[crio.api]
listen = "/var/run/crio/crio.sock"
stream_port = "0"

[crio.runtime]
default_runtime = "runc"
conmon_cgroup = "pod"
cgroup_manager = "systemd"
selinux = false
default_capabilities = ["CHOWN", "KILL"]

[crio.runtime.runtimes.runc]
runtime_path = "{runc}"
runtime_type = "oci"
runtime_root = "/run/runc"
runtime_config_path = ""
monitor_path = "/usr/libexec/crio/conmon"
monitor_cgroup = "system.slice"
allowed_annotations = ["io.containers.trace-syscall"]
privileged_without_host_devices = false

[crio.runtime.runtimes.kata]
runtime_path = "{kata}"
runtime_type = "vm"
runtime_root = "/run/vc"
runtime_config_path = "/opt/kata/share/defaults/kata-containers/configuration.toml"
privileged_without_host_devices = true

[crio.image]
pause_image = "registry.k8s.io/pause:3.10"
signature_policy = ""

[crio.network]
network_dir = "/etc/cni/net.d/"
plugin_dirs = ["/opt/cni/bin/"]

[crio.metrics]
enable_metrics = false
"""

DROPIN_CRUN = """
[crio.runtime]
default_runtime = "crun"

[crio.runtime.runtimes.crun]
runtime_path = ""
runtime_root = "/run/crun"
monitor_env = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"]
platform_runtime_paths = {{ "linux/arm64" = "/usr/bin/crun-arm" }}
default_annotations = {{ "example.com/a" = "b" }}

[crio.runtime.runtimes.youki]
runtime_path = "{youki}"
runtime_type = "pod"
"""

DROPIN_OVERRIDE = """
[crio.runtime]
log_level = "debug"

[crio.runtime.runtimes.runc]
runtime_root = "/run/runc-override"
"""


def test_crio_import_with_drop_ins(tmp_path: Path, bin_dir: Path) -> None:
    runc, kata, youki = (executable(tmp_path / "opt" / n) for n in ("runc", "kata-shim", "youki"))
    crio = write(tmp_path / "crio" / "crio.conf", CRIO_CONF.format(runc=runc, kata=kata))
    dropin_crun = write(tmp_path / "crio" / "crio.conf.d" / "10-crun.conf", DROPIN_CRUN.format(youki=youki))
    dropin_override = write(tmp_path / "crio" / "crio.conf.d" / "20-override.conf", DROPIN_OVERRIDE)
    # Not applied: no .conf suffix; and 01- sorts first, so the later default "crun" wins over it.
    write(tmp_path / "crio" / "crio.conf.d" / "README", "this is not toml = = =")
    write(tmp_path / "crio" / "crio.conf.d" / "01-early.conf", '[crio.runtime]\ndefault_runtime = "kata"\n')
    cfg = load_config(write(tmp_path / "agent.toml", f'import = ["{crio}"]\n'))
    assert cfg.warnings == ()
    assert cfg.default_runtime == "crun"
    assert cfg.handlers == {
        # keys merge per handler; the later drop-in overrides runtime_root only
        "runc": Handler("runc", "oci", str(runc), "/run/runc-override", source=str(dropin_override)),
        "kata": Handler("kata", "oci", str(kata), "/run/vc", source=str(crio)),
        # empty runtime_path: the handler name on PATH
        "crun": Handler("crun", "oci", str(bin_dir / "crun"), "/run/crun", source=str(dropin_crun)),
        "youki": Handler("youki", "oci", str(youki), source=str(dropin_crun)),
    }


def test_crio_unknown_runtime_type(tmp_path: Path) -> None:
    crio = write(tmp_path / "crio.conf", '[crio.runtime.runtimes.x]\nruntime_type = "wasm"\n')
    message = load_error(write(tmp_path / "agent.toml", f'import = ["{crio}"]\n'))
    assert str(crio) in message and "[crio.runtime.runtimes.x]" in message and 'runtime_type "wasm"' in message


def test_crio_handler_not_on_path(tmp_path: Path, empty_path: None) -> None:
    crio = write(tmp_path / "crio.conf", '[crio.runtime.runtimes.crun]\nruntime_path = ""\n')
    message = load_error(write(tmp_path / "agent.toml", f'import = ["{crio}"]\n'))
    assert str(crio) in message and "[crio.runtime.runtimes.crun]" in message
    assert '"crun" is not on PATH' in message and "[runtimes.crun]" in message


def test_relative_import_is_relative_to_the_config_file(tmp_path: Path, bin_dir: Path) -> None:
    write(tmp_path / "etc" / "crio.conf", "[crio.runtime.runtimes.runc]\n")
    cfg = load_config(write(tmp_path / "etc" / "agent.toml", 'import = ["crio.conf"]\n'))
    assert cfg.handlers["runc"].source == str(tmp_path / "etc" / "crio.conf")


def test_imported_handler_with_bad_name_is_skipped_with_a_warning(tmp_path: Path, bin_dir: Path) -> None:
    crio = write(tmp_path / "crio.conf", "[crio.runtime.runtimes.My_Runtime]\n[crio.runtime.runtimes.runc]\n")
    cfg = load_config(write(tmp_path / "agent.toml", f'import = ["{crio}"]\n'))
    assert set(cfg.handlers) == {"runc"}
    (warning,) = cfg.warnings
    assert str(crio) in warning and "[crio.runtime.runtimes.My_Runtime]" in warning and "DNS label" in warning


# ---------------------------------------------------------------------------------------------
# Precedence


def test_native_handler_replaces_imported_one(tmp_path: Path, empty_path: None) -> None:
    # Imported kata has no binary, which alone would be an error; the native table replaces it.
    ctr = write(
        tmp_path / "config.toml",
        'version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kata]\n'
        'runtime_type = "io.containerd.kata.v2"\n',
    )
    agent = write(tmp_path / "agent.toml", f'import = ["{ctr}"]\n[runtimes.kata]\nbackend = "emulated"\n')
    cfg = load_config(agent)
    assert cfg.handlers == {"kata": Handler("kata", "emulated", source=str(agent))}


def test_imported_kata_without_binary_is_an_error(tmp_path: Path, empty_path: None) -> None:
    ctr = write(
        tmp_path / "config.toml",
        'version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kata]\n'
        'runtime_type = "io.containerd.kata.v2"\n',
    )
    agent = write(tmp_path / "agent.toml", f'import = ["{ctr}"]\n')
    message = load_error(agent)
    assert message.startswith(f'{ctr}: [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kata]: ')
    assert "no OCI runtime binary" in message and f"[runtimes.kata] runtime_path in {agent}" in message


def test_imported_runc_not_on_path_is_an_error(tmp_path: Path, empty_path: None) -> None:
    ctr = write(tmp_path / "c.toml", "version = 3\n[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]\n")
    message = load_error(write(tmp_path / "agent.toml", f'import = ["{ctr}"]\n'))
    assert str(ctr) in message and "runtimes.runc]" in message and '"runc" is not on PATH' in message


def test_imported_binary_not_executable(tmp_path: Path) -> None:
    binary = write(tmp_path / "runc", "not executable")
    ctr = write(
        tmp_path / "c.toml",
        'version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]\n'
        f'BinaryName = "{binary}"\n',
    )
    message = load_error(write(tmp_path / "agent.toml", f'import = ["{ctr}"]\n'))
    assert str(ctr) in message and "containerd.runtimes.runc]" in message
    assert f'options.BinaryName "{binary}" is not executable' in message


def test_agent_default_beats_imported_default(tmp_path: Path, bin_dir: Path) -> None:
    crio = write(tmp_path / "crio.conf", '[crio.runtime]\ndefault_runtime = "runc"\n[crio.runtime.runtimes.runc]\n')
    agent = write(
        tmp_path / "agent.toml",
        f'default_runtime = "fast"\nimport = ["{crio}"]\n[runtimes.fast]\nbackend = "emulated"\n',
    )
    cfg = load_config(agent)
    assert cfg.default_runtime == "fast"
    assert set(cfg.handlers) == {"runc", "fast"}


def test_first_import_default_wins_and_later_import_replaces_handler(tmp_path: Path, bin_dir: Path) -> None:
    ctr = write(
        tmp_path / "c.toml",
        'version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd]\ndefault_runtime_name = "runc"\n'
        '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]\n',
    )
    crio = write(
        tmp_path / "crio.conf",
        '[crio.runtime]\ndefault_runtime = "crun"\n[crio.runtime.runtimes.crun]\n'
        '[crio.runtime.runtimes.runc]\nruntime_root = "/run/crio-runc"\n',
    )
    cfg = load_config(write(tmp_path / "agent.toml", f'import = ["{ctr}", "{crio}"]\n'))
    assert cfg.default_runtime == "runc"
    assert cfg.handlers["runc"].source == str(crio)
    assert cfg.handlers["runc"].runtime_root == "/run/crio-runc"
    (warning,) = cfg.warnings
    assert str(crio) in warning and 'handler "runc" replaces the one imported from' in warning


def test_imported_default_without_handler_falls_through(tmp_path: Path, bin_dir: Path) -> None:
    cri = '[plugins."io.containerd.grpc.v1.cri".containerd]'
    ctr = write(tmp_path / "c.toml", f'version = 2\n{cri}\ndefault_runtime_name = "nvidia"\n')
    crio = write(tmp_path / "crio.conf", '[crio.runtime]\ndefault_runtime = "runc"\n[crio.runtime.runtimes.runc]\n')
    cfg = load_config(write(tmp_path / "agent.toml", f'import = ["{ctr}", "{crio}"]\n'))
    assert cfg.default_runtime == "runc"
    (warning,) = cfg.warnings
    assert str(ctr) in warning and 'default runtime "nvidia" has no handler' in warning


# ---------------------------------------------------------------------------------------------
# Errors: one line naming file, table and problem


@pytest.mark.parametrize(
    ("text", "table", "problem"),
    [
        pytest.param('[runtimes.Bad_Name]\nbackend = "emulated"\n', "[runtimes.Bad_Name]",
                     'handler name "Bad_Name" is not a DNS label', id="handler-name-case"),
        pytest.param(f'[runtimes.{"a" * 64}]\nbackend = "emulated"\n', f"[runtimes.{'a' * 64}]",
                     "at most 63 characters", id="handler-name-too-long"),
        pytest.param('[runtimes."-x"]\nbackend = "emulated"\n', "[runtimes.-x]", "not a DNS label",
                     id="handler-name-leading-dash"),
        pytest.param('[runtimes."a.b"]\nbackend = "emulated"\n', '[runtimes."a.b"]', 'handler name "a.b"',
                     id="handler-name-dot-is-quoted"),
        pytest.param('[runtimes.fast]\nbackend = "emulatd"\n', "[runtimes.fast]",
                     'unknown backend "emulatd"; use one of: emulated, oci, process', id="unknown-backend"),
        pytest.param("[runtimes.fast]\nallow_privileged = true\n", "[runtimes.fast]",
                     "backend is missing; set backend to one of: emulated, oci, process", id="missing-backend"),
        pytest.param('[runtimes.runc]\nbackend = "oci"\n', "[runtimes.runc]",
                     'runtime_path is required for backend "oci"', id="oci-without-runtime-path"),
        pytest.param('runtimes = { fast = "emulated" }\n', "[runtimes]", "fast must be a table, not a string",
                     id="handler-not-a-table"),
        pytest.param('default_runtime = "gpu"\n[runtimes.fast]\nbackend = "emulated"\n', "top level",
                     'default_runtime "gpu" names no handler; define [runtimes.gpu] or use one of: fast',
                     id="default-runtime-unknown"),
        pytest.param('missing_handler = "ignore"\n', "top level", 'missing_handler must be "fail" or "retry"',
                     id="missing-handler-value"),
        pytest.param("missing_handler = 1\n", "top level", "missing_handler must be a string, not an integer",
                     id="missing-handler-type"),
        pytest.param('[runtimes.fast]\nbackend = "emulated"\nruntime_args = "--debug"\n', "[runtimes.fast]",
                     "runtime_args must be an array, not a string", id="runtime-args-string"),
        pytest.param('[runtimes.fast]\nbackend = "emulated"\nruntime_args = ["--debug", 1]\n', "[runtimes.fast]",
                     "runtime_args must be an array of strings", id="runtime-args-int-item"),
        pytest.param('[runtimes.fast]\nbackend = "emulated"\nallow_host_path = "yes"\n', "[runtimes.fast]",
                     "allow_host_path must be true or false, not a string", id="bool-as-string"),
        pytest.param('[runtimes.fast]\nbackend = "emulated"\n[runtimes.fast.features]\nuser_namespaces = 1\n',
                     "[runtimes.fast.features]", "user_namespaces must be true or false, not an integer",
                     id="feature-not-bool"),
        pytest.param('[runtimes.fast]\nbackend = "emulated"\noptions = []\n', "[runtimes.fast]",
                     "options must be a table, not an array", id="options-not-table"),
        pytest.param('[runtimes.fast]\nbackend = "emulated"\n[runtimes.fast.options]\nstart_latency = "soon"\n',
                     "[runtimes.fast.options]", "start_latency: 'soon' is not a duration such as 500ms, 2s or 1m",
                     id="profile-duration-garbage"),
        pytest.param('[runtimes.fast]\nbackend = "emulated"\n[runtimes.fast.options]\nrun_time = -1\n',
                     "[runtimes.fast.options]", "run_time must be a finite duration of 0 or more, not -1",
                     id="profile-duration-negative"),
        pytest.param('[runtimes.fast]\nbackend = "emulated"\n[runtimes.fast.options]\nimage_pull = true\n',
                     "[runtimes.fast.options]", 'image_pull must be a duration such as "2s"',
                     id="profile-duration-bool"),
        pytest.param('[runtimes.fast]\nbackend = "emulated"\n[runtimes.fast.options]\n'
                     'start_latency = { distribution = "gamma" }\n', "[runtimes.fast.options]",
                     "start_latency.distribution is 'gamma'; use one of: fixed (value), uniform (min, max), "
                     "lognormal (median, p99)", id="profile-unknown-distribution"),
        pytest.param('[runtimes.fast]\nbackend = "emulated"\n[runtimes.fast.options]\n'
                     'start_latency = { median = "1s", p99 = "5s" }\n', "[runtimes.fast.options]",
                     "start_latency.distribution is missing", id="profile-distribution-missing"),
        pytest.param('[runtimes.fast]\nbackend = "emulated"\n[runtimes.fast.options]\n'
                     'start_latency = { distribution = "lognormal", median = "1s" }\n', "[runtimes.fast.options]",
                     "start_latency: a lognormal distribution needs median, p99; p99 is missing",
                     id="profile-lognormal-without-p99"),
        pytest.param('[runtimes.fast]\nbackend = "emulated"\n[runtimes.fast.options]\n'
                     'start_latency = { distribution = "lognormal", median = "2s", p99 = "1s" }\n',
                     "[runtimes.fast.options]", "start_latency: p99 (1s) must be above the median (2s)",
                     id="profile-lognormal-p99-below-median"),
        pytest.param('[runtimes.fast]\nbackend = "emulated"\n[runtimes.fast.options]\n'
                     'run_time = { distribution = "uniform", min = "5s", max = "1s" }\n', "[runtimes.fast.options]",
                     "run_time: max (1s) is below min (5s)", id="profile-uniform-inverted"),
        pytest.param('[runtimes.fast]\nbackend = "emulated"\n[runtimes.fast.options]\n'
                     'run_time = { distribution = "fixed", value = "1s", p99 = "2s" }\n', "[runtimes.fast.options]",
                     "run_time: p99 is not a fixed parameter; set value", id="profile-extra-parameter"),
        pytest.param('[runtimes.fast]\nbackend = "emulated"\n[runtimes.fast.options]\nfailure_probability = 1.5\n',
                     "[runtimes.fast.options]", "failure_probability must be a number from 0 to 1, not 1.5",
                     id="profile-probability-range"),
        pytest.param('[runtimes.fast]\nbackend = "emulated"\n[runtimes.fast.options]\nfailure_exit_code = 0\n',
                     "[runtimes.fast.options]", "failure_exit_code must be an integer from 1 to 255, not 0",
                     id="profile-exit-code-zero"),
        pytest.param('[runtimes.fast]\nbackend = "emulated"\n[runtimes.fast.options]\ncpu_usage = "lots"\n',
                     "[runtimes.fast.options]", "cpu_usage 'lots' is not a CPU quantity", id="profile-cpu-garbage"),
        pytest.param('[runtimes.fast]\nbackend = "emulated"\n[runtimes.fast.options]\nmemory_usage = "-1Mi"\n',
                     "[runtimes.fast.options]", "memory_usage '-1Mi' is not a size", id="profile-memory-negative"),
        pytest.param('[runtimes.fast]\nbackend = "emulated"\n[runtimes.fast.options]\nfinal_status = "no"\n',
                     "[runtimes.fast.options]", "final_status must be true or false, not 'no'",
                     id="profile-final-status-type"),
        pytest.param("[node]\nmax_pods = 0\n", "[node]", "max_pods must be a positive integer, not 0",
                     id="max-pods-zero"),
        pytest.param('[node]\nmax_pods = "110"\n', "[node]", "max_pods must be an integer, not a string",
                     id="max-pods-string"),
        pytest.param("[node]\nmax_pods = true\n", "[node]", "max_pods must be an integer, not a boolean",
                     id="max-pods-bool"),
        pytest.param("[node]\nmax_pods = 1.5\n", "[node]", "max_pods must be an integer, not a float",
                     id="max-pods-float"),
        pytest.param("[node]\npod_pids_limit = -5\n", "[node]", "pod_pids_limit must be -1 (unlimited)",
                     id="pids-limit"),
        pytest.param("[node]\nhandler_labels = 1\n", "[node]", "handler_labels must be true or false",
                     id="handler-labels-type"),
        pytest.param('[node]\ntaints = [{ value = "y", effect = "NoSchedule" }]\n', "[node.taints[0]]",
                     "taint key is missing", id="taint-without-key"),
        pytest.param('[node]\ntaints = [{ key = "a", effect = "NoSchedule" }, { key = "b" }]\n',
                     "[node.taints[1]]", "taint effect is missing; use one of: NoSchedule, PreferNoSchedule, "
                     "NoExecute", id="taint-without-effect"),
        pytest.param('[node]\ntaints = [{ key = "a", effect = "Evict" }]\n', "[node.taints[0]]",
                     'taint effect is "Evict"', id="taint-bad-effect"),
        pytest.param('[node]\ntaints = ["a=b:NoSchedule"]\n', "[node.taints[0]]", "a taint must be a table",
                     id="taint-not-table"),
        pytest.param('[node]\ntaints = { key = "a", effect = "NoSchedule" }\n', "[node]",
                     "taints must be an array, not a table", id="taints-not-array"),
        pytest.param('[node.labels]\n"example.com/zone" = 1\n', "[node.labels]",
                     'label "example.com/zone" must be a string, not an integer', id="label-value-int"),
        pytest.param('[node]\nlabels = ["a=b"]\n', "[node]", "labels must be a table, not an array",
                     id="labels-not-table"),
        pytest.param('[node.reserved]\ncpu = "lots"\n', "[node.reserved]",
                     'cpu = "lots" is not a Kubernetes quantity', id="reserved-cpu-garbage"),
        pytest.param('[node.reserved]\nmemory = "1GB"\n', "[node.reserved]",
                     'memory = "1GB" is not a Kubernetes quantity', id="reserved-memory-garbage"),
        pytest.param("[node.reserved]\nmemory = true\n", "[node.reserved]", "is not a Kubernetes quantity",
                     id="reserved-memory-bool"),
        pytest.param('[node]\ncontainer_log_max_size = "-10Mi"\n', "[node]",
                     'container_log_max_size "-10Mi" must be a positive size', id="log-max-size-negative"),
        pytest.param("[node]\ncontainer_log_max_size = 0\n", "[node]",
                     'container_log_max_size "0" must be a positive size', id="log-max-size-zero"),
        pytest.param('[node.reserved]\ncpu = "-100m"\n', "[node.reserved]", 'cpu = "-100m" is negative',
                     id="reserved-negative"),
        pytest.param('import = "/etc/crio/crio.conf"\n', "top level", "import must be an array, not a string",
                     id="import-not-list"),
        pytest.param("import = [1]\n", "top level", "import must be an array of file paths", id="import-int"),
    ],
)  # fmt: skip
def test_error(tmp_path: Path, text: str, table: str, problem: str) -> None:
    cfg_file = write(tmp_path / "kubelet-emu.toml", text)
    message = load_error(cfg_file)
    assert message.startswith(f"{cfg_file}: {table}: "), message
    assert problem in message


def test_error_malformed_toml(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "agent.toml", '[runtimes.fast]\nbackend = "emulated\n')
    message = load_error(cfg_file)
    assert message.startswith(f"{cfg_file}: malformed TOML: ")
    assert "line 2, column" in message


def test_error_not_utf8(tmp_path: Path) -> None:
    cfg_file = tmp_path / "agent.toml"
    cfg_file.write_bytes(b'default_runtime = "\xff"\n')
    assert load_error(cfg_file).startswith(f"{cfg_file}: malformed TOML")


def test_error_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    message = load_error(missing)
    assert message.startswith(f"{missing}: file not found") and "--config" in message


def test_error_missing_import(tmp_path: Path) -> None:
    missing = tmp_path / "crio" / "crio.conf"
    cfg_file = write(tmp_path / "agent.toml", f'import = ["{missing}"]\n')
    message = load_error(cfg_file)
    assert message.startswith(f"{cfg_file}: top level: import ") and str(missing) in message
    assert "file not found" in message


def test_error_malformed_import_and_drop_in(tmp_path: Path) -> None:
    ctr = write(tmp_path / "config.toml", "version = 2\n[plugins\n")
    message = load_error(write(tmp_path / "a.toml", f'import = ["{ctr}"]\n'))
    assert message.startswith(f"{ctr}: malformed TOML: ") and "line 2" in message
    crio = write(tmp_path / "crio.conf", "[crio]\n")
    dropin = write(tmp_path / "crio.conf.d" / "10-bad.conf", "[crio.runtime\n")
    message = load_error(write(tmp_path / "b.toml", f'import = ["{crio}"]\n'))
    assert message.startswith(f"{dropin}: malformed TOML: ")


def test_error_import_of_unknown_format(tmp_path: Path) -> None:
    other = write(tmp_path / "other.toml", "[server]\nport = 1\n")
    cfg_file = write(tmp_path / "a.toml", f'import = ["{other}"]\n')
    message = load_error(cfg_file)
    assert message.startswith(f"{other}: top level: neither a containerd config") and str(cfg_file) in message


def test_error_containerd_version_1(tmp_path: Path) -> None:
    ctr = write(tmp_path / "config.toml", "version = 1\n[plugins.cri.containerd]\n")
    message = load_error(write(tmp_path / "a.toml", f'import = ["{ctr}"]\n'))
    assert message.startswith(f"{ctr}: top level: containerd config version 1 is not supported")


def test_error_imported_table_wrong_type(tmp_path: Path) -> None:
    cri = '[plugins."io.containerd.grpc.v1.cri".containerd]'
    ctr = write(tmp_path / "config.toml", f'version = 2\n{cri}\nruntimes = "runc"\n')
    message = load_error(write(tmp_path / "a.toml", f'import = ["{ctr}"]\n'))
    assert message.startswith(f'{ctr}: [plugins."io.containerd.grpc.v1.cri".containerd]: runtimes must be a table')


def test_error_runtime_path_missing_not_executable_or_directory(tmp_path: Path) -> None:
    plain = write(tmp_path / "plain-runc", "#!/bin/sh\n")
    os.chmod(plain, 0o644)
    cases = [
        (tmp_path / "does-not-exist", "does not exist"),
        (plain, "is not executable; chmod +x it"),
        (tmp_path, "does not exist or is not a file"),  # a directory passes X_OK but is no binary
    ]
    for path, problem in cases:
        cfg_file = write(tmp_path / "agent.toml", f'[runtimes.runc]\nbackend = "oci"\nruntime_path = "{path}"\n')
        message = load_error(cfg_file)
        assert message.startswith(f'{cfg_file}: [runtimes.runc]: runtime_path "{path}" ')
        assert problem in message


# ---------------------------------------------------------------------------------------------
# Warnings for unknown keys


def test_unknown_keys_warn_with_file_table_and_key(tmp_path: Path) -> None:
    cfg_file = write(
        tmp_path / "agent.toml",
        """
defualt_runtime = "fast"
[node]
max_pod = 5
taints = [{ key = "a", effect = "NoSchedule", operator = "Exists" }]
[node.reserved]
ephemeral-storage = "1Gi"
[runtimes.fast]
backend = "emulated"
bakend = "process"
[runtimes.fast.features]
selinux = true
[runtimes.fast.options]
anything = "goes"
run_tme = "2s"
""",
    )
    cfg = load_config(cfg_file)
    f = str(cfg_file)
    assert cfg.warnings == (
        f'{f}: top level: unknown key "defualt_runtime" ignored (did you mean "default_runtime"?)',
        f'{f}: [node]: unknown key "max_pod" ignored (did you mean "max_pods"?)',
        f'{f}: [node.taints[0]]: unknown key "operator" ignored',
        f'{f}: [node.reserved]: unknown key "ephemeral-storage" ignored',
        f'{f}: [runtimes.fast]: unknown key "bakend" ignored (did you mean "backend"?)',
        f'{f}: [runtimes.fast.features]: unknown key "selinux" ignored',
        f'{f}: [runtimes.fast.options]: unknown key "anything" ignored',
        f'{f}: [runtimes.fast.options]: unknown key "run_tme" ignored (did you mean "run_time"?)',
    )
    assert cfg.handlers["fast"].backend == "emulated"
    assert cfg.handlers["fast"].options == {"anything": "goes", "run_tme": "2s"}


def test_no_handlers_warns(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path / "a.toml", "[node]\nmax_pods = 10\n"))
    assert cfg.handlers == {}
    (warning,) = cfg.warnings
    assert "no runtime handlers configured" in warning


# ---------------------------------------------------------------------------------------------
# Quantities


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1", Decimal(1)),
        ("100m", Decimal("0.1")),
        ("1.5", Decimal("1.5")),
        (".5", Decimal("0.5")),
        ("+2", Decimal(2)),
        ("-1", Decimal(-1)),
        ("250n", Decimal("0.00000025")),
        ("1k", Decimal(1000)),
        ("2M", Decimal(2_000_000)),
        ("3G", Decimal(3 * 10**9)),
        ("1T", Decimal(10**12)),
        ("1P", Decimal(10**15)),
        ("1E", Decimal(10**18)),
        ("1Ki", Decimal(1024)),
        ("256Mi", Decimal(256 * 2**20)),
        ("1.5Gi", Decimal(3 * 2**29)),
        ("1Ti", Decimal(2**40)),
        ("1Pi", Decimal(2**50)),
        ("1Ei", Decimal(2**60)),
        ("1e3", Decimal(1000)),
        ("1E3", Decimal(1000)),
        ("5e-1", Decimal("0.5")),
        (3, Decimal(3)),
        (0.1, Decimal("0.1")),
        (Decimal("2.5"), Decimal("2.5")),
    ],
)
def test_parse_quantity(value: object, expected: Decimal) -> None:
    assert parse_quantity(value) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "value", ["", "abc", "Mi", "1KB", "1K", "1mi", "1e", "1.2.3", " 1", "1 ", "1Mi2", "--1", True, None, float("nan")]
)
def test_parse_quantity_rejects_garbage(value: object) -> None:
    with pytest.raises(ValueError):
        parse_quantity(value)  # type: ignore[arg-type]


def test_cpu_and_memory_round_up() -> None:
    assert cpu_millis("100m") == 100
    assert cpu_millis("0.5") == 500
    assert cpu_millis(2) == 2000
    assert cpu_millis("1.0001") == 1001
    assert cpu_millis("1n") == 1
    assert memory_bytes("256Mi") == 268435456
    assert memory_bytes("1.5k") == 1500
    assert memory_bytes("0.5") == 1
    assert memory_bytes("1e3") == 1000
    assert memory_bytes("120Mi") + memory_bytes("200Mi") == 335544320


# ---------------------------------------------------------------------------------------------
# `kubelet-emu handlers` listing


def test_format_handler_table() -> None:
    cfg = AgentConfig(
        handlers={
            "runc": Handler("runc", "oci", "/usr/sbin/runc", source="/etc/containerd/config.toml"),
            "fast": Handler("fast", "emulated", source="/etc/kubelet-emu.toml"),
        },
        default_runtime="fast",
        missing_handler="fail",
        node=NodeSettings(labels={}, taints=()),
        source="/etc/kubelet-emu.toml",
        warnings=('/etc/kubelet-emu.toml: [runtimes.fast]: unknown key "bakend" ignored',),
    )
    assert format_handler_table(cfg).splitlines() == [
        "NAME            BACKEND   RUNTIME_PATH    SOURCE",
        "fast (default)  emulated  -               /etc/kubelet-emu.toml",
        "runc            oci       /usr/sbin/runc  /etc/containerd/config.toml",
        'warning: /etc/kubelet-emu.toml: [runtimes.fast]: unknown key "bakend" ignored',
    ]


def test_format_handler_table_built_in() -> None:
    lines = format_handler_table(load_config(None)).splitlines()
    assert lines[1].split() == ["default", "(default)", "emulated", "-", "<built-in>"]


def test_events_policy(tmp_path):
    path = tmp_path / "events.toml"
    path.write_text('events = "warnings"\n[runtimes.x]\nbackend = "emulated"\n')
    assert load_config(path).events == "warnings"
    assert load_config(None).events == "all"
    path.write_text('events = "loud"\n[runtimes.x]\nbackend = "emulated"\n')
    with pytest.raises(ConfigError, match=r"events\.toml: .*events must be"):
        load_config(path)


def test_network_and_images_defaults(tmp_path):
    cfg = load_config(write(tmp_path / "a.toml", "[runtimes.x]\nbackend = 'emulated'\n"))
    assert cfg.network.enabled and cfg.network.pod_cidr is None and cfg.network.bridge is None
    assert not cfg.network.masquerade
    assert cfg.images.mirrors == {} and (cfg.images.gc_high_percent, cfg.images.gc_low_percent) == (85, 80)


def test_network_and_images_tables(tmp_path):
    text = """
[network]
pod_cidr = "10.88.0.0/24"
bridge = "emu0"
masquerade = true

[images]
insecure_registries = ["registry.lan:5000"]
gc_high_percent = 90
gc_low_percent = 70

[images.mirrors]
"registry.k8s.io" = ["http://127.0.0.1:5000"]
"docker.io" = "http://127.0.0.1:5001"
"""
    cfg = load_config(write(tmp_path / "a.toml", text))
    assert cfg.network.pod_cidr == "10.88.0.0/24" and cfg.network.bridge == "emu0" and cfg.network.masquerade
    assert cfg.images.mirrors == {
        "registry.k8s.io": ("http://127.0.0.1:5000",),
        "docker.io": ("http://127.0.0.1:5001",),
    }
    assert cfg.images.insecure_registries == ("registry.lan:5000",)
    assert (cfg.images.gc_high_percent, cfg.images.gc_low_percent) == (90, 70)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[network]\npod_cidr = "10.88.0.1/24"', '[network]: pod_cidr "10.88.0.1/24" is not a network'),
        ('[network]\npod_cidr = "fd00::/64"', "must be an IPv4 network"),
        ('[network]\nbridge = "a-very-long-bridge-name"', "is not an interface name"),
        ('[images.mirrors]\n"docker.io" = ["127.0.0.1:5000"]', 'mirrors for "docker.io" must be URLs'),
        ("[images]\ngc_high_percent = 50\ngc_low_percent = 60", "gc_low_percent <= gc_high_percent"),
    ],
)
def test_network_and_images_errors(tmp_path, text, expected):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path / "a.toml", text))
    assert expected in str(err.value) and str(tmp_path / "a.toml") in str(err.value)


@pytest.mark.parametrize("name", ["agent-import-containerd.toml", "agent-import-crio.toml"])
def test_example_imports_map_handlers_to_oci_runtimes(name):
    """The containerd-style and CRI-O-style examples give runc and crun handlers (both installed by .ci/run)."""
    cfg = load_config(EXAMPLE.parent / name)
    assert cfg.handlers["runc"].backend == "oci" and cfg.handlers["runc"].runtime_path == "/usr/sbin/runc"
    assert cfg.handlers["crun"].runtime_path == "/usr/bin/crun"
    assert cfg.handlers["crun"].runtime_root == "/run/kubelet-emu/crun"
    assert cfg.handlers["fast"].backend == "emulated"
    assert cfg.default_runtime == "runc" and not cfg.warnings

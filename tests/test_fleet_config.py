"""The [fleet] table, its {index} templates and the fleet's credential checks (pure functions)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import ConfigError, load_config
from agent.config.fleet import fleet_nodes
from agent.config.template import TemplateError, parse_template
from agent.fleet.identity import judge
from agent.fleet.runner import with_count
from agent.fleet.shape import check_fleet_config, node_config

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fleet" / "fleet.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fleet.toml"
    path.write_text('[runtimes.fast]\nbackend = "emulated"\n' + text)
    return path


@pytest.mark.parametrize(
    ("text", "index", "out"),
    [
        ("emu-{index}", 7, "emu-7"),
        ("zone-{index % 3}", 7, "zone-1"),
        ("rack-{index // 10}-{(index + 1) * 2}", 42, "rack-4-86"),
        ("n{index:04}", 5, "n0005"),
        ("plain", 3, "plain"),
        ("{{literal}}-{index}", 1, "{literal}-1"),
        ("{-index + 10}", 3, "7"),
    ],
)
def test_templates_render(text, index, out):
    assert parse_template(text).render(index) == out


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{__import__('os').system('id')}", "not an integer expression of index"),
        ("{index.real}", "not an integer expression"),
        ("{name}", "not an integer expression"),
        ("{index ** 2}", "not an integer expression"),
        ("{index % 0}", "divides by zero"),
        ("{index!r}", "conversions are not supported"),
        ("{index:s}", "not an integer format spec"),
        ("{index", "literal braces"),
        ("{1.5}", "not an integer expression"),
    ],
)
def test_templates_refuse_anything_but_integer_arithmetic(text, problem):
    with pytest.raises(TemplateError, match=problem):
        parse_template(text)


def test_the_example_fleet_has_small_and_large_groups():
    config = load_config(EXAMPLE)
    nodes = fleet_nodes(config.fleet)
    assert config.fleet.count == len(nodes) == 100
    small, large = nodes[0], nodes[-1]
    assert (small.name, small.labels["topology.kubernetes.io/zone"], small.cpu_millis) == ("emu-0", "zone-0", 4000)
    assert (large.name, large.group, large.cpu_millis, large.max_pods) == ("emu-large-9", "large", 32000, 250)
    assert large.labels["node.kubernetes.io/instance-type"] == "large"
    small_cfg, large_cfg = node_config(config, small, "emu"), node_config(config, large, "emu")
    assert set(small_cfg.handlers) == {"fast"} and set(large_cfg.handlers) == {"fast", "kata"}
    assert small_cfg.node.labels["kubelet-emu.io/fleet"] == "emu"
    assert small_cfg.node.max_pods == 110


def test_single_group_count_and_taints(tmp_path):
    path = write(
        tmp_path,
        """
[fleet]
count = 4
taints = [{ key = "pool-{index % 2}", value = "v{index}", effect = "NoSchedule" }]
""",
    )
    settings = with_count(load_config(path).fleet, 6)
    nodes = fleet_nodes(settings)
    assert [n.name for n in nodes] == [f"emu-{i}" for i in range(6)]
    assert nodes[3].taints == (("pool-1", "v3", "NoSchedule"),)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('[fleet]\ncount = 3\nnode_name = "same"', "names every node the same"),
        ("[fleet]\ncount = -1", "count must be zero or more"),
        ('[fleet]\ncount = 2\nlabels = { zone = "{index ** 2}" }', r"\[fleet.labels\]: zone:"),
        ('[fleet]\ncount = 2\ncapacity = { cpu = "500m" }', "whole number of cpus"),
        ('[fleet]\ncount = 2\ncapacity = { memory = "lots" }', "not a Kubernetes quantity"),
        ('[fleet]\ncount = 2\ncapacity = { gpus = "1" }', 'unknown key "gpus"'),
        ('[fleet]\ncount = 2\nhandlers = ["kata"]', 'names "kata", which is no'),
        ("[fleet]\ncount = 2\n[fleet.groups.a]\ncount = 1", "belong in each"),
        ('[fleet.groups.a]\ncount = 2\nnode_name = "n-{index}"\n[fleet.groups.b]\ncount = 1\nnode_name = "n-{index}"',
         'node name "n-0" is made by groups a and b'),
    ],
)  # fmt: skip
def test_bad_fleet_tables_are_refused_with_the_place(tmp_path, text, problem):
    with pytest.raises(ConfigError, match=problem):
        load_config(write(tmp_path, text))


def test_a_process_handler_is_refused_in_fleet_mode(tmp_path):
    path = tmp_path / "f.toml"
    path.write_text('[runtimes.procs]\nbackend = "process"\n[fleet]\ncount = 2\n')
    with pytest.raises(ConfigError, match=r"\[runtimes.procs\] uses backend 'process': fleet mode runs only emulated"):
        check_fleet_config(load_config(path, check_paths=False))


def test_a_config_without_fleet_table_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"no \[fleet\] table"):
        check_fleet_config(load_config(write(tmp_path, "")))


def test_count_option_needs_a_fleet_of_one_group():
    with pytest.raises(ConfigError, match="has groups"):
        with_count(load_config(EXAMPLE).fleet, 5)


def test_identities():
    assert judge("kubelet-emu:fleet:x", ["kubelet-emu:fleets", "system:authenticated"], False) is None
    assert "NodeRestriction" in judge("system:node:n1", ["system:nodes"], False)
    assert "--allow-admin" in judge("kubernetes-admin", ["system:masters"], False)
    assert judge("kubernetes-admin", ["system:masters"], True) is None

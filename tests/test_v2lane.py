"""The cgroup v2 lane's host-side pieces that need no VM (tests/v2lane/lane.py)."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

LANE = Path(__file__).parent / "v2lane" / "lane.py"
spec = importlib.util.spec_from_file_location("v2lane_lane", LANE)
assert spec and spec.loader
lane = importlib.util.module_from_spec(spec)
sys.modules["v2lane_lane"] = lane
spec.loader.exec_module(lane)


def test_modules_come_after_their_dependencies(tmp_path: Path) -> None:
    (tmp_path / "modules.dep").write_text(
        "kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/netfs/netfs.ko\n"
        "kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko\n"
        "kernel/net/9p/9pnet.ko:\n"
        "kernel/fs/netfs/netfs.ko:\n"
        "kernel/fs/overlayfs/overlay.ko:\n"
    )
    order = lane.module_order(tmp_path, ("9pnet_virtio", "9p", "overlay", "virtio_pci"))
    assert order == [
        "kernel/net/9p/9pnet.ko",
        "kernel/net/9p/9pnet_virtio.ko",
        "kernel/fs/netfs/netfs.ko",
        "kernel/fs/9p/9p.ko",
        "kernel/fs/overlayfs/overlay.ko",
    ]  # virtio_pci is not a module there: built in, nothing to load


def test_variants_boot_pure_v2_and_name_their_tests() -> None:
    assert "cgroup_no_v1=all" in lane.BASE_CMDLINE
    assert set(lane.VARIANTS) >= {"plain", "leaf", "cgroupns", "swap"}
    for variant in lane.VARIANTS.values():
        assert variant.placement in ("root", "leaf", "cgroupns")
        for test in variant.tests:
            path = test.split("::")[0]
            assert (LANE.parents[2] / path).exists(), f"variant {variant.name} names a missing file {path}"
    assert lane.VARIANTS["swap"].swap
    assert lane.VARIANTS["cgroupns"].tests[0] == lane.ACCEPTANCE_POD  # the agent moves into the leaf itself


def test_a_silent_hung_vm_is_stopped_by_the_watchdog(tmp_path: Path) -> None:
    # A guest that hangs prints nothing: the timeout must not wait for a line to arrive.
    started = time.monotonic()
    lane.stream_console(["sh", "-c", "echo booted; exec sleep 60"], tmp_path / "console.log", 1.5, "test")
    assert time.monotonic() - started < 20
    assert (tmp_path / "console.log").read_text() == "booted\n"


def test_summary_is_one_line_per_variant_and_fails_when_one_failed(capsys) -> None:
    assert lane.summarize({"plain": (0, 291.0, False), "leaf": (0, 92.0, True)}) == 0
    assert lane.summarize({"plain": (0, 291.0, False), "swap": (1, 89.0, False)}) == 1
    out = capsys.readouterr()
    lines = (out.out + out.err).splitlines()
    assert any("leaf" in line and "passed in 92 s (on a second boot" in line for line in lines)
    assert any("swap" in line and "FAILED (exit 1) in 89 s" in line for line in lines)

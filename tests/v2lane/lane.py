#!/usr/bin/env python3
"""The cgroup v2 lane: run selected tests in a throwaway VM with a pure cgroup v2 hierarchy.

This machine is hybrid cgroup v1, so the v2 code paths only run for real inside a VM: QEMU with
TCG (the host's /dev/kvm is nested PVM-style KVM, under which a stock kernel hangs), Debian's
generic kernel (it has the 9p modules; the cloud kernel does not) and a busybox initramfs that
mounts this machine's root read-only over virtio-9p with a tmpfs overlay, so the guest runs the
very checkout, virtual environment and cached control plane the host has. `guest.py` is PID 1
in the guest: it mounts cgroup2 alone, brings up loopback, places the tests' processes as the
variant says, runs pytest and powers off. Its exit code comes back through a writable 9p share.

    tests/v2lane/lane.py                    # every variant, in turn
    tests/v2lane/lane.py plain swap         # some variants
    tests/v2lane/lane.py plain -- -k oom    # extra pytest arguments

The kernel and initramfs are cached in ~/.cache/kubelet-emu/v2lane. Needs root (9p passthrough
of root-owned files), qemu-system-x86 and busybox-static (`kubelet-emu doctor --for tests --install`).
Only standard-library imports: it runs before anything is installed into a virtual environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kubelet-emu" / "v2lane"
KERNEL_META_PACKAGE = "linux-image-amd64"
# Modules the initramfs loads to reach the root over 9p (their dependencies are added).
INITRAMFS_MODULES = ("virtio_pci", "virtio_rng", "9pnet_virtio", "9p", "overlay")
MEMORY_MIB = 3072
CPUS = 2
# A variant that takes longer than its timeout is stuck (TCG is slow, but not this slow); a test
# that takes longer than TEST_TIMEOUT fails with its stack (pytest-timeout) and the variant goes on.
NO_RESULT = 125  # the exit status of a variant whose guest wrote none (it hung or crashed)
TEST_TIMEOUT = 480  # the first test of a boot starts the dev cluster: 50 s quiet, 190 s on a busy host

# The tests that skip on this hybrid v1 host or show v2 values: cgroup files, processes, stats,
# the process backend's acceptance Pod (overhead, init container max) and swap.
CGROUP_TESTS = ("tests/test_cgroups.py", "tests/test_cgroups_report.py")
PROCESS = "tests/test_process.py::test_"
ACCEPTANCE_POD = f"{PROCESS}pod_cgroup_enforces_runtime_class_overhead"
POD_TESTS = (
    f"{PROCESS}process_runs_in_its_cgroup_and_logs_in_cri_format",
    ACCEPTANCE_POD,
    f"{PROCESS}burstable_without_memory_limit_has_no_pod_memory_limit",
    f"{PROCESS}cpu_limit_throttles",
    f"{PROCESS}exit_codes_and_oom",
    "tests/test_stats_summary.py::test_summary_matches_a_real_pods_cgroup",
)
V2_CGROUP_TESTS = tuple(
    f"tests/test_cgroups.py::test_v2_{name}"
    for name in (
        "guaranteed_pod_and_container",
        "process_placement_removal_and_oom",
        "top_cgroup_with_processes_moves_them_into_a_leaf",
    )
)
OOM_TESTS = ("tests/test_cgroups.py::test_v2_process_placement_removal_and_oom", f"{PROCESS}exit_codes_and_oom")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One boot of the VM: how the guest starts, where the tests' processes sit, which tests run.

    placement: "root" (the root cgroup), "leaf" (a systemd-like service cgroup,
    /system.slice/kubelet-emu.service) or "cgroupns" (the root of its own cgroup namespace, as in
    a container). init: "guest" (guest.py is PID 1); another init (e.g. systemd) names its program
    in `init_program` and reads the same /run/v2lane/variant.json.
    """

    name: str
    tests: tuple[str, ...]
    placement: str = "root"
    swap: bool = False
    init: str = "guest"
    init_program: str = ""
    cmdline: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    timeout: int = 10 * 60


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("plain", (*CGROUP_TESTS, *POD_TESTS), timeout=16 * 60),
        Variant("leaf", (*V2_CGROUP_TESTS, ACCEPTANCE_POD), placement="leaf"),
        # The Pod first: the agent, not a test fixture, must be the one that moves into the leaf.
        Variant("cgroupns", (ACCEPTANCE_POD, *V2_CGROUP_TESTS), placement="cgroupns"),
        Variant("swap", OOM_TESTS, swap=True),
        # Debian's systemd as PID 1, the agent as a systemd service with cgroup_driver = "systemd".
        Variant(
            "systemd",
            ("tests/test_systemd_driver.py",),
            init="systemd",
            init_program=f"/usr/bin/python3 {REPO / 'tests/v2lane/systemd_guest.py'}",
        ),
    )
}

BASE_CMDLINE = (
    "console=ttyS0",
    "rdinit=/init",
    "panic=-1",
    "quiet",
    "loglevel=4",
    # Pure v2: no v1 hierarchy may claim a controller.
    "cgroup_no_v1=all",
    "systemd.unified_cgroup_hierarchy=1",
)


def say(message: str) -> None:
    print(f"v2lane: {message}", flush=True)


def run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, text=True, capture_output=True, **kwargs)  # type: ignore[call-overload]


# --- kernel and initramfs ----------------------------------------------------------------


def kernel_package() -> str:
    """The versioned kernel package the generic meta package depends on (linux-image-6.1.0-N-amd64)."""
    for attempt in range(2):
        out = subprocess.run(["apt-cache", "depends", KERNEL_META_PACKAGE], capture_output=True, text=True).stdout
        for line in out.splitlines():
            name = line.split(":", 1)[-1].strip()
            if line.strip().startswith("Depends:") and name.startswith("linux-image-"):
                return name
        if attempt == 0:  # a fresh machine's package lists may be empty
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
    raise SystemExit(f"v2lane: apt-cache knows no {KERNEL_META_PACKAGE}; this lane needs Debian's package lists")


def ensure_kernel() -> tuple[Path, Path, str]:
    """(vmlinuz, modules directory, kernel release), unpacked into the cache once."""
    package = kernel_package()
    home = CACHE / package
    done = home / ".done"
    if not done.exists():
        say(f"fetching {package} (apt-get download, unpacked, not installed)")
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir(parents=True)
        with tempfile.TemporaryDirectory() as tmp:
            run(["apt-get", "download", package], cwd=tmp)
            (deb,) = Path(tmp).glob("*.deb")
            run(["dpkg-deb", "-x", str(deb), str(home / "root")])
        release = next((home / "root/lib/modules").iterdir()).name
        # modules.dep for the guest's module loading (busybox depmod: kmod is not installed here).
        run(["busybox", "depmod", "-b", str(home / "root"), release])
        done.write_text(release)
    release = done.read_text().strip()
    return next((home / "root/boot").glob("vmlinuz-*")), home / "root/lib/modules" / release, release


def module_order(modules_dir: Path, names: tuple[str, ...]) -> list[str]:
    """Relative paths of the modules and their dependencies, each after what it depends on."""
    deps: dict[str, list[str]] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
    by_name = {Path(p).name.removesuffix(".ko").replace("-", "_"): p for p in deps}
    order: list[str] = []

    def visit(path: str) -> None:
        for dep in deps.get(path, []):
            visit(dep)
        if path not in order:
            order.append(path)

    for name in names:
        if name in by_name:  # not a module: built into this kernel
            visit(by_name[name])
    return order


INIT_SCRIPT = """#!/bin/busybox sh
# Stage 1 (initramfs): the host's root over 9p, read-only, under a tmpfs overlay; then the
# program lane.init= names becomes PID 1 in it.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules.order); do insmod /modules/$m || echo "v2lane: insmod $m failed"; done
mkdir -p /lower /rw /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose,ro hostroot /lower || poweroff -f
mount -t tmpfs -o size=75% tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot || poweroff -f
init=$(sed -n 's/.*lane\\.init=\\([^ ]*\\).*/\\1/p' /proc/cmdline)
for d in dev proc sys; do mount --move /$d /newroot/$d; done
# A clean /run holding the writable share (variant.json in, rc and logs out).
mount -t tmpfs -o mode=755 tmpfs /newroot/run
mkdir -p /newroot/run/v2lane
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 lane /newroot/run/v2lane || poweroff -f
exec switch_root /newroot $init
"""


def ensure_initramfs(modules_dir: Path, release: str) -> Path:
    image = CACHE / f"initramfs-{release}.cpio.gz"
    if image.exists() and image.stat().st_mtime >= Path(__file__).stat().st_mtime:
        return image
    say(f"building {image}")
    order = module_order(modules_dir, INITRAMFS_MODULES)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for d in ("bin", "proc", "sys", "dev", "modules"):
            (root / d).mkdir()
        shutil.copy2("/bin/busybox", root / "bin/busybox")
        for rel in order:
            target = root / "modules" / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(modules_dir / rel, target)
        (root / "modules.order").write_text("\n".join(order) + "\n")
        init = root / "init"
        init.write_text(INIT_SCRIPT)
        init.chmod(0o755)
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        cpio = subprocess.run(
            ["busybox", "cpio", "-o", "-H", "newc"],
            cwd=root,
            input=("\n".join(files) + "\n").encode(),
            capture_output=True,
            check=True,
        ).stdout
    tmp_image = image.with_suffix(".tmp")
    with open(tmp_image, "wb") as f:
        f.write(subprocess.run(["gzip", "-1"], input=cpio, capture_output=True, check=True).stdout)
    tmp_image.rename(image)
    return image


# --- one boot ------------------------------------------------------------------------------


def stream_console(argv: list[str], log_path: Path, timeout: float, name: str) -> None:
    """Run the VM; its serial console is the guest's output: shown as it comes and kept in a file."""
    with open(log_path, "wb") as log:
        vm = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        assert vm.stdout is not None
        # A watchdog, not a check between lines: a guest that hangs silently prints no line.
        watchdog = threading.Timer(timeout, stop_hung_vm, (vm, name, timeout))
        watchdog.start()
        try:
            for line in iter(vm.stdout.readline, b""):
                sys.stdout.buffer.write(line)
                sys.stdout.flush()
                log.write(line)
                log.flush()
            vm.wait()
        finally:
            watchdog.cancel()


def stop_hung_vm(vm: subprocess.Popen[bytes], name: str, timeout: float) -> None:
    say(f"variant {name}: no result after {timeout:.0f} s; stopping the VM")
    vm.kill()


def run_variant(
    variant: Variant, kernel: Path, initramfs: Path, modules_dir: Path, pytest_args: list[str], tests: list[str] | None
) -> int:
    share = Path(tempfile.mkdtemp(prefix=f"v2lane-{variant.name}-"))
    python = Path(sys.prefix) / "bin/python"  # the virtual environment this script runs in
    spec = {
        **dataclasses.asdict(variant),
        "repo": str(REPO),
        "python": str(python),
        "modules_dir": str(modules_dir),
        "pytest_args": [f"--timeout={TEST_TIMEOUT}", *(tests or variant.tests), *pytest_args],
    }
    (share / "variant.json").write_text(json.dumps(spec, indent=1))
    # The kernel command line takes no spaces in a value: the init is a script on the share.
    init = variant.init_program or f"/usr/bin/python3 {REPO / 'tests/v2lane/guest.py'}"
    wrapper = share / "init"
    wrapper.write_text(f"#!/bin/sh\nexec {init}\n")
    wrapper.chmod(0o755)
    cmdline = [*BASE_CMDLINE, *variant.cmdline, "lane.init=/run/v2lane/init"]
    argv = [
        "qemu-system-x86_64",
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        "max",
        "-m",
        str(MEMORY_MIB),
        "-smp",
        str(CPUS),
        "-nographic",
        "-no-reboot",
        "-kernel",
        str(kernel),
        "-initrd",
        str(initramfs),
        "-append",
        " ".join(cmdline),
        "-virtfs",
        "local,path=/,mount_tag=hostroot,security_model=passthrough,readonly=on,multidevs=remap",
        "-virtfs",
        f"local,path={share},mount_tag=lane,security_model=passthrough",
        "-device",
        "virtio-rng-pci",
        "-nic",
        "none",
    ]
    say(f"variant {variant.name}: booting ({' '.join(spec['pytest_args'])})")
    started = time.monotonic()
    stream_console(argv, share / "console.log", variant.timeout, variant.name)
    elapsed = time.monotonic() - started
    rc_file = share / "rc"
    rc = int(rc_file.read_text()) if rc_file.exists() else NO_RESULT
    say(f"variant {variant.name}: exit {rc} in {elapsed:.0f} s wall (output kept in {share})")
    (share / "wall_seconds").write_text(f"{elapsed:.1f}\n")
    return rc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="*", help=f"of {', '.join(VARIANTS)} (default: all)")
    parser.add_argument("--list", action="store_true", help="print the variants and their tests")
    parser.add_argument("--tests", nargs="+", help="run these pytest paths instead of each variant's")
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    args, pytest_args = parser.parse_args(argv[:split]), argv[split + 1 :]
    if args.list:
        for v in VARIANTS.values():
            print(f"{v.name:10} placement={v.placement} swap={v.swap} init={v.init}: {' '.join(v.tests)}")
        return 0
    unknown = [n for n in args.variants if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")
    if os.geteuid() != 0:
        raise SystemExit("v2lane: run it as root (the guest reads this machine's root-owned files over 9p)")
    for tool, package in (("qemu-system-x86_64", "qemu-system-x86"), ("busybox", "busybox-static")):
        if not shutil.which(tool):
            raise SystemExit(f"v2lane: {tool} not found: apt-get install -y {package}")
    kernel, modules_dir, release = ensure_kernel()
    initramfs = ensure_initramfs(modules_dir, release)
    results = {}
    for name in args.variants or list(VARIANTS):
        started = time.monotonic()
        rc = run_variant(VARIANTS[name], kernel, initramfs, modules_dir, pytest_args, args.tests)
        hung = rc == NO_RESULT
        if hung:  # the VM itself stopped answering (a test that hangs fails by pytest-timeout instead)
            say(f"variant {name}: the VM gave no result; booting it once more")
            rc = run_variant(VARIANTS[name], kernel, initramfs, modules_dir, pytest_args, args.tests)
        results[name] = (rc, time.monotonic() - started, hung)
    return summarize(results)


def summarize(results: dict[str, tuple[int, float, bool]]) -> int:
    """One line per variant (exit code, wall time, whether it took a second boot); the lane's
    exit code: 0 when every variant passed."""
    for name, (rc, wall, hung) in results.items():
        again = " (on a second boot: the first VM hung)" if hung else ""
        say(f"{name:10} {'passed' if rc == 0 else f'FAILED (exit {rc})'} in {wall:.0f} s{again}")
    return 0 if all(rc == 0 for rc, _, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

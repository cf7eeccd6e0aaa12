"""PID 1 of the cgroup v2 lane's guest (see lane.py): set the machine up, run pytest, power off.

Reads /run/v2lane/variant.json (written by lane.py on the writable 9p share), writes the pytest
exit code to /run/v2lane/rc. Runs under the host's /usr/bin/python3 over 9p, standard library only.
As PID 1 it also reaps the orphans the tests leave (an unreaped zombie still answers kill(pid, 0)).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

SHARE = Path("/run/v2lane")
CGROUP = Path("/sys/fs/cgroup")
CONTROLLERS = "+cpu +memory +pids"
# Where the variants put the tests' processes (and so the agents they start).
LEAF = CGROUP / "system.slice" / "kubelet-emu.service"
CONTAINER = CGROUP / "lane-container"
CLUSTER_DIR = "/tmp/v2lane-cluster"


def log(message: str) -> None:
    print(f"v2lane-guest: {message}", flush=True)


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True)


def mount(fstype: str, source: str, target: str, options: str = "") -> None:
    os.makedirs(target, exist_ok=True)
    sh("mount", "-t", fstype, *(("-o", options) if options else ()), source, target)


def setup_machine(spec: dict[str, object]) -> None:
    mount("cgroup2", "cgroup2", str(CGROUP), "nsdelegate")
    mount("devpts", "devpts", "/dev/pts", "gid=5,mode=620,ptmxmode=666")
    mount("tmpfs", "tmpfs", "/dev/shm", "mode=1777")
    mount("tmpfs", "tmpfs", "/tmp", "mode=1777")
    # The cached kernel's modules where modprobe looks; busybox modprobe stands in for kmod's.
    release = os.uname().release
    modules = f"/lib/modules/{release}"
    os.makedirs(modules, exist_ok=True)
    sh("mount", "--bind", str(spec["modules_dir"]), modules)
    if not os.path.exists("/sbin/modprobe"):
        os.symlink("/bin/busybox", "/sbin/modprobe")
    Path("/proc/sys/kernel/modprobe").write_text("/sbin/modprobe\n")
    sh("ip", "link", "set", "lo", "up")
    sh("hostname", f"v2lane-{spec['name']}")
    if spec.get("swap"):
        enable_swap()


def enable_swap() -> None:
    sh("/sbin/modprobe", "zram")
    Path("/sys/block/zram0/disksize").write_text("2G\n")
    sh("mkswap", "-q", "/dev/zram0")
    sh("swapon", "/dev/zram0")
    log("swap on: " + Path("/proc/swaps").read_text().strip().splitlines()[-1])


def placement_argv(placement: str, argv: list[str]) -> tuple[list[str], Path | None]:
    """The command wrapped for its placement, and the cgroup its process must join first."""
    if placement == "root":
        return argv, None
    if placement == "leaf":
        # What systemd does for a service: a leaf two levels down, controllers enabled above it.
        (CGROUP / "cgroup.subtree_control").write_text(CONTROLLERS)
        LEAF.mkdir(parents=True, exist_ok=True)
        (LEAF.parent / "cgroup.subtree_control").write_text(CONTROLLERS)
        return argv, LEAF
    if placement == "cgroupns":
        # A container: its own cgroup namespace whose root holds the processes, cgroup2
        # mounted at that root (as docker/kind do with a private cgroupns).
        (CGROUP / "cgroup.subtree_control").write_text(CONTROLLERS)
        CONTAINER.mkdir(exist_ok=True)
        remount = 'umount /sys/fs/cgroup && mount -t cgroup2 cgroup2 /sys/fs/cgroup && exec "$@"'
        return [
            "unshare",
            "--cgroup",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            remount,
            "sh",
            *argv,
        ], CONTAINER
    raise SystemExit(f"unknown placement {placement!r}")


def run_tests(spec: dict[str, object]) -> int:
    repo = str(spec["repo"])
    argv = [str(spec["python"]), "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *spec["pytest_args"]]  # type: ignore[misc]
    argv, cgroup = placement_argv(str(spec["placement"]), argv)
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "KUBELET_EMU_TEST_CLUSTER_DIR": CLUSTER_DIR,
        **dict(spec.get("env") or ()),  # type: ignore[arg-type]
    }

    def join_cgroup() -> None:
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text("0")

    log(f"running {' '.join(argv)}")
    child = subprocess.Popen(argv, cwd=repo, env=env, preexec_fn=join_cgroup)
    while True:  # reap everything; stop when pytest itself ends
        pid, status = os.waitpid(-1, 0)
        if pid == child.pid:
            return os.waitstatus_to_exitcode(status)


def main() -> None:
    started = time.monotonic()
    rc = 126
    try:
        spec = json.loads((SHARE / "variant.json").read_text())
        setup_machine(spec)
        log(f"ready after {time.monotonic() - started:.1f} s in PID 1")
        rc = run_tests(spec)
    except BaseException as e:  # PID 1 must never exit: report and power off
        log(f"setup failed: {e!r}")
    finally:
        (SHARE / "rc").write_text(f"{rc}\n")
        os.sync()
        subprocess.run(["busybox", "poweroff", "-f"], check=False)
        sys.exit(rc)


if __name__ == "__main__":
    main()

"""The systemd variant of the cgroup v2 lane: Debian's systemd as PID 1 in the guest.

    systemd_guest.py          as the guest's first PID 1: set the machine up as guest.py does,
                              write the lane's units into /etc/systemd/system (the tmpfs overlay),
                              then exec /lib/systemd/systemd --unit=v2lane.target
    systemd_guest.py --run    as v2lane-tests.service: run pytest, write its exit code to the
                              share; the unit powers the guest off when it ends

The systemd is this machine's own Debian package (the guest's root is this machine's root over
9p); the host itself is not booted with it. v2lane.target pulls in only the system D-Bus (the
agent's systemd driver talks to systemd through it) and the test service; the host's timers and
services stay off (masked in the overlay). Standard library only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import guest  # tests/v2lane/guest.py: the plain variant's PID 1, reused for the machine setup

SHARE = guest.SHARE
UNITS = Path("/etc/systemd/system")
SYSTEMD = "/lib/systemd/systemd"
# The host's units that make no sense in a throwaway test VM (time sync, apt, backups, fstrim).
MASKED = (
    "timers.target",
    "systemd-timesyncd.service",
    "getty.target",
    "docker-registry.service",
    "postgresql.service",
    "e2scrub_reap.service",
    "systemd-pstore.service",
    # tmpfiles' "D /tmp" empties /tmp at boot (in the overlay), hiding a checkout or venv that lives
    # there, as CI's clean clone does.
    "systemd-tmpfiles-setup.service",
    "systemd-tmpfiles-clean.service",
)

TARGET = """[Unit]
Description=cgroup v2 lane (systemd variant): the system bus and the tests
Requires=dbus.socket
Wants=dbus.service v2lane-tests.service
After=dbus.socket
AllowIsolate=yes
"""

SERVICE = """[Unit]
Description=cgroup v2 lane: pytest under systemd
Wants=dbus.service
After=dbus.service dbus.socket
SuccessAction=poweroff-force
FailureAction=poweroff-force

[Service]
Type=oneshot
ExecStart={python} {script} --run
StandardOutput=tty
StandardError=tty
TTYPath=/dev/console
TimeoutStartSec=infinity
# The dev cluster and test agents are this service's children; let it make cgroups below.
Delegate=yes
"""


def boot() -> None:
    spec = json.loads((SHARE / "variant.json").read_text())
    guest.setup_machine(spec)  # cgroup2, /tmp, modules, modprobe, loopback (systemd keeps them)
    for name in MASKED:
        link = UNITS / name
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    (UNITS / "v2lane.target").write_text(TARGET)
    host_python = "/usr/bin/python3"
    (UNITS / "v2lane-tests.service").write_text(SERVICE.format(python=host_python, script=Path(__file__).resolve()))
    guest.log("exec systemd as PID 1")
    os.execv(SYSTEMD, [SYSTEMD, "--unit=v2lane.target", "--show-status=0", "--log-level=notice"])


def run() -> int:
    spec = json.loads((SHARE / "variant.json").read_text())
    argv = [str(spec["python"]), "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *spec["pytest_args"]]
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "KUBELET_EMU_TEST_CLUSTER_DIR": guest.CLUSTER_DIR,
        **dict(spec.get("env") or ()),
    }
    init = Path("/proc/1/comm").read_text().strip()
    cgroup = Path("/proc/self/cgroup").read_text().strip()
    guest.log(f"PID 1 is {init}; this service's cgroup {cgroup}; running {' '.join(argv)}")
    rc = subprocess.run(argv, cwd=str(spec["repo"]), env=env, check=False).returncode
    (SHARE / "rc").write_text(f"{rc}\n")
    os.sync()
    return rc


if __name__ == "__main__":
    if sys.argv[1:] == ["--run"]:
        sys.exit(run())
    try:
        boot()
    except BaseException as exc:  # PID 1 must not exit: say why and power off
        guest.log(f"systemd variant setup failed: {exc!r}")
        (SHARE / "rc").write_text("126\n")
        os.sync()
        subprocess.run(["busybox", "poweroff", "-f"], check=False)

"""The Pod sandbox's namespace holder (what the pause container is for the kubelet).

    python -S -m runtimes.oci.pause STATE.json HOSTNAME FLAGS

FLAGS is a subset of "pinu": new pid, ipc, network and uts namespaces. The process unshares
them, sets the hostname in the new UTS namespace, brings up loopback in a new network namespace,
then forks the holder (pid 1 of the new pid namespace), writes its host pid to STATE.json and
exits. The holder sleeps, reaps zombies (with shareProcessNamespace it is the Pod's init) and
exits on SIGTERM. Containers join its namespaces through /proc/<pid>/ns/*. Standard library only.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import socket
import struct
import sys

from runtimes.shimlib import proc_start_ticks, write_json

CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
_FLAGS = {"p": CLONE_NEWPID, "i": CLONE_NEWIPC, "n": CLONE_NEWNET, "u": CLONE_NEWUTS}

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
PR_SET_NAME = 15


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def _hold(libc: ctypes.CDLL) -> None:
    """pid 1 of the Pod: wait for SIGTERM, reaping whatever is re-parented here meanwhile."""
    libc.prctl(PR_SET_NAME, b"pause", 0, 0, 0)  # what `ps` shows, as for the kubelet's pause container
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.closerange(3, 65536)

    def reap(*_: object) -> None:
        while True:
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    return
            except ChildProcessError:
                return

    signal.signal(signal.SIGCHLD, reap)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.signal(signal.SIGINT, lambda *_: os._exit(0))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    while True:
        signal.pause()


def main(state_path: str, hostname: str, flags: str) -> int:
    mask = 0
    for flag in flags:
        mask |= _FLAGS[flag]
    libc = ctypes.CDLL(None, use_errno=True)
    if mask and libc.unshare(mask) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare({flags}): {os.strerror(err)}")
    if "u" in flags:
        socket.sethostname(hostname)
    if "n" in flags:
        _loopback_up()
    pid = os.fork()
    if pid == 0:
        _hold(libc)
    write_json(state_path, {"pid": pid, "start_ticks": proc_start_ticks(pid), "flags": flags})
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 4:
        print("usage: python -m runtimes.oci.pause STATE.json HOSTNAME FLAGS", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(*sys.argv[1:]))

"""The per-container shim of the process backend (the role conmon plays for CRI-O).

    python -m runtimes.process.shim SPEC.json     (one container)
    python -m runtimes.process.shim --launcher    (reads spec paths on stdin; forks a shim for each)

The agent starts one shim per container in its own session, so the shim and
the container outlive an agent restart. The shim starts the container
process (own session and process group, in its cgroup before exec, with its
user, directory and environment), copies its stdout/stderr into the CRI log
file, waits for it, and writes the exit status next to the spec. Standard
library only, to stay small: one shim per running container.

Files in the container's state directory:
    spec.json   what to run (written by the agent)
    state.json  pids and start time (written by the shim once the process runs)
    exit.json   exit code, signal and time (written by the shim at the end)
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import json
import os
import selectors
import signal
import sys
import termios
import time

from network.netns import setns_fd
from runtimes.crilog import CriLogWriter
from runtimes.process.confine import confine
from runtimes.shimlib import become_subreaper, load_libc, now, proc_start_ticks, write_exit, write_json


def _child(spec: dict, out_w: int, err_w: int, tty: int | None = None) -> None:
    """In the forked child: become the container process, or exit 127/126 saying why. With `tty`
    (a terminal's slave) that terminal is its stdin, stdout, stderr and controlling terminal."""
    try:
        os.setsid()  # own session and process group: the agent signals the whole group
        for procs in spec.get("cgroup_procs", []):  # join the cgroup before exec, so all memory is charged there
            fd = os.open(procs, os.O_WRONLY)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)
        if spec.get("netns"):  # the Pod's network namespace: its IP, its loopback
            fd = os.open(spec["netns"], os.O_RDONLY)
            try:
                setns_fd(fd)  # os.setns is 3.12+
            finally:
                os.close(fd)
        if tty is not None:
            for fd in (0, 1, 2):
                os.dup2(tty, fd)
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        else:
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            stdin = os.open(spec.get("stdin_fifo") or os.devnull, os.O_RDONLY)  # the FIFO attach -i writes to
            os.dup2(stdin, 0)
        os.closerange(3, 65536)
        security = spec.get("security")
        if security:  # mount view, user, capabilities, no_new_privs, seccomp: in that order, last before exec
            bpf = security.get("seccomp_bpf")
            confine(security, base64.b64decode(bpf) if bpf else None)
        else:  # a spec written before securityContext was enforced (an adopted container's restart)
            if spec.get("gid") is not None:
                os.setgroups([])
                os.setgid(spec["gid"])
            if spec.get("uid") is not None:
                os.setuid(spec["uid"])
        os.chdir(spec["cwd"])
        os.execvpe(spec["argv"][0], spec["argv"], spec["env"])
    except FileNotFoundError as exc:
        os.write(2, f"exec {spec['argv'][0]!r}: {exc.strerror}\n".encode())
        os._exit(127)
    except BaseException as exc:
        os.write(2, f"cannot start container: {exc}\n".encode())
        os._exit(126)


def _read(fd: int) -> bytes:
    """Data, or b"" at the end: a terminal's master reads EIO once every slave is closed."""
    try:
        return os.read(fd, 65536)
    except OSError as exc:
        if exc.errno == errno.EIO:
            return b""
        raise


def _reap_orphans() -> None:
    while True:
        try:
            done, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if done == 0:
            return


def _kill_leftovers(pgid: int, cgroup_procs: list[str]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    me = os.getpid()
    for procs in cgroup_procs[:1]:
        try:
            with open(procs) as f:
                pids = [int(p) for p in f.read().split()]
        except OSError:
            continue
        for other in pids:
            if other != me:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(other, signal.SIGKILL)


def _open_stdin_fifo(spec: dict) -> int | None:
    """Container `stdin: true`: its stdin is a FIFO that `attach -i` writes to. The shim holds it
    open for writing, so the container reads EOF only when stdinOnce closes it (a stdin-close file
    the agent writes when the first attach's stdin ends)."""
    path = spec.get("stdin_fifo")
    if not path:
        return None
    if not os.path.exists(path):
        os.mkfifo(path, 0o600)
    return os.open(path, os.O_RDWR)


def main(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    directory = os.path.dirname(spec_path)
    become_subreaper()
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    stdin_keeper = _open_stdin_fifo(spec)
    # `tty: true`: a terminal, whose master the shim keeps (output to the log, the FIFO's input in).
    master, slave = os.openpty() if spec.get("tty") else (None, None)
    pid = os.fork()
    if pid == 0:
        os.close(out_r)
        os.close(err_r)
        _child(spec, out_w, err_w, slave)
    os.close(out_w)
    os.close(err_w)
    state = {
        "shim_pid": os.getpid(),
        "shim_start_ticks": proc_start_ticks(os.getpid()),
        "pid": pid,
        "start_ticks": proc_start_ticks(pid),
        "started_at": now(),
    }
    if slave is not None:
        state["tty"] = os.ttyname(slave)  # the agent sets the window size through it
        os.close(slave)
    write_json(os.path.join(directory, "state.json"), state)

    log = CriLogWriter(spec["log_path"], max_size=spec.get("log_max_size", 10 * 1024 * 1024),
                       max_files=spec.get("log_max_files", 5))  # fmt: skip
    sel = selectors.DefaultSelector()
    sel.register(out_r, selectors.EVENT_READ, "stdout")
    sel.register(err_r, selectors.EVENT_READ, "stderr")
    open_fds = 2
    if master is not None:
        sel.register(master, selectors.EVENT_READ, "stdout")  # both streams, as the CRI log has them
        open_fds += 1
        if stdin_keeper is not None:
            sel.register(stdin_keeper, selectors.EVENT_READ, "stdin")
    status: int | None = None
    drain_until = None
    while open_fds and (drain_until is None or time.monotonic() < drain_until):
        for key, _ in sel.select(timeout=0.2):
            data = _read(key.fd)
            if key.data == "stdin":
                if data and master is not None:
                    with contextlib.suppress(OSError):
                        os.write(master, data)
                continue
            if data:
                log.write(key.data, data)
            else:
                sel.unregister(key.fd)
                os.close(key.fd)
                open_fds -= 1
        if stdin_keeper is not None and os.path.exists(os.path.join(directory, "stdin-close")):
            if master is not None:  # a terminal has no end of input but the EOF character
                sel.unregister(stdin_keeper)
                with contextlib.suppress(OSError):
                    os.write(master, b"\x04")
            os.close(stdin_keeper)  # stdinOnce: the container now reads EOF
            stdin_keeper = None
        if status is None:
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = st
                # The main process ended, so the container has: like a pid namespace
                # going away, whatever it left behind goes too.
                _kill_leftovers(pid, spec.get("cgroup_procs", []))
                drain_until = time.monotonic() + 2.0
    if status is None:
        _, status = os.waitpid(pid, 0)
    _reap_orphans()
    log.close()
    write_exit(directory, status)
    return 0


def launcher() -> int:
    """Start shims by forking this already-loaded interpreter: one line on stdin (a spec path)
    per container. A fork costs about a millisecond where a new interpreter costs tens, which
    is most of a process Pod's start time. Ends at EOF, i.e. when the agent goes away; the
    shims it started live on in their own sessions."""
    signal.signal(signal.SIGCHLD, lambda *_: _reap_orphans())
    load_libc()
    for line in sys.stdin:
        spec_path = line.strip()
        if not spec_path:
            continue
        if os.fork() == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the shim waits for its own child
            os.setsid()
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 0)
            log_fd = os.open(os.path.join(os.path.dirname(spec_path), "shim.log"), os.O_WRONLY | os.O_CREAT, 0o600)
            os.dup2(log_fd, 2)
            try:
                code = main(spec_path)
            except BaseException as exc:
                os.write(2, f"shim failed: {exc}\n".encode())
                code = 1
            os._exit(code)
    return 0


if __name__ == "__main__":
    time.tzset()
    if sys.argv[1:] == ["--launcher"]:
        sys.exit(launcher())
    if len(sys.argv) != 2:
        print("usage: python -m runtimes.process.shim SPEC.json | --launcher", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))

"""The per-container shim of the oci backend (the role conmon or containerd-shim plays).

    python -S -m runtimes.oci.shim [--detach] SPEC.json
    python -S -m runtimes.oci.shim --launcher     (JSON commands on stdin; forks shims and Pod holders)

Started by the backend in its own session, so it and its container outlive an agent restart.
It makes the container's stdout/stderr pipes, runs `<runtime> create` with them as the
container's stdio (the runtime passes them through to the container process), becomes the child
subreaper so the container's init is re-parented to it when the runtime's create process exits,
copies the pipes into the CRI log file, reaps the init and records its exit status. A container
with `tty: true` gets a terminal instead: the runtime makes it and hands its master to the shim
over a console socket (`--console-socket`), and the shim copies the master as the pipes.

Files next to SPEC.json:
    state.json  {"pid", "start_ticks", "shim_pid", "shim_start_ticks", "created_at"} once created,
                or {"error": "..."} when `create` failed
    exit.json   {"exit_code", "signal", "finished_at"} when the container's init has exited
    shim.log    the shim's own errors
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import selectors
import signal
import socket
import struct
import sys
import termios
import time

from runtimes.crilog import CriLogWriter
from runtimes.oci.attach import AttachHub
from runtimes.shimlib import become_subreaper, load_libc, now, proc_start_ticks, write_exit, write_json

DRAIN_AFTER_EXIT = 2.0  # seconds to keep reading the pipes after init exits (a daemonized child may hold them)


def _create(spec: dict, out_w: int, err_w: int, in_r: int | None) -> tuple[int, str]:
    """Run `<runtime> create`; returns its exit status and what it logged on failure."""
    runtime_log = os.path.join(spec["dir"], "runtime.log")
    console = ["--console-socket", spec["console_socket"]] if spec.get("console_socket") else []
    argv = [*spec["runtime"], "--log", runtime_log, "create", "--bundle", spec["bundle"],
            "--pid-file", spec["pid_file"], *console, spec["id"]]  # fmt: skip
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(in_r if in_r is not None else os.open(os.devnull, os.O_RDONLY), 0)
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            os.closerange(3, 65536)
            os.execvp(argv[0], argv)
        finally:
            os._exit(127)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 0:
        return 0, ""
    try:
        with open(runtime_log, errors="replace") as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
    except OSError:
        lines = []
    return code, _runtime_message(lines[-3:]) or f"{argv[0]} create exited with {code}"


def _runtime_message(lines: list[str]) -> str:
    """runc logs JSON lines ({"level", "msg"}); other runtimes plain text."""
    out = []
    for line in lines:
        try:
            record = json.loads(line)
            out.append(str(record.get("msg", line)))
        except ValueError:
            out.append(line)
    return "; ".join(out)


def _console_listener(path: str) -> socket.socket:
    """Where the runtime sends the terminal's master (root only)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    os.chmod(path, 0o600)
    server.listen(1)
    return server


def _receive_master(server: socket.socket, path: str) -> int:
    """The master the runtime sent during `create` (waiting in the socket's queue by now)."""
    try:
        server.settimeout(5.0)
        conn, _ = server.accept()
        with conn:
            _, fds, _, _ = socket.recv_fds(conn, 4096, 1)
    finally:
        server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    if not fds:
        raise OSError("the runtime sent no terminal over the console socket")
    return fds[0]


def _read(fd: int) -> bytes | None:
    """Data, b"" at the end (a terminal's master reads EIO once the container is gone), or None
    when there is nothing after all (the master is non-blocking once attach stdin shares it)."""
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return None
    except OSError as exc:
        if exc.errno == errno.EIO:
            return b""
        raise


def main(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    directory = spec["dir"]
    become_subreaper()
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    tty = bool(spec.get("console_socket"))
    in_r, in_w = os.pipe() if spec.get("stdin") and not tty else (None, None)
    console = _console_listener(spec["console_socket"]) if tty else None
    code, message = _create(spec, out_w, err_w, in_r)
    os.close(out_w)
    os.close(err_w)
    if in_r is not None:
        os.close(in_r)
    master = None
    if console is not None:
        if code == 0:
            try:
                master = _receive_master(console, spec["console_socket"])
            except OSError as exc:
                code, message = 1, f"no terminal from the runtime: {exc}"
        else:
            console.close()
    if code != 0:
        write_json(os.path.join(directory, "state.json"), {"error": message})
        return 1
    with open(spec["pid_file"]) as f:
        pid = int(f.read().strip())
    write_json(
        os.path.join(directory, "state.json"),
        {
            "shim_pid": os.getpid(),
            "shim_start_ticks": proc_start_ticks(os.getpid()),
            "pid": pid,
            "start_ticks": proc_start_ticks(pid),
            "created_at": now(),
        },
    )
    log = CriLogWriter(spec["log_path"], max_size=spec["log_max_size"], max_files=spec["log_max_files"])
    sel = selectors.DefaultSelector()
    sel.register(out_r, selectors.EVENT_READ, "stdout")
    sel.register(err_r, selectors.EVENT_READ, "stderr")
    open_fds = 2
    on_resize = None
    if master is not None:  # the terminal carries both streams, as stdout (the CRI log's way)
        sel.register(master, selectors.EVENT_READ, "stdout")
        open_fds += 1
        in_w = os.dup(master) if spec.get("stdin") else None

        def on_resize(width: int, height: int) -> None:
            with contextlib.suppress(OSError):
                fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

    hub = None
    if spec.get("attach_socket"):
        hub = AttachHub(sel, spec["attach_socket"], in_w, bool(spec.get("stdin_once")), on_resize)
    status: int | None = None
    drain_until: float | None = None
    while True:
        for key, mask in sel.select(timeout=0.2):
            if key.data not in ("stdout", "stderr"):
                key.data(mask)  # an attach client or the container's stdin
                continue
            data = _read(key.fd)
            if data is None:
                continue
            if data:
                log.write(key.data, data)
                if hub is not None:
                    hub.broadcast(key.data, data)
            else:
                sel.unregister(key.fd)
                os.close(key.fd)
                open_fds -= 1
        # Reap everything re-parented to us: the container's init, and orphans of `runtime exec`.
        while status is None:
            try:
                done, st = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:  # init is not ours to wait for: should not happen, but never hang
                status = 255 << 8
                break
            if done == 0:
                break
            if done == pid:
                status = st
                drain_until = time.monotonic() + DRAIN_AFTER_EXIT
        if status is not None and (not open_fds or time.monotonic() > (drain_until or 0)):
            break
    if hub is not None:
        hub.close()
    log.close()
    write_exit(directory, status)
    return 0


def _shim_child(spec_path: str) -> None:
    """In a forked child: become the shim in a session of its own; never returns."""
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    log_path = os.path.join(os.path.dirname(spec_path), "shim.log")
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    os.close(devnull)
    try:
        code = main(spec_path)
    except BaseException as exc:
        os.write(2, f"oci shim failed: {exc!r}\n".encode())
        state = os.path.join(os.path.dirname(spec_path), "state.json")
        if not os.path.exists(state):  # tell the agent now rather than after its timeout
            write_json(state, {"error": f"the shim failed: {exc!r}"})
        code = 1
    os._exit(code)


def _pause_child(state_path: str, hostname: str, flags: str) -> None:
    """In a forked child: make the Pod's namespaces and their holder (runtimes/oci/pause.py)."""
    from runtimes.oci import pause

    os.setsid()
    try:
        code = pause.main(state_path, hostname, flags)
    except BaseException as exc:
        write_json(state_path, {"error": f"{exc}"})
        code = 1
    os._exit(code)


def detached(spec_path: str) -> int:
    """Fork the shim into its own session and return at once: the agent waits only for this short
    parent, and the shim is nobody's child but init's (and survives the agent)."""
    if os.fork() == 0:
        _shim_child(spec_path)
    return 0


def launcher() -> int:
    """Fork shims and Pod namespace holders from this already-loaded interpreter, one JSON
    command per line on stdin: {"shim": SPEC} or {"pause": [STATE, HOSTNAME, FLAGS]}. A fork
    costs a millisecond where a new interpreter costs tens to hundreds on a busy node. Ends at
    EOF, i.e. when the agent goes away; what it started lives on in its own sessions."""

    def reap(*_: object) -> None:
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass

    signal.signal(signal.SIGCHLD, reap)
    load_libc()  # once, for every child to become a subreaper cheaply (the launcher itself is not one)
    from runtimes.oci import pause  # noqa: F401 - imported once here rather than in every child

    for line in sys.stdin:
        try:
            command = json.loads(line)
        except ValueError:
            continue
        if os.fork() == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the shim waits for its own children
            if "shim" in command:
                _shim_child(command["shim"])
            _pause_child(*command["pause"])
    return 0


if __name__ == "__main__":
    time.tzset()
    if len(sys.argv) == 3 and sys.argv[1] == "--detach":
        sys.exit(detached(sys.argv[2]))
    if sys.argv[1:] == ["--launcher"]:
        sys.exit(launcher())
    if len(sys.argv) != 2:
        print("usage: python -m runtimes.oci.shim [--detach] SPEC.json | --launcher", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))

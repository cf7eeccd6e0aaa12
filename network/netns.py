"""Named network namespaces (/run/netns/NAME, the layout `ip netns` uses) without forking.

Namespaces belong to a thread, not to the process: work that has to happen inside a Pod's
namespace runs on a fresh one-shot thread that switches with setns(2) and then ends, so no
pooled thread can be left behind in the wrong namespace. Sockets keep the namespace they were
created in, so a socket made there is usable from the event loop afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

NETNS_RUN_DIR = Path("/run/netns")

CLONE_NEWNET = 0x40000000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SHARED = 1 << 20
MNT_DETACH = 2
NETLINK_ROUTE = 0

T = TypeVar("T")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_run_dir_ready = threading.Lock()
_run_dir_shared = False


class NetnsError(OSError):
    pass


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise NetnsError(err, f"{what}: {os.strerror(err)}")


def setns_fd(fd: int) -> None:
    """Move the calling thread into the network namespace `fd` refers to."""
    _check(_libc.setns(fd, CLONE_NEWNET), "setns")


def netns_path(name_or_path: str) -> str:
    """A namespace name (`emu-<uid>`) or path, as a path."""
    return name_or_path if "/" in name_or_path else str(NETNS_RUN_DIR / name_or_path)


def is_netns(path: str) -> bool:
    """Whether `path` is a mounted network namespace (nsfs), not a leftover empty file."""
    try:
        return os.stat(path).st_dev == os.stat("/proc/self/ns/net").st_dev
    except FileNotFoundError:
        return False


def list_netns(prefix: str = "") -> list[str]:
    """Names under /run/netns starting with `prefix`."""
    try:
        return sorted(n for n in os.listdir(NETNS_RUN_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


async def in_new_thread(fn: Callable[[], T]) -> T:
    """Run `fn` on a thread of its own that ends afterwards (whatever namespace it is left in)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result = fn()
        except BaseException as e:
            loop.call_soon_threadsafe(deliver, None, e)
        else:
            loop.call_soon_threadsafe(deliver, result, None)

    threading.Thread(target=run, name="netns", daemon=True).start()
    return await future


def _run_in_netns_sync(path: str, fn: Callable[[], T]) -> T:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns_fd(fd)
    finally:
        os.close(fd)
    return fn()


async def run_in_netns(path: str, fn: Callable[[], T]) -> T:
    """Run the blocking `fn` inside the namespace at `path` (on a one-shot thread)."""
    if not is_netns(path):
        raise NetnsError(errno.ENOENT, f"network namespace {path} does not exist")
    return await in_new_thread(lambda: _run_in_netns_sync(path, fn))


def _ensure_shared_run_dir() -> None:
    """Make /run/netns a shared mount point, as `ip netns add` does, so that unmounting a
    namespace here also unmounts it in mount namespaces copied later (containers, `ip netns
    exec`), instead of keeping it alive there."""
    global _run_dir_shared
    with _run_dir_ready:
        if _run_dir_shared:
            return
        NETNS_RUN_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        run_dir = str(NETNS_RUN_DIR).encode()
        if _libc.mount(b"none", run_dir, None, MS_SHARED | MS_REC, None) != 0:
            # Not a mount point yet: bind it onto itself, then share it.
            _check(_libc.mount(run_dir, run_dir, b"none", MS_BIND | MS_REC, None), f"bind-mount {NETNS_RUN_DIR}")
            _check(_libc.mount(b"none", run_dir, None, MS_SHARED | MS_REC, None), f"make {NETNS_RUN_DIR} shared")
        _run_dir_shared = True


def _no_ipv6_on_new_interfaces() -> None:
    """In the calling thread's (new) namespace: interfaces made from now on get no IPv6. Pods
    have IPv4 only, and each IPv6 interface costs kernel work (link-local address, duplicate
    address detection, multicast reports) that slows down starting many Pods. lo exists
    already and keeps ::1."""
    # /proc/sys/net shows the sysctls of the opening thread's namespace; no file: a kernel without IPv6.
    with contextlib.suppress(FileNotFoundError), open("/proc/sys/net/ipv6/conf/default/disable_ipv6", "w") as f:
        f.write("1")


def _create_netns_sync(path: str) -> None:
    # Runs on a one-shot thread: unshare() gives only this thread the new namespace.
    _ensure_shared_run_dir()
    if os.path.exists(path) and not is_netns(path):
        os.unlink(path)  # an empty mount point left by a crash between creating and mounting it
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0)
    os.close(fd)
    try:
        _check(_libc.unshare(CLONE_NEWNET), f"unshare a network namespace for {path}")
        _no_ipv6_on_new_interfaces()
        source = f"/proc/self/task/{threading.get_native_id()}/ns/net".encode()
        _check(_libc.mount(source, path.encode(), b"none", MS_BIND, None), f"bind-mount the namespace to {path}")
    except BaseException:
        os.unlink(path)
        raise


async def create_netns(name: str) -> str:
    """Create the named namespace; returns its path. Fails with FileExistsError if it exists."""
    path = netns_path(name)
    await in_new_thread(lambda: _create_netns_sync(path))
    return path


def remove_netns_sync(path: str) -> bool:
    """Unmount and delete a named namespace; False when it was not there. Processes still inside
    keep it alive, unnamed, until they exit."""
    existed = os.path.exists(path)
    if _libc.umount2(path.encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):  # EINVAL: not mounted (a leftover empty file)
            raise NetnsError(err, f"unmount network namespace {path}: {os.strerror(err)}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return existed


async def remove_netns(name_or_path: str) -> bool:
    path = netns_path(name_or_path)
    return await asyncio.to_thread(remove_netns_sync, path)


async def netlink_socket_in(path: str) -> int:
    """A NETLINK_ROUTE socket (its fd) that talks to the namespace at `path`, for
    `AsyncIPRoute(fileno=...)`. The caller owns the fd."""

    def make() -> socket.socket:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_ROUTE)

    # A socket object until here, so that a cancelled caller leaves it to the GC, not leaked.
    return (await run_in_netns(path, make)).detach()


async def connect_in_netns(
    netns_path: str, host: str, port: int, timeout: float = 10.0
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a TCP connection from inside the namespace at `netns_path` (its loopback included)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"cannot resolve {host!r}")
    family, type_, proto, _, address = infos[0]

    def make() -> socket.socket:
        s = socket.socket(family, type_, proto)
        s.setblocking(False)
        return s

    sock = await run_in_netns(netns_path, make)
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, address)
        return await asyncio.open_connection(sock=sock)
    except BaseException:
        sock.close()
        raise


def enter_netns_preexec(netns_path: str) -> Callable[[], None]:
    """A subprocess `preexec_fn` that moves the child into the namespace at `netns_path` before
    exec (the child's other namespaces stay the host's)."""
    path = netns_path
    setns = _libc.setns  # looked up now: the child should do as little as possible

    def enter() -> None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"cannot enter network namespace {path}: {os.strerror(err)}")
        finally:
            os.close(fd)

    return enter

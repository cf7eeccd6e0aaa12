"""systemd's D-Bus API (org.freedesktop.systemd1.Manager) for transient units, over dbus-fast.

dbus-fast: asyncio-native, maintained, typed variants, with C-accelerated marshalling; the calls
here are low-level messages (no introspection round trip). A job (start, stop) is done when
systemd sends JobRemoved for it; its result ("done", "failed", ...) decides success, as go-systemd
waits for it for runc.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from cgroups.detect import CgroupError
from cgroups.systemd_units import Property, parse_version

SYSTEMD = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER = "org.freedesktop.systemd1.Manager"
JOB_TIMEOUT = 30.0  # seconds, as runc waits for a unit's start/stop job
_JOB_REMOVED = f"type='signal',sender='{SYSTEMD}',interface='{MANAGER}',member='JobRemoved'"
_FIX = 'run the agent on a host booted with systemd and its system D-Bus, or set cgroup_driver = "cgroupfs"'


class SystemdError(CgroupError):
    """systemd refused or failed a request; the message names the unit and the D-Bus error."""

    def __init__(self, message: str, name: str = ""):
        super().__init__(message)
        self.name = name  # the D-Bus error name, e.g. org.freedesktop.systemd1.UnitExists


def variants(properties: Iterable[Property]) -> list[list[Any]]:
    """[(name, signature, value)] -> the a(sv) body D-Bus wants."""
    return [[name, Variant(signature, value)] for name, signature, value in properties]


class Systemd:
    """One connection to the system bus, opened on first use, shared by every call."""

    def __init__(self, bus_address: str | None = None):
        self._address = bus_address
        self._bus: MessageBus | None = None
        self._lock = asyncio.Lock()
        self._jobs: dict[str, asyncio.Future[str]] = {}
        self._finished: dict[str, str] = {}  # jobs removed before anyone waited for them
        self._version: int | None = None

    async def _connect(self) -> MessageBus:
        async with self._lock:
            if self._bus is not None and self._bus.connected:
                return self._bus
            try:
                bus = MessageBus(bus_address=self._address, bus_type=BusType.SYSTEM)
                await bus.connect()
            except (OSError, ValueError, Exception) as exc:
                raise SystemdError(f"cannot connect to the system D-Bus to reach systemd: {exc}; {_FIX}") from exc
            bus.add_message_handler(self._on_message)
            self._bus = bus
            self._jobs.clear()
            await self._call("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "AddMatch",
                             "s", [_JOB_REMOVED])  # fmt: skip
            await self._call(SYSTEMD, MANAGER_PATH, MANAGER, "Subscribe")
            return bus

    def _on_message(self, message: Message) -> None:
        if message.message_type != MessageType.SIGNAL or message.member != "JobRemoved":
            return
        _, job, _, result = message.body
        waiter = self._jobs.pop(job, None)
        if waiter is None:
            self._finished[job] = result
            if len(self._finished) > 256:  # other clients' jobs: keep only the newest
                self._finished.pop(next(iter(self._finished)))
        elif not waiter.done():
            waiter.set_result(result)

    async def _call(
        self, destination: str, path: str, interface: str, member: str, signature: str = "", body: list | None = None
    ) -> list[Any]:
        bus = self._bus if self._bus is not None and self._bus.connected else await self._connect()
        reply = await bus.call(Message(destination=destination, path=path, interface=interface, member=member,
                                       signature=signature, body=body or []))  # fmt: skip
        assert reply is not None
        if reply.message_type == MessageType.ERROR:
            detail = reply.body[0] if reply.body else ""
            raise SystemdError(f"{member}: {reply.error_name}: {detail}", reply.error_name or "")
        return list(reply.body)

    async def _manager(self, member: str, signature: str = "", body: list | None = None) -> list[Any]:
        return await self._call(SYSTEMD, MANAGER_PATH, MANAGER, member, signature, body)

    async def _wait_job(self, job: str, unit: str, action: str) -> None:
        if job in self._finished:
            result = self._finished.pop(job)
        else:
            waiter = self._jobs.setdefault(job, asyncio.get_running_loop().create_future())
            try:
                result = await asyncio.wait_for(waiter, JOB_TIMEOUT)
            except TimeoutError:
                self._jobs.pop(job, None)
                raise SystemdError(f"systemd did not {action} {unit} within {JOB_TIMEOUT:.0f} s") from None
        if result != "done":
            with contextlib.suppress(SystemdError):
                await self._manager("ResetFailedUnit", "s", [unit])
            raise SystemdError(f"systemd could not {action} {unit}: job {result}; see `journalctl -u {unit}`")

    async def version(self) -> int:
        """systemd's version number (252), -1 when it does not say."""
        if self._version is None:
            (value,) = await self._call(SYSTEMD, MANAGER_PATH, "org.freedesktop.DBus.Properties", "Get", "ss",
                                        [MANAGER, "Version"])  # fmt: skip
            self._version = parse_version(str(value.value))
        return self._version

    async def start_transient_unit(self, unit: str, properties: Iterable[Property]) -> bool:
        """Start a transient unit and wait for its job. False (nothing done) when it already exists."""
        body = [unit, "replace", variants(properties), []]
        try:
            (job,) = await self._manager("StartTransientUnit", "ssa(sv)a(sa(sv))", body)
        except SystemdError as exc:
            if exc.name == "org.freedesktop.systemd1.UnitExists":
                return False
            raise SystemdError(f"cannot start {unit}: {exc}; {_FIX}", exc.name) from exc
        await self._wait_job(job, unit, "start")
        return True

    async def set_unit_properties(self, unit: str, properties: Iterable[Property]) -> None:
        """Change a running unit's properties (runtime=true: nothing is written to /etc)."""
        try:
            await self._manager("SetUnitProperties", "sba(sv)", [unit, True, variants(properties)])
        except SystemdError as exc:
            raise SystemdError(f"cannot set the properties of {unit}: {exc}", exc.name) from exc

    async def stop_unit(self, unit: str) -> None:
        """Stop a unit and wait for it; a unit that does not exist (any more) is fine."""
        try:
            (job,) = await self._manager("StopUnit", "ss", [unit, "replace"])
        except SystemdError as exc:
            if exc.name == "org.freedesktop.systemd1.NoSuchUnit":
                return
            raise SystemdError(f"cannot stop {unit}: {exc}", exc.name) from exc
        await self._wait_job(job, unit, "stop")

    async def unit_state(self, unit: str) -> str | None:
        """ActiveState of a loaded unit ("active", "inactive", ...), None when systemd does not know it."""
        try:
            (path,) = await self._manager("GetUnit", "s", [unit])
        except SystemdError as exc:
            if exc.name == "org.freedesktop.systemd1.NoSuchUnit":
                return None
            raise
        (value,) = await self._call(SYSTEMD, path, "org.freedesktop.DBus.Properties", "Get", "ss",
                                    ["org.freedesktop.systemd1.Unit", "ActiveState"])  # fmt: skip
        return str(value.value)

    async def close(self) -> None:
        if self._bus is not None:
            self._bus.disconnect()
            self._bus = None

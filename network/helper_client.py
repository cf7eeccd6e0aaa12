"""The agent's end of the Pod network helper (network/helper.py): the PodNetworks calls, answered
by a child process. The helper is started at the first call and again after it dies; `start` is
replayed then, and a setup or teardown cut short by the death is sent once more (both are
idempotent), so a helper crash costs a Pod a retry, not its sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from network.podnet import PodNet, PodNetworkError

log = logging.getLogger("kubelet_emu.network")

REPO = Path(__file__).resolve().parent.parent


class HelperGoneError(PodNetworkError):
    """The helper exited before it answered."""


class NetworkHelper:
    def __init__(self, state_dir: Path, bridge: str, masquerade: bool = False, netns_prefix: str = "emu-") -> None:
        self.state_dir = Path(state_dir)
        self.bridge = bridge
        self.masquerade = masquerade
        self.netns_prefix = netns_prefix
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[int, tuple[asyncio.subprocess.Process, asyncio.Future[Any]]] = {}
        self._ids = itertools.count(1)
        self._spawn_lock = asyncio.Lock()
        self._cidr: str | None = None  # replayed into a restarted helper

    # --- the PodNetworks calls ----------------------------------------------------------------

    async def start(self, pod_cidr: str) -> None:
        await self._call("start", pod_cidr)
        self._cidr = pod_cidr

    async def setup(self, pod_uid: str, namespace: str, name: str) -> PodNet:
        return PodNet(**await self._call_retrying("setup", pod_uid, namespace, name))

    async def teardown(self, pod_uid: str) -> None:
        await self._call_retrying("teardown", pod_uid)

    async def cleanup_orphans(self, keep: set[str]) -> list[str]:
        return list(await self._call_retrying("cleanup", sorted(keep)))

    async def stop(self, remove_bridge: bool = False) -> None:
        """Stop the helper (after its own stop: the MASQUERADE rule goes); Pods keep their networks."""
        if self._proc is None or self._proc.returncode is not None:
            return
        with contextlib.suppress(PodNetworkError):
            await self._call("stop", remove_bridge)
        await self.close()

    async def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()  # EOF: the helper finishes what it has and exits
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        if self._reader is not None:
            await self._reader

    # --- the pipe -----------------------------------------------------------------------------

    async def _call_retrying(self, op: str, *args: Any) -> Any:
        try:
            return await self._call(op, *args)
        except HelperGoneError as exc:
            log.warning("network helper died; retrying", extra={"op": op, "error": str(exc)})
            return await self._call(op, *args)

    async def _call(self, op: str, *args: Any) -> Any:
        return await self._send(await self._running(), op, list(args))

    async def _send(self, proc: asyncio.subprocess.Process, op: str, args: list[Any]) -> Any:
        request_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = (proc, future)
        try:
            assert proc.stdin is not None
            proc.stdin.write(json.dumps({"id": request_id, "op": op, "args": args}).encode() + b"\n")
            await proc.stdin.drain()
            return await future
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise HelperGoneError(f"network helper is gone: {exc}") from exc
        finally:
            self._pending.pop(request_id, None)

    async def _running(self) -> asyncio.subprocess.Process:
        async with self._spawn_lock:
            if self._proc is not None and self._proc.returncode is None:
                return self._proc
            argv = [sys.executable, "-m", "network.helper", "--state-dir", str(self.state_dir),
                    "--bridge", self.bridge, "--netns-prefix", self.netns_prefix]  # fmt: skip
            if self.masquerade:
                argv.append("--masquerade")
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                start_new_session=True,  # not in the agent's process group: Ctrl-C is the agent's
                cwd=REPO, env=env, limit=1 << 20,
            )  # fmt: skip
            self._proc = proc
            self._reader = asyncio.create_task(self._read_answers(proc), name="network-helper-answers")
            if self._cidr is not None:  # a restarted helper: make sure the bridge is there again
                await self._send(proc, "start", [self._cidr])
            return proc

    async def _read_answers(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            try:
                answer = json.loads(line)
            except ValueError:
                log.error("network helper said something unreadable: %r", line[:200])
                continue
            entry = self._pending.get(answer.get("id"))
            if entry is None or entry[1].done():
                continue
            future = entry[1]
            if "error" in answer:
                future.set_exception(PodNetworkError(answer["error"]))
            else:
                future.set_result(answer.get("result"))
        code = await proc.wait()
        gone = HelperGoneError(f"network helper exited with code {code} before answering")
        for owner, future in list(self._pending.values()):
            if owner is proc and not future.done():
                future.set_exception(gone)

"""The Pod network helper: PodNetworks in a process of its own, driven over a pipe.

    python -m network.helper --state-dir DIR --bridge NAME [--masquerade] [--netns-prefix P]

Why a process: building and parsing netlink messages is Python work (pyroute2), and the kernel
does rtnetlink requests inside the sending syscall. In the agent's process that work would share
one interpreter lock with everything else the agent does; here it runs on another core, and
the agent never waits on the kernel.

Protocol, one JSON object a line. Requests on stdin:
    {"id": 7, "op": "setup", "args": ["<pod uid>", "<namespace>", "<name>"]}
ops: start [cidr], setup [uid, namespace, name], teardown [uid], cleanup [kept uids],
stop [remove_bridge]. Answers on stdout, in any order:
    {"id": 7, "result": ...}   or   {"id": 7, "error": "<message>"}
Requests run concurrently. EOF on stdin ends the process; the Pods keep their networks.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from network.pods import PodNetworks

log = logging.getLogger("kubelet_emu.network.helper")


async def _answer(networks: PodNetworks, request: dict[str, Any]) -> dict[str, Any]:
    op, args = request.get("op"), request.get("args") or []
    try:
        if op == "start":
            await networks.start(args[0])
            result: Any = None
        elif op == "setup":
            result = dataclasses.asdict(await networks.setup(args[0], args[1], args[2]))
        elif op == "teardown":
            await networks.teardown(args[0])
            result = None
        elif op == "cleanup":
            result = await networks.cleanup_orphans(set(args[0]))
        elif op == "stop":
            await networks.stop(remove_bridge=bool(args and args[0]))
            result = None
        else:
            raise ValueError(f"unknown request {op!r}")
    except Exception as exc:  # every failure goes back to the agent, named; the helper carries on
        return {"id": request.get("id"), "error": str(exc) or type(exc).__name__}
    return {"id": request.get("id"), "result": result}


async def serve(networks: PodNetworks) -> None:
    loop = asyncio.get_running_loop()
    # Netlink and file work runs on threads that mostly wait in the kernel; a few more than the
    # default (cores + 4) keep the agent's 16 concurrent setups from queueing for one.
    loop.set_default_executor(ThreadPoolExecutor(max_workers=16, thread_name_prefix="net"))
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout.buffer
    tasks: set[asyncio.Task[None]] = set()

    async def handle(line: bytes) -> None:
        try:
            request = json.loads(line)
        except ValueError:
            log.error("unreadable request: %r", line[:200])
            return
        answer = await _answer(networks, request)
        out.write(json.dumps(answer).encode() + b"\n")  # a line: small, written whole
        out.flush()

    while line := await reader.readline():
        task = asyncio.create_task(handle(line))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks)


def main() -> int:
    ap = argparse.ArgumentParser(description="kubelet-emu Pod network helper (started by the agent)")
    ap.add_argument("--state-dir", type=Path, required=True)
    ap.add_argument("--bridge", required=True)
    ap.add_argument("--masquerade", action="store_true")
    ap.add_argument("--netns-prefix", default="emu-")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="network-helper %(levelname)s %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the agent, which ends us with EOF
    networks = PodNetworks(args.state_dir, bridge=args.bridge, masquerade=args.masquerade,
                           netns_prefix=args.netns_prefix)  # fmt: skip
    asyncio.run(serve(networks))
    return 0


if __name__ == "__main__":
    sys.exit(main())

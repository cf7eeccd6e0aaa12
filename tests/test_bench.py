"""The benchmarks report an agent that died at start (exit code and log tail) instead of crashing
on its missing /proc entries."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from bench.common import AgentExitedError, check_agent, run_main
from bench.run import Bench

DIES_AT_ONCE = (
    "import sys; print('starting'); print('the Python package cryptography is missing', file=sys.stderr); sys.exit(2)"
)


async def start_dying_agent(log_path: Path) -> asyncio.subprocess.Process:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-c", DIES_AT_ONCE, stdout=log, stderr=asyncio.subprocess.STDOUT
        )


async def test_an_agent_that_exits_at_start_is_reported_with_its_code_and_log(tmp_path):
    log_path = tmp_path / "agent.log"
    agent = await start_dying_agent(log_path)
    await agent.wait()
    with pytest.raises(AgentExitedError) as caught:
        check_agent(agent, "bench-x", log_path)
    message = str(caught.value)
    assert message.startswith(f"the agent under test (bench-x) exited with code 2; last lines of {log_path}:")
    assert message.endswith("    starting\n    the Python package cryptography is missing")


async def test_bench_run_stops_waiting_for_the_node_when_its_agent_died(tmp_path):
    bench = Bench(cluster=None, s=None, work=tmp_path, concurrency=1)  # type: ignore[arg-type]

    async def no_node(path: str) -> tuple[int, None]:
        return 404, None

    bench.get = no_node  # type: ignore[method-assign]
    agent = await start_dying_agent(tmp_path / "bench-x" / "agent.log")
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(AgentExitedError, match="exited with code 2"):
        await bench.wait_ready("bench-x", "ns", agent)
    assert loop.time() - started < 10  # not the 90 s readiness timeout


def test_run_main_prints_the_report_and_fails(capsys):
    async def main() -> int:
        raise AgentExitedError("the agent under test (n) exited with code 2; last lines of x:\n    boom")

    assert run_main(main) == 1
    assert (
        capsys.readouterr().err
        == "benchmark stopped: the agent under test (n) exited with code 2; last lines of x:\n    boom\n"
    )

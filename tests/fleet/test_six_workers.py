"""Issue 15, "done means": 6 worker processes share one Deepgram account of 20 streams.

Each worker (tests/fleet/worker.py) is sized for 10 calls with spares (SINGLE_USE, 3 spares,
13 at most): 6 x 3 spares alone nearly use the account up. The call load moves between the
workers with a fleet demand of at most 20 streams. With the quota on Redis: no handshake gets a
429 and every call is served, through a Redis stop and restart; a worker killed with -9 frees
its share within TTL + one refresh. With the quota off (same load), the 429s are counted and
printed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from tests.fleet.conftest import needs_redis
from tests.peers.redis import RedisServer
from voicepool.quota import FleetQuota
from voicepool.testing.asr import DeepgramEmulator

pytestmark = needs_redis

ROOT = Path(__file__).resolve().parents[2]
KEY = "dg-project-key"
LIMIT = 20
TTL, REFRESH = 2.0, 0.5


class Worker:
    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc = proc
        self.name = name
        self.holder: str | None = None

    async def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        async with asyncio.timeout(30):
            line = await self.proc.stdout.readline()
        assert line, f"worker {self.name} exited ({self.proc.returncode})"
        result: dict[str, Any] = json.loads(line)
        return result

    async def ask(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        await self.proc.stdin.drain()
        return await self.read()

    async def stop(self) -> None:
        if self.proc.returncode is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                async with asyncio.timeout(10):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()  # by its PID (the Process we started)
                await self.proc.wait()


async def _spawn(n: int, url: str, redis: str | None) -> list[Worker]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    workers = []
    for i in range(n):
        config = {
            "name": f"asr{i}",
            "url": url,
            "api_key": KEY,
            "redis": redis,
            "limit": LIMIT,
            "ttl": TTL,
            "refresh": REFRESH,
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.fleet.worker",
            json.dumps(config),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=ROOT,
            env=env,
        )
        workers.append(Worker(proc, f"asr{i}"))
    for w in workers:
        hello = await w.read()
        assert hello["ready"], hello
        w.holder = hello["holder"]
    return workers


async def _phase(workers: list[Worker], load: dict[int, int], seconds: float) -> list[Any]:
    """Run ``load`` (worker index -> concurrent calls) for ``seconds``; results in that order."""
    return list(
        await asyncio.gather(
            *(
                workers[i].ask(cmd="load", calls=n, seconds=seconds, hold=0.25)
                for i, n in load.items()
            )
        )
    )


# The call load moves between workers; the fleet's demand stays <= 20 streams.
PHASES = [
    {0: 8, 1: 8},
    {2: 6, 3: 6, 4: 6},
    {5: 10, 0: 6},
]


class Tally:
    """Calls served and failed over the phases a test runs."""

    def __init__(self) -> None:
        self.served = self.failed = 0

    def add(self, results: list[Any], *, strict: bool = True) -> None:
        """Count the workers' ``results``; ``strict``: every call must have been served."""
        for r in results:
            self.served += r["served"]
            self.failed += r["failed"]
            assert not strict or r["failed"] == 0, r


async def _run_fleet(redis: str | None, server: DeepgramEmulator) -> tuple[int, int, int]:
    """(calls served, calls failed, handshakes rejected with 429) over PHASES."""
    workers = await _spawn(6, server.url, redis)
    tally = Tally()
    try:
        for load in PHASES:
            tally.add(await _phase(workers, load, 2.0), strict=False)
    finally:
        for w in workers:
            await w.stop()
    return tally.served, tally.failed, server.rejected[429]


async def test_six_workers_share_twenty_streams_without_a_429() -> None:
    async with (
        RedisServer() as redis,
        DeepgramEmulator(api_key=KEY, max_concurrency=LIMIT, idle_timeout=None) as server,
    ):
        workers = await _spawn(6, server.url, redis.url)
        probe = FleetQuota(redis.url, worker="probe")
        tally = Tally()
        try:
            for load in PHASES:
                tally.add(await _phase(workers, load, 2.0))
            assert server.rejected[429] == 0, server.rejected

            # Redis stopped and restarted (without its data) while calls go on.
            calls = asyncio.ensure_future(_phase(workers, {2: 6, 3: 6}, 3.0))
            await asyncio.sleep(0.5)  # the outage starts mid-phase (it paces the fault)
            await redis.stop()
            await asyncio.sleep(1.0)  # a one-second outage
            await redis.start()
            tally.add(await calls)
            assert server.rejected[429] == 0, server.rejected

            # kill -9 of a worker holding tokens: its share is back within TTL + one refresh.
            await _phase(workers, {5: 10}, 1.0)
            dead = workers[5]
            loop = asyncio.get_running_loop()
            before = await probe.held("deepgram-project")
            assert before.get(dead.holder or "", 0) > 0, before
            os.kill(dead.proc.pid, signal.SIGKILL)
            t_kill = loop.time()
            await dead.proc.wait()
            gone = None
            while loop.time() - t_kill < TTL + REFRESH + 2.0:
                held = await probe.held("deepgram-project")
                if dead.holder not in held:
                    gone = loop.time() - t_kill
                    break
                await asyncio.sleep(0.05)  # polls Redis's view, bounded by the loop above
            assert gone is not None, held
            assert gone <= TTL + REFRESH, gone
            # ... and another worker can use it: 14 calls on worker 1 are all served.
            tally.add(await _phase(workers, {1: 14}, 2.0))
            assert server.rejected[429] == 0, server.rejected
            print(
                f"\nfleet quota on: {tally.served} calls served, {tally.failed} failed,"
                f" {server.rejected[429]} handshakes rejected with 429;"
                f" killed worker's share back in {gone:.2f}s (TTL {TTL}s + refresh {REFRESH}s)"
            )
        finally:
            await probe.aclose()
            for w in workers:
                await w.stop()


async def test_without_the_quota_the_account_limit_answers_429() -> None:
    async with DeepgramEmulator(api_key=KEY, max_concurrency=LIMIT, idle_timeout=None) as server:
        served, failed, rejected = await _run_fleet(None, server)
    print(
        f"\nfleet quota off: {served} calls served, {failed} failed,"
        f" {rejected} handshakes rejected with 429"
    )
    assert rejected > 0

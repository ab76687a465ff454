"""How the engine's cost grows with the work: connections per pool, and concurrent waiters.

One pool of 10, 100, 1,000 and 10,000 connections of a scripted adapter (no sockets):
  acquire+release   ns per uncontended ``async with pool.acquire()`` (an idle hit)
  health CPU        CPU seconds per wall second spent on health (the timer's passes and every
                    due ping) on a fake clock run over 10 ping intervals: ping_interval 30 s
  bytes/conn        the pool's bookkeeping per connection (tracemalloc; the fake connections
                    themselves subtracted)
Then 10 / 100 / 1,000 tasks contending for 10 connections:
  hand-off ns       per acquire, every one a hand-off from a releasing task to a waiter
  bytes/waiter      memory per queued waiter, the caller's own task included (its future,
                    Waiter, queue and deadline-heap entries, the task and its coroutine)

Run: ``.venv/bin/python benchmarks/scale.py [--rounds 5]``
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
import tracemalloc
from typing import Any

from acquire import FloorPool  # benchmarks/acquire.py: the minimal correct pool

from voicepool import Adapter, Pool, PoolSettings, telemetry


class Conn:
    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = n


class ScriptedAdapter(Adapter[Conn]):
    """Connects, pings and closes at once: what is measured is the pool alone."""

    def __init__(self) -> None:
        self.count = 0
        self.pings = 0

    async def connect(self) -> Conn:
        self.count += 1
        return Conn(self.count)

    async def ping(self, conn: Conn) -> None:
        self.pings += 1


def settings(size: int, **kw: Any) -> PoolSettings:
    return PoolSettings(
        min_size=size,
        max_size=size,
        connect_concurrency=min(size, 1000),
        idle_timeout=None,
        max_lifetime=None,
        ping_interval=30.0,
        ping_timeout=5.0,
        acquire_timeout=60.0,
        **kw,
    )


async def acquire_ns(size: int, n: int, rounds: int) -> float:
    pool = Pool(ScriptedAdapter(), settings(size), name=f"s{size}")
    await pool.start()
    samples = []
    for _ in range(rounds):
        gc.collect()
        t0 = time.perf_counter_ns()
        for _ in range(n):
            async with pool.acquire():
                pass
        samples.append((time.perf_counter_ns() - t0) / n)
    await pool.aclose()
    return statistics.median(samples)


async def settle() -> None:
    for _ in range(50):
        await asyncio.sleep(0)


async def health_cpu(size: int) -> tuple[float, int]:
    """CPU seconds per wall second of health on a fake clock over 10 ping intervals."""
    now = [0.0]
    adapter = ScriptedAdapter()
    pool = Pool(adapter, settings(size), name=f"h{size}", clock=lambda: now[0])
    await pool.start()
    await settle()
    span = 10 * 30.0
    step = 30.0 / 4  # the health pass's own period (a quarter ping interval)
    cpu0 = time.process_time()
    while now[0] < span:
        now[0] += step
        pool.maintain()
        await settle()  # the pings it started run and report
    cpu = time.process_time() - cpu0
    pings = adapter.pings
    await pool.aclose()
    return cpu / span, pings


async def bytes_per_conn(size: int) -> float:
    gc.collect()
    tracemalloc.start()
    snap0 = tracemalloc.take_snapshot()
    pool = Pool(ScriptedAdapter(), settings(size), name=f"m{size}")
    await pool.start()
    await settle()
    gc.collect()
    snap1 = tracemalloc.take_snapshot()
    tracemalloc.stop()
    total = sum(d.size_diff for d in snap1.compare_to(snap0, "filename"))
    conns = size * sys.getsizeof(Conn(0))
    await pool.aclose()
    return (total - conns) / size


async def hand_off(waiters: int, per_task: int, rounds: int) -> tuple[float, float]:
    """ns per acquire, and the ratio to the floor pool doing the same, paired per round."""
    pool = Pool(ScriptedAdapter(), settings(10), name=f"w{waiters}")
    await pool.start()
    floor = FloorPool(10)

    async def worker(acquire: Any) -> None:
        for _ in range(per_task):
            async with acquire():
                await asyncio.sleep(0)

    samples, ratios = [], []
    for _ in range(rounds):
        times = []
        for acquire in (pool.acquire, floor.acquire):
            gc.collect()
            t0 = time.perf_counter_ns()
            await asyncio.gather(*(worker(acquire) for _ in range(waiters)))
            times.append((time.perf_counter_ns() - t0) / (waiters * per_task))
        samples.append(times[0])
        ratios.append(times[0] / times[1])
    await pool.aclose()
    return statistics.median(samples), statistics.median(ratios)


async def bytes_per_waiter(waiters: int) -> float:
    pool = Pool(ScriptedAdapter(), settings(1), name=f"bw{waiters}")
    await pool.start()
    held = await pool.lease()
    gc.collect()
    tracemalloc.start()
    snap0 = tracemalloc.take_snapshot()
    tasks = [asyncio.create_task(pool.lease()) for _ in range(waiters)]
    await settle()
    assert pool.stats().waiters == waiters
    snap1 = tracemalloc.take_snapshot()
    tracemalloc.stop()
    total = sum(d.size_diff for d in snap1.compare_to(snap0, "filename"))
    await held.release()
    for t in tasks:  # served in FIFO order, one at a time
        await (await t).release()
    await pool.aclose()
    return total / waiters


async def main(args: argparse.Namespace) -> None:
    telemetry.disable_default()
    print(f"python {sys.version.split()[0]}; telemetry disabled; ping_interval 30 s")
    print(
        f"\n{'connections':>12} {'acquire+release ns':>19} {'health CPU/s':>13} {'pings':>7}"
        f" {'bytes/conn':>11}"
    )
    for size in (10, 100, 1_000, 10_000):
        ns = await acquire_ns(size, 20_000, args.rounds)
        cpu, pings = await health_cpu(size)
        mem = await bytes_per_conn(size)
        print(f"{size:>12,} {ns:>19.0f} {cpu * 100:>12.4f}% {pings:>7} {mem:>11.0f}")
    print(
        f"\n{'waiters':>12} {'hand-off ns':>12} {'vs floor':>9} {'bytes/waiter':>13}"
        "   (10 connections)"
    )
    for waiters in (10, 100, 1_000):
        ns, ratio = await hand_off(waiters, max(5, 20_000 // waiters), args.rounds)
        mem = await bytes_per_waiter(waiters)
        print(f"{waiters:>12,} {ns:>12.0f} {ratio:>8.2f}x {mem:>13.0f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    asyncio.run(main(parser.parse_args()))

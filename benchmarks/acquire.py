"""Cost of acquire + release: voicepool's Pool against the floor and livekit-agents' pool.

All rows are measured in one run, interleaved round by round, and compared as ratios (these
machines are noisy; absolute numbers drift, ratios measured together do not).

Rows, uncontended (one task, a warm pool, ``async with pool.acquire(): pass``):
  floor            a minimal deque pool with a class-based async context manager and waiter
                   futures: the least any correct asyncio pool can cost
  voicepool        Pool with telemetry off
  voicepool+api    Pool with the default telemetry on, OpenTelemetry API only (no SDK)
  voicepool+sdk    Pool with the SDK MeterProvider and TracerProvider installed
  livekit          livekit-agents 1.8.9 ``utils.ConnectionPool`` (``pip install -e '.[bench]'``)

Contended: 100 tasks on 10 connections, each holding across one loop iteration; the cost per
acquire above a no-pool baseline (the same tasks doing the same iteration without a pool).

Also: memory per pooled connection (the pool's own bookkeeping, measured with tracemalloc).

Run: ``.venv/bin/python benchmarks/acquire.py [--rounds 15] [--n 20000] [--uvloop]``
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
import tracemalloc
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from voicepool import Adapter, Pool, PoolSettings, telemetry

Op = Callable[[], Awaitable[None]]


class Conn:
    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = n


class NullAdapter(Adapter[Conn]):
    """Connections that cost nothing: what is measured is the pool alone."""

    def __init__(self) -> None:
        self.count = 0

    async def connect(self) -> Conn:
        self.count += 1
        return Conn(self.count)


# -- the floor --------------------------------------------------------------------------------


class FloorLease:
    __slots__ = ("conn", "pool")

    def __init__(self, pool: FloorPool) -> None:
        self.pool = pool

    async def __aenter__(self) -> FloorLease:
        pool = self.pool
        if pool.idle:
            self.conn = pool.idle.pop()
            return self
        fut: asyncio.Future[Conn] = asyncio.get_running_loop().create_future()
        pool.waiters.append(fut)
        self.conn = await fut
        return self

    async def __aexit__(self, *exc: object) -> None:
        waiters = self.pool.waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(self.conn)
                return
        self.pool.idle.append(self.conn)


class FloorPool:
    def __init__(self, size: int) -> None:
        self.idle: deque[Conn] = deque(Conn(i) for i in range(size))
        self.waiters: deque[asyncio.Future[Conn]] = deque()

    def acquire(self) -> FloorLease:
        return FloorLease(self)


# -- measurement ----------------------------------------------------------------------------


def uncontended(acquire: Callable[[], Any], n: int) -> Op:
    async def run() -> None:
        for _ in range(n):
            async with acquire():
                pass

    return run


def contended(acquire: Callable[[], Any] | None, tasks: int, per_task: int) -> Op:
    async def worker() -> None:
        for _ in range(per_task):
            if acquire is None:
                await asyncio.sleep(0)
            else:
                async with acquire():
                    await asyncio.sleep(0)

    async def run() -> None:
        await asyncio.gather(*(worker() for _ in range(tasks)))

    return run


async def timed(op: Op) -> float:
    gc.collect()
    t0 = time.perf_counter_ns()
    await op()
    return float(time.perf_counter_ns() - t0)


async def make_pools(size: int) -> tuple[dict[str, Callable[[], Any]], list[Any], Any]:
    """Build every variant; returns acquire callables, things to close, and the SDK handle."""
    settings = PoolSettings(min_size=size, max_size=size)
    closers: list[Any] = []
    variants: dict[str, Callable[[], Any]] = {}
    floor = FloorPool(size)
    variants["floor"] = floor.acquire

    telemetry.disable_default()
    plain = Pool(NullAdapter(), settings, name="plain")
    await plain.start()
    closers.append(plain)
    variants["voicepool"] = plain.acquire

    telemetry.enable_default()
    api = Pool(NullAdapter(), settings, name="api")
    await api.start()
    closers.append(api)
    variants["voicepool+api"] = api.acquire

    sdk = None
    try:
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        from voicepool.telemetry.sdk import install_sdk
    except ImportError:
        print("(no opentelemetry-sdk: the voicepool+sdk row is skipped; pip install -e '.[otel]')")
    else:
        sdk = install_sdk(metric_readers=[InMemoryMetricReader()])
        with_sdk = Pool(NullAdapter(), settings, name="sdk")
        await with_sdk.start()
        closers.append(with_sdk)
        variants["voicepool+sdk"] = with_sdk.acquire

    try:
        from livekit.agents.utils import ConnectionPool
    except ImportError:
        print("(livekit-agents not installed: its row is skipped; pip install -e '.[bench]')")
    else:
        counter = iter(range(10**9))

        async def lk_connect(timeout: float) -> Conn:
            return Conn(next(counter))

        lk: Any = ConnectionPool(connect_cb=lk_connect)
        for _ in range(size):
            lk.put(await lk.get(timeout=1))  # warm, like the others
        variants["livekit"] = lambda: lk.connection(timeout=1)
        closers.append(lk)
    return variants, closers, sdk


def memory_per_connection(count: int = 1000) -> float:
    """Bytes of pool bookkeeping per pooled connection (records, indexes, deque slots)."""

    async def build() -> float:
        telemetry.disable_default()
        settings = PoolSettings(min_size=count, max_size=count, connect_concurrency=count)
        adapter = NullAdapter()
        conns_before: list[Any] = []
        tracemalloc.start()
        snap0 = tracemalloc.take_snapshot()
        pool = Pool(adapter, settings, name="mem")
        await pool.start()
        snap1 = tracemalloc.take_snapshot()
        tracemalloc.stop()
        diff = snap1.compare_to(snap0, "filename")
        total = sum(d.size_diff for d in diff)
        conns = count * sys.getsizeof(Conn(0))  # the fake connections themselves
        await pool.aclose()
        del conns_before
        return (total - conns) / count

    return asyncio.run(build())


async def main(args: argparse.Namespace) -> None:
    variants, closers, sdk = await make_pools(10)
    names = list(variants)
    samples: dict[str, list[float]] = {k: [] for k in names}
    for _ in range(3):  # warm-up
        for name in names:
            await timed(uncontended(variants[name], 2000))
    for _ in range(args.rounds):
        for name in names:
            samples[name].append(await timed(uncontended(variants[name], args.n)) / args.n)

    med = {k: statistics.median(v) for k, v in samples.items()}
    floor, vp = med["floor"], med["voicepool"]
    print(f"\nuncontended acquire+release, median of {args.rounds} rounds x {args.n} (ns/op)")
    print(f"{'':16}{'ns/op':>8}  {'vs floor':>9}  {'vs voicepool':>13}")
    for name in names:
        print(f"{name:16}{med[name]:8.0f}  {med[name] / floor:8.2f}x  {med[name] / vp:12.2f}x")
    if "livekit" in med:
        print(f"voicepool is {med['livekit'] / vp:.2f}x faster than livekit (target >= 2x)")
    print(f"voicepool / floor = {vp / floor:.2f}x (target <= 2x)")
    if "voicepool+sdk" in med:
        print(
            f"with the SDK installed / without telemetry = {med['voicepool+sdk'] / vp:.2f}x"
            " (target <= 1.5x)"
        )

    # Contended: 100 tasks, 10 connections.
    tasks, per_task = 100, max(20, args.n // 500)
    ops = tasks * per_task
    base: list[float] = []
    cont: dict[str, list[float]] = {k: [] for k in names}
    for _ in range(max(5, args.rounds // 2)):
        base.append(await timed(contended(None, tasks, per_task)) / ops)
        for name in names:
            cont[name].append(await timed(contended(variants[name], tasks, per_task)) / ops)
    b = statistics.median(base)
    print(
        f"\ncontended: {tasks} tasks on 10 connections, ns per acquire above a no-pool baseline"
        f" ({b:.0f} ns)"
    )
    for name in names:
        extra = statistics.median(cont[name]) - b
        note = "  (unbounded: opens a connection per task)" if name == "livekit" else ""
        print(f"{name:16}{extra:8.0f}{note}")

    for c in closers:
        await c.aclose()
    if sdk is not None:
        sdk.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    args = parser.parse_args()
    if args.uvloop:
        import uvloop

        uvloop.install()
    print(f"python {sys.version.split()[0]}, loop: {'uvloop' if args.uvloop else 'asyncio'}")
    asyncio.run(main(args))
    print(f"\npool bookkeeping per pooled connection: {memory_per_connection():.0f} bytes")

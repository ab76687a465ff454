"""Cost of acquire + release: voicepool's Pool against the floor and livekit-agents' pool.

Every row is measured in one run, interleaved in slices of 1,000 acquires (each round cut into
slices, every row timed once per slice, rotated), and reported as a ratio PAIRED PER SLICE (row
time / floor time in the same slice), then the median: these machines are noisy, and a ratio of
two numbers measured milliseconds apart is stable where a difference of two medians is not.

Uncontended (one task, a warm pool, ``async with pool.acquire(): pass``):
  floor             a minimal deque pool with a class-based async context manager and waiter
                    futures: the least any correct asyncio pool can cost
  floor+reset       the floor awaiting a trivial ``async def reset`` in its exit (printed): the
                    least a pool that calls the override pays, with no way to bound a reset
                    that hangs
  floor+drive       the floor driving that reset once from a synchronous exit, a reset that
                    suspends finishing under a timeout (printed): the least a pool that bounds
                    its resets pays (what exclusive+reset does)
  exclusive         Pool, EXCLUSIVE, base reset, telemetry disabled       (target <= 1.5x)
  exclusive+reset   the same with a trivial ``async def reset(...): pass`` (target <= 1.5x)
  single_use        SINGLE_USE: every release closes, spares refill       (printed)
  multiplexed       MULTIPLEXED, 10 streams a connection                  (target <= 2x)
  exclusive+api     default telemetry, OpenTelemetry API only, as imported (<= 1.2x exclusive)
  exclusive+sdk     SDK MeterProvider and TracerProvider (this pool's own) (printed)
  livekit           livekit-agents 1.8.9 ``utils.ConnectionPool``        (>= 3x slower)

Contended: 100 tasks on 10 connections, each holding across one loop iteration: every acquire
is a hand-off from a releasing task to a waiting one. Ratio to the floor doing the same, paired
per round (target <= 1.5x).

Run: ``.venv/bin/python benchmarks/acquire.py [--rounds 15] [--n 20000] [--uvloop]``
(livekit's row needs ``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
import tracemalloc
import types
from collections import deque
from collections.abc import Awaitable, Callable, Generator
from typing import Any

from voicepool import Adapter, LeaseMode, Pool, PoolSettings, telemetry
from voicepool._engine.calls import finish_reset

Op = Callable[[], Awaitable[None]]


class Conn:
    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = n


class NullAdapter(Adapter[Conn]):
    """Connections that cost nothing: what is measured is the pool alone."""

    def __init__(self, mode: LeaseMode = LeaseMode.EXCLUSIVE) -> None:
        self.count = 0
        self.lease_mode = mode
        self.max_streams = 10 if mode is LeaseMode.MULTIPLEXED else 1

    async def connect(self) -> Conn:
        self.count += 1
        return Conn(self.count)


class TrivialResetAdapter(NullAdapter):
    """An override of reset that awaits nothing: must cost no task and no timer."""

    async def reset(self, conn: Conn) -> None:
        pass


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
        try:
            self.conn = await fut
        except BaseException:
            # Cancelled after the hand-off: pass the connection on, or it is lost (what any
            # correct pool must do; free in 3.11 unless it happens). No timeouts: none needed here.
            if fut.done() and not fut.cancelled():
                pool.give_back(fut.result())
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        waiters = self.pool.waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(self.conn)
                return
        self.pool.idle.append(self.conn)


class FloorResetLease(FloorLease):
    """The floor that also awaits a trivial ``async def reset`` before giving the connection
    back: what any pool that calls such an override pays, at the least."""

    __slots__ = ()

    async def __aexit__(self, *exc: object) -> None:
        pool = self.pool
        await pool.reset(self.conn)
        waiters = pool.waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(self.conn)
                return
        pool.idle.append(self.conn)


@types.coroutine
def _finished() -> Generator[Any, None, None]:
    return
    yield


class FloorDriveLease(FloorLease):
    """The floor that bounds its reset: the exit drives the coroutine once and only a reset that
    really suspends gets a task-side timeout (``finish``); the exit itself is synchronous and
    returns a finished future, as voicepool's does."""

    __slots__ = ()

    def __aexit__(self, *exc: object) -> Awaitable[None]:  # type: ignore[override]
        pool = self.pool
        conn = self.conn
        coro = pool.reset(conn)
        for first in coro.__await__():
            return pool.finish(coro, first, conn)
        pool.give_back(conn)
        return pool.done


class FloorPool:
    def __init__(self, size: int) -> None:
        self.idle: deque[Conn] = deque(Conn(i) for i in range(size))
        self.waiters: deque[asyncio.Future[Conn]] = deque()
        self.done = _finished()  # (as voicepool's: see lease._DONE)
        for _ in self.done:
            pass

    def acquire(self) -> FloorLease:
        return FloorLease(self)

    def acquire_reset(self) -> FloorLease:
        return FloorResetLease(self)

    def acquire_drive(self) -> FloorLease:
        return FloorDriveLease(self)

    async def finish(self, coro: Any, first: Any, conn: Conn) -> None:
        """A reset that suspended: the rest, under a timeout (never reached in the benchmark)."""
        await finish_reset(coro, first, 5.0)  # (voicepool's own: the same awaitable and timeout)
        self.give_back(conn)

    async def reset(self, conn: Conn) -> None:
        pass

    def give_back(self, conn: Conn) -> None:
        """__aexit__'s hand-off, for the cancelled waiter (kept inline there: the hot path)."""
        waiters = self.waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(conn)
                return
        self.idle.append(conn)


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


CHUNK = 1000  # acquires per timed slice (see main)


async def timed_nogc(op: Op) -> float:
    t0 = time.perf_counter_ns()
    await op()
    return float(time.perf_counter_ns() - t0)


async def timed(op: Op) -> float:
    gc.collect()
    t0 = time.perf_counter_ns()
    await op()
    return float(time.perf_counter_ns() - t0)


async def make_pools(size: int) -> tuple[dict[str, Callable[[], Any]], list[Any], Any]:
    """Build every variant; returns acquire callables, things to close, and the SDK handle."""
    settings = PoolSettings(min_size=size, max_size=size, idle_timeout=None)
    closers: list[Any] = []
    variants: dict[str, Callable[[], Any]] = {}
    floor = FloorPool(size)
    variants["floor"] = floor.acquire
    variants["floor+reset"] = floor.acquire_reset
    variants["floor+drive"] = floor.acquire_drive

    async def pool(name: str, adapter: NullAdapter, s: PoolSettings = settings) -> None:
        p = Pool(adapter, s, name=name)
        await p.start()
        closers.append(p)
        variants[name] = p.acquire

    telemetry.disable_default()
    await pool("exclusive", NullAdapter())
    await pool("exclusive+reset", TrivialResetAdapter())
    await pool(
        "single_use",
        NullAdapter(LeaseMode.SINGLE_USE),
        PoolSettings(min_size=size, max_size=2 * size, idle_timeout=None),
    )
    await pool(
        "multiplexed",
        NullAdapter(LeaseMode.MULTIPLEXED),
        PoolSettings(min_size=1, max_size=size, idle_timeout=None),
    )
    telemetry.enable_default()
    await pool("exclusive+api", NullAdapter())

    sdk = None
    try:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
    except ImportError:
        print("(no opentelemetry-sdk: the exclusive+sdk row is skipped; pip install -e '.[otel]')")
    else:
        # SDK providers for this row's pool only: installed globally they would make the
        # API-only row's proxies live too (from its next flush) and it would measure the SDK.
        telemetry.disable_default()
        sdk = MeterProvider(metric_readers=[InMemoryMetricReader()])
        instrumentation = telemetry.instrument(meter_provider=sdk, tracer_provider=TracerProvider())
        await pool("exclusive+sdk", NullAdapter())
        closers.append(instrumentation)
        telemetry.enable_default()

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


def paired(samples: dict[str, list[float]], base: str) -> dict[str, float]:
    """Median over rounds of (row / base) within each round."""
    return {
        k: statistics.median(x / y for x, y in zip(v, samples[base], strict=True))
        for k, v in samples.items()
    }


async def main(args: argparse.Namespace) -> None:
    variants, closers, sdk = await make_pools(10)
    names = list(variants)
    samples: dict[str, list[float]] = {k: [] for k in names}
    for _ in range(3):  # warm-up
        for name in names:
            await timed(uncontended(variants[name], 2000))
    # Each round is cut into slices of CHUNK acquires, every row timed once per slice (rotated):
    # a ratio pairs two timings a few milliseconds apart, so a burst of load from another process
    # lands on both (one timing of n acquires per row and round let it land on one row only, and
    # the figures moved by 0.5x from run to run on a shared machine).
    chunk = min(args.n, CHUNK)
    slices = max(1, args.n // chunk)
    for r in range(args.rounds):
        gc.collect()
        for c in range(slices):
            k = (r * slices + c) % len(names)
            for name in names[k:] + names[:k]:  # rotate: no fixed position
                samples[name].append(await timed_nogc(uncontended(variants[name], chunk)) / chunk)

    vs_floor = paired(samples, "floor")
    vs_excl = paired(samples, "exclusive")
    med = {k: statistics.median(v) for k, v in samples.items()}
    print(
        f"\nuncontended acquire+release, {args.rounds} rounds x {args.n} (slices of {chunk});"
        " ratios paired per slice, median"
    )
    print(f"{'':17}{'ns/op':>8}  {'vs floor':>9}  {'vs exclusive':>13}")
    for name in names:
        print(f"{name:17}{med[name]:8.0f}  {vs_floor[name]:8.2f}x  {vs_excl[name]:12.2f}x")
    print(f"exclusive / floor        = {vs_floor['exclusive']:.2f}x (target <= 1.5x)")
    print(f"exclusive+reset / floor  = {vs_floor['exclusive+reset']:.2f}x (target <= 1.5x)")
    fr = paired(samples, "floor+reset")
    fd = paired(samples, "floor+drive")
    print(
        f"  (the floor's own trivial reset costs {vs_floor['floor+reset']:.2f}x the floor awaited,"
        f" {vs_floor['floor+drive']:.2f}x driven and bounded; exclusive+reset /"
        f" floor+reset = {fr['exclusive+reset']:.2f}x,"
        f" / floor+drive = {fd['exclusive+reset']:.2f}x)"
    )
    print(f"multiplexed / floor      = {vs_floor['multiplexed']:.2f}x (target <= 2x)")
    print(f"exclusive+api / exclusive = {vs_excl['exclusive+api']:.2f}x (target <= 1.2x)")
    if "livekit" in med:
        lk = paired(samples, "livekit")
        print(f"livekit / exclusive      = {1 / lk['exclusive']:.2f}x (target >= 3x)")

    # Contended: 100 tasks, 10 connections; each round pairs a pool with the floor.
    tasks, per_task = 100, max(20, args.n // 100)  # 10,000 hand-offs a round at --n 10000
    ops = tasks * per_task
    rows = ["floor", "exclusive", "exclusive+reset", "exclusive+api"]
    cont: dict[str, list[float]] = {k: [] for k in rows}
    for r in range(max(7, args.rounds)):
        for name in rows[r % len(rows) :] + rows[: r % len(rows)]:
            cont[name].append(await timed(contended(variants[name], tasks, per_task)) / ops)
    c_floor = paired(cont, "floor")
    print(f"\ncontended: {tasks} tasks on 10 connections (hand-offs), ratios paired per round")
    for name in rows:
        print(f"{name:17}{statistics.median(cont[name]):8.0f}  {c_floor[name]:8.2f}x")
    print(f"contended exclusive / floor = {c_floor['exclusive']:.2f}x (target <= 1.5x)")

    for c in closers:
        if isinstance(c, telemetry.Instrumentation):
            c.remove()
        else:
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

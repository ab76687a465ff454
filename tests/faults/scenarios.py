"""The engine's fault scenarios of issue 11, over real sockets on 127.0.0.1.

One coroutine per scenario, parameterised by scale: ``benchmarks/faults.py`` runs them at the
issue's sizes and prints the figures; ``tests/faults/`` runs them scaled down and asserts the
goals. Providers are real servers (the emulators of :mod:`voicepool.testing`), faults come from
:class:`~voicepool.testing.FaultProxy` (refusal, black hole, resets) and the emulators' fault
controls (``hang_up_on_accept``, ``max_concurrent_streams=0``). Every wait is bounded; the
fixed-length sleeps here are the fault's duration or a measuring window, never synchronisation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from voicepool import Pool, PoolError, PoolSettings, PoolState
from voicepool.adapters.http2 import Http2Adapter
from voicepool.adapters.websocket import WebSocketAdapter
from voicepool.testing import (
    DeepgramEmulator,
    FaultProxy,
    LlmEmulator,
    test_certificates,
    wait_until,
)


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def ws_adapter(url: str, **options: Any) -> WebSocketAdapter:
    """The generic WebSocket adapter on a Deepgram emulator's path (no auth, quick closes)."""
    return WebSocketAdapter(url=url + "/v1/listen", close_timeout=0.5, **options)


def _llm_adapter(url: str) -> Http2Adapter:
    return Http2Adapter(base_url=url, ca_file=str(test_certificates().ca_path))


@contextlib.asynccontextmanager
async def provider(*, hang_up: bool = False) -> AsyncIterator[DeepgramEmulator]:
    """A WebSocket provider with no idle close; ``hang_up``: it closes every socket with 1013
    right after the upgrade (an overloaded provider)."""
    async with DeepgramEmulator(api_key=None, idle_timeout=None) as server:
        if hang_up:
            server.hang_up_on_accept(1013)
        yield server


@contextlib.asynccontextmanager
async def started(pool: Pool[Any]) -> AsyncIterator[Pool[Any]]:
    """``pool`` started without requiring a connection (faulty providers), closed at the end."""
    try:
        await pool.start(require_ready=False)
        yield pool
    finally:
        await pool.aclose(0)


async def _acquire_times(pool: Pool[Any], stop: asyncio.Event, pause: float) -> list[float]:
    """Callers arriving every ``pause`` s until ``stop``: seconds from each arrival (a timer) to
    holding a connection. That includes the event loop's lag, which is what a busy neighbour
    costs a call: an idle hit itself never awaits."""
    loop = asyncio.get_running_loop()
    samples: list[float] = []
    arrival = loop.time()
    while not stop.is_set():
        arrival += pause
        await asyncio.sleep(arrival - loop.time())
        async with pool.acquire():
            samples.append(loop.time() - arrival)
        arrival = max(arrival, loop.time())  # a late caller does not make the next one late
    return samples


@dataclass(frozen=True, slots=True)
class StormResult:
    handshakes: int  # upgrades the hanging-up server accepted during the window
    baseline_p99: float  # the neighbour pool's acquire p99 before the storm, seconds
    storm_p99: float  # the same during the storm


async def reconnect_storm(
    size: int = 63, window: float = 5.0, baseline: float = 2.0, pause: float = 0.002
) -> StormResult:
    """A ``size``-connection pool on a server that hangs up after each upgrade, for ``window``
    seconds, next to a healthy pool whose acquire latency is measured before and during."""
    settings = PoolSettings(min_size=size, max_size=size, connect_timeout=2.0)
    async with LlmEmulator() as healthy, provider(hang_up=True) as bad:
        # The neighbour lends HTTP/2 stream slots: an idle hit with no I/O, whatever lease mode
        # the WebSocket adapters default to.
        neighbour = Pool(_llm_adapter(healthy.url), PoolSettings(min_size=2), name="neighbour")
        async with started(neighbour):
            stop = asyncio.Event()
            sampler = asyncio.create_task(_acquire_times(neighbour, stop, pause))
            await asyncio.sleep(baseline)
            stop.set()
            base = await sampler
            stop.clear()
            sampler = asyncio.create_task(_acquire_times(neighbour, stop, pause))
            storm_pool = Pool(ws_adapter(bad.url), settings, name="storm")
            before = bad.accepted
            async with started(storm_pool):
                await asyncio.sleep(window)
                handshakes = bad.accepted - before
            stop.set()
            during = await sampler
    return StormResult(handshakes, p99(base), p99(during))


async def zero_stream_handshakes(size: int = 4, window: float = 5.0) -> int:
    """Handshakes drawn in ``window`` s by a ``size``-connection HTTP/2 pool from a server that
    advertises SETTINGS_MAX_CONCURRENT_STREAMS 0."""
    settings = PoolSettings(min_size=size, max_size=size, connect_timeout=2.0)
    async with LlmEmulator(max_concurrent_streams=0) as llm:
        adapter = _llm_adapter(llm.url)
        before = llm.connections_accepted
        t0 = time.monotonic()
        async with started(Pool(adapter, settings, name="zero-streams")):
            await asyncio.sleep(max(0.0, window - (time.monotonic() - t0)))
            return llm.connections_accepted - before


@dataclass(frozen=True, slots=True)
class OutageResult:
    refill: float | None  # seconds from the provider's return to a full pool (None: not in time)
    attempts_per_s: float  # connection attempts a second during the outage, after its first second


async def outage(size: int = 16, length: float = 1.0, limit: float = 40.0) -> OutageResult:
    """Every connection of a full ``size`` pool is reset and new ones refused for ``length`` s;
    then how long until the pool is full again (at most ``limit`` s), and how hard it dialed
    during the outage after its first second (when ``length`` > 1)."""
    async with provider() as server, FaultProxy("127.0.0.1", server.port) as proxy:
        pool = Pool(
            ws_adapter(f"ws://127.0.0.1:{proxy.port}"), PoolSettings(min_size=size), name="o"
        )
        async with started(pool):
            await wait_until(lambda: pool.stats().size == size, 10.0)
            proxy.refuse(True)
            await proxy.reset_all()
            first_second = min(1.0, length)
            await asyncio.sleep(first_second)
            refused = proxy.refused
            await asyncio.sleep(length - first_second)
            rest = length - first_second
            rate = (proxy.refused - refused) / rest if rest > 0 else 0.0
            proxy.refuse(False)
            try:
                refill: float | None = await wait_until(
                    lambda: pool.stats().size == size and pool.stats().state is PoolState.READY,
                    limit,
                )
            except AssertionError:  # wait_until's "not reached in time"
                refill = None
    return OutageResult(refill, rate)


async def _open_circuit(pool: Pool[Any], limit: float) -> None:
    """Acquire until the pool refuses at once (its circuit is open); at most ``limit`` s."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        t0 = time.monotonic()
        try:
            async with pool.acquire(timeout=1.0):
                raise AssertionError("the provider is down: no acquire can succeed")
        except PoolError:
            if pool.stats().state is PoolState.UNAVAILABLE and time.monotonic() - t0 < 0.05:
                return
    raise TimeoutError(f"the circuit did not open within {limit:g} s")


async def circuit_recovery(backoff_max: float = 5.0, limit: float = 20.0) -> float | None:
    """A ``min_size = 0`` pool whose circuit opened against a refusing provider: seconds from the
    provider's return to the first successful acquire (callers try every 100 ms), None if none
    within ``limit``."""
    settings = PoolSettings(
        min_size=0,
        max_size=2,
        failure_threshold=2,
        backoff_initial=0.2,
        backoff_max=backoff_max,
        acquire_timeout=1.0,
    )
    async with provider() as server, FaultProxy("127.0.0.1", server.port) as proxy:
        proxy.refuse(True)
        pool = Pool(ws_adapter(f"ws://127.0.0.1:{proxy.port}"), settings, name="min0")
        async with started(pool):
            await _open_circuit(pool, 30.0)
            proxy.refuse(False)
            t0 = time.monotonic()
            while time.monotonic() - t0 < limit:
                try:
                    async with pool.acquire(timeout=0.5):
                        return time.monotonic() - t0
                except PoolError:
                    await asyncio.sleep(0.1)  # a caller's retry pace, not synchronisation
    return None


@dataclass(frozen=True, slots=True)
class FullCircuitResult:
    opened: bool  # the circuit opened while the provider hung up
    closed: float | None  # seconds from the provider's return to the circuit closed (None: never)
    full: float | None  # ... to a full, READY pool (None: not within the bound)


async def full_pool_circuit_recovery(
    size: int = 4, hang_for: float = 3.0, backoff_max: float = 2.0, limit: float = 15.0
) -> FullCircuitResult:
    """A full ``size`` pool (``max_size`` = ``min_size``) on a provider that starts hanging up
    right after each upgrade for ``hang_for`` s: every fresh connection dies young, the circuit
    opens; then the provider behaves again. Seconds until the circuit closes and until the pool
    is full and READY (each bounded by ``limit``)."""
    settings = PoolSettings(
        min_size=size,
        max_size=size,
        failure_threshold=2,
        backoff_initial=0.2,
        backoff_max=backoff_max,
        connect_timeout=2.0,
    )
    async with provider() as server:
        pool = Pool(ws_adapter(server.url), settings, name="full")
        async with started(pool):
            await wait_until(lambda: pool.stats().size == size, 10.0)
            server.hang_up_on_accept(1013)
            await server.close_all(1013)  # the restart into hanging up
            opened = True
            try:
                await wait_until(lambda: pool.state is PoolState.UNAVAILABLE, hang_for)
            except AssertionError:  # wait_until's "not reached in time"
                opened = False
            await asyncio.sleep(hang_for)  # the fault's duration
            server.hang_up_on_accept(None)
            t0 = time.monotonic()
            closed: float | None = None
            full: float | None = None
            with contextlib.suppress(AssertionError):
                await wait_until(lambda: pool.state is not PoolState.UNAVAILABLE, limit)
                closed = time.monotonic() - t0
                await wait_until(
                    lambda: pool.stats().size == size and pool.state is PoolState.READY,
                    max(0.0, limit - closed),
                )
                full = time.monotonic() - t0
    return FullCircuitResult(opened, closed, full)


async def caller_failure_latency(callers: int = 12, spacing: float = 0.2) -> float:
    """A 1-connection pool whose provider went down (reset, then refused): callers arrive every
    ``spacing`` s; the median seconds each waited before its acquire failed."""
    async with provider() as server, FaultProxy("127.0.0.1", server.port) as proxy:
        pool = Pool(
            ws_adapter(f"ws://127.0.0.1:{proxy.port}"),
            PoolSettings(min_size=1, max_size=1),
            name="one",
        )
        async with started(pool):
            await wait_until(lambda: pool.stats().size == 1, 10.0)
            proxy.refuse(True)
            await proxy.reset_all()

            async def caller() -> float:
                t0 = time.monotonic()
                with contextlib.suppress(PoolError):
                    async with pool.acquire():
                        pass
                return time.monotonic() - t0

            tasks = []
            for _ in range(callers):
                tasks.append(asyncio.create_task(caller()))
                await asyncio.sleep(spacing)  # arrivals, not synchronisation
            waits = await asyncio.gather(*tasks)
    return statistics.median(waits)


async def boot_time(size: int = 40, connect_timeout: float = 1.0) -> float:
    """Seconds ``start()`` takes for a ``size``-connection pool against a black hole."""
    async with provider() as server, FaultProxy("127.0.0.1", server.port) as proxy:
        proxy.black_hole()
        settings = PoolSettings(min_size=size, connect_timeout=connect_timeout)
        pool = Pool(ws_adapter(f"ws://127.0.0.1:{proxy.port}"), settings, name="boot")
        t0 = time.monotonic()
        try:
            with contextlib.suppress(PoolError):
                await pool.start()
            return time.monotonic() - t0
        finally:
            await pool.aclose(0)
            proxy.black_hole(False)


class _StateLog(logging.Handler):
    """Collects the pool's DEBUG state-change lines ``pool NAME: OLD -> NEW``."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.DEBUG)
        self.prefix = f"pool {name}: "
        self.changes: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if text.startswith(self.prefix) and " -> " in text:
            old, _, new = text[len(self.prefix) :].partition(" -> ")
            self.changes.append((old.strip(), new.split()[0] if new.split() else new))


@dataclass(frozen=True, slots=True)
class DegradedResult:
    state_during: PoolState  # ``pool.state`` once a reconnect failed
    logged: list[tuple[str, str]]  # (old, new) state changes in the DEBUG log

    @property
    def missing(self) -> list[str]:
        """The changes of READY -> DEGRADED -> READY the log did not report."""
        want = [("ready", "degraded"), ("degraded", "ready")]
        return [f"{a} -> {b}" for a, b in want if (a, b) not in self.logged]


async def degraded_reported(size: int = 4) -> DegradedResult:
    """One connection of a full pool is reset while the provider refuses, then the provider comes
    back: the state changes the DEBUG log reported (READY -> DEGRADED -> READY expected)."""
    logger = logging.getLogger("voicepool")
    handler = _StateLog("degrade")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    settings = PoolSettings(min_size=size, backoff_initial=0.1, backoff_max=0.5)
    try:
        async with provider() as server, FaultProxy("127.0.0.1", server.port) as proxy:
            pool = Pool(ws_adapter(f"ws://127.0.0.1:{proxy.port}"), settings, name="degrade")
            async with started(pool):
                await wait_until(lambda: pool.stats().size == size, 10.0)
                proxy.refuse(True)
                proxy.connections[0].reset()
                await wait_until(lambda: pool.stats().connect_failures > 0, 10.0)
                during = pool.state
                proxy.refuse(False)
                await wait_until(
                    lambda: pool.stats().size == size and pool.state is PoolState.READY, 10.0
                )
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    return DegradedResult(during, handler.changes)

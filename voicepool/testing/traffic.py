"""A traffic simulator on `PoolCore` in virtual time: a simulated day in seconds, no event loop.

It drives the real core as the asyncio driver does (``voicepool.pool.Pool`` and ``Lease``),
including the driver's inlined fast path (an idle hit and a clean release never reach the
core), and performs the core's actions on a simulated clock: a ``Connect`` completes after a
sampled connect time, a ``Ping`` after ``rtt``, the timer runs at each ``Wake``.

Traffic: calls arrive as a Poisson process whose rate follows ``Traffic.concurrency(t)`` (a
diurnal curve: the rate is the concurrency over the mean call duration), plus bursts (``burst``
calls spread over one second, at ``bursts_per_hour``); a call holds one lease for a log-normal
duration. What it measures is what a provider bills and what a caller feels: the share of
acquires that waited for a handshake, and the socket-seconds open while idle.

The calls are a trace (:meth:`TrafficSim.calls`: arrival time and hold duration each), drawn
from their own random stream, so two pools given the same seed see the same calls whatever they
do (a fixed pool's warm-up connects draw no arrivals). :func:`replay` drives a trace against a
real :class:`~voicepool.Pool` over real sockets and measures the same figures the same way
(idle socket-seconds: open sockets minus held leases, integrated exactly), and what it observed
(the calls as they really ran, the connect times) feeds :class:`TrafficSim` back: the simulator
is checked against the real driver on the same calls and the same handshake times.

Deterministic from ``seed``. Used by ``benchmarks/warm_floor.py`` and the policy's tests.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import random
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from voicepool._engine.actions import Close, Connect, Grant, Ping, Wake
from voicepool._engine.core import PoolCore, SizingPolicy
from voicepool._engine.observer import PoolObserver
from voicepool._engine.record import ConnRecord, ConnState
from voicepool._engine.waitqueue import Waiter
from voicepool._engine.warm import sizing_for
from voicepool.adapter import LeaseMode
from voicepool.pool_settings import PoolSettings

if TYPE_CHECKING:
    from voicepool.pool import Pool

__all__ = ["DAY", "Call", "Replay", "SimResult", "Traffic", "TrafficSim", "diurnal", "replay"]

Call = tuple[float, float]  # (arrival time, hold duration), seconds

DAY = 86400.0


def diurnal(peak: float, trough: float, day: float = DAY) -> Callable[[float], float]:
    """Concurrency over a day: ``trough`` at t=0 (3 a.m.), ``peak`` at mid-day, smooth."""

    def concurrency(t: float) -> float:
        return trough + (peak - trough) * math.sin(math.pi * (t % day) / day) ** 2

    return concurrency


@dataclass
class Traffic:
    """What the callers do. Durations are log-normal (``median`` seconds, ``sigma``); connect
    times log-normal too (``connect_median``, ``connect_sigma``), or, when ``connect_times``
    is given (handshake times measured on a real pool), those replayed in order, cycled."""

    concurrency: Callable[[float], float] = field(default_factory=lambda: diurnal(50, 2))
    max_concurrency: float = 50.0  # an upper bound of concurrency(t), for thinning
    median: float = 120.0
    sigma: float = 0.8
    burst: int = 10
    bursts_per_hour: float = 2.0
    connect_median: float = 0.25
    connect_sigma: float = 0.3
    connect_times: Sequence[float] | None = None

    @property
    def mean_duration(self) -> float:
        return self.median * math.exp(self.sigma**2 / 2)


@dataclass
class SimResult:
    acquires: int
    waited: int
    idle_time: float  # socket-seconds open and not held by a caller, exact
    open_time: float  # socket-seconds open
    connects: int
    spare_changes: int  # times the policy's spare target changed (adaptive only)
    samples: list[tuple[float, int, int, int]]  # (t, in_use, size, warm floor) each sample
    core: PoolCore[Any]

    @property
    def wait_share(self) -> float:
        return self.waited / self.acquires if self.acquires else 0.0


class _Conn:
    __slots__ = ("closed",)

    def __init__(self) -> None:
        self.closed = False


class TrafficSim:
    """One pool under ``traffic`` for ``duration`` simulated seconds. See the module docstring."""

    def __init__(
        self,
        settings: PoolSettings,
        traffic: Traffic,
        *,
        mode: LeaseMode = LeaseMode.EXCLUSIVE,
        seed: int = 1,
        rtt: float = 0.02,
        policy: SizingPolicy | None = None,
        sample_every: float = 60.0,
        ping_interval: float | None = None,
        tick_every: float | None = None,
        ticks: Sequence[float] = (),
    ) -> None:
        """``ping_interval``: the driver's (a Pool lowers the settings' one to half the
        adapter's ``max_idle``); default ``settings.ping_interval``. ``tick_every``: a timer of
        the driver's own besides the core's wakes (a Pool with observers ticks the core at each
        flush of their figures, once a second); default none. ``ticks``: the times a real
        driver's timer fired (:attr:`Replay.ticks`), replayed as ticks of the core."""
        self.settings = settings
        self.traffic = traffic
        self.seed = seed
        # Own streams: the calls must not depend on how many connects a pool happened to make.
        self.rng = random.Random(seed + 3)  # connect times
        self._connect_times: Iterator[float] | None = (
            itertools.cycle(traffic.connect_times) if traffic.connect_times else None
        )
        self.rtt = rtt
        self.sample_every = sample_every
        self.tick_every = tick_every
        self.ticks = ticks
        sizing = settings.resolve(cast(Any, _ModeOnly(mode)))
        self.core: PoolCore[_Conn] = PoolCore(
            "sim",
            settings,
            sizing,
            ping_interval=settings.ping_interval if ping_interval is None else ping_interval,
            rng=random.Random(seed + 1),
            is_open=lambda c: not c.closed,
            describe="sim://provider",
            policy=policy if policy is not None else sizing_for(settings),
        )
        self.exclusive = mode is LeaseMode.EXCLUSIVE
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self._wake = math.inf
        self.acquires = 0
        self.waited = 0
        self.waited_at: list[float] = []  # arrival times of the calls that waited (all of them)
        self.measure_from = 0.0
        self.max_held = 0
        self._held = 0
        self._idle_time = 0.0
        self._open_time = 0.0
        self._t_acc = 0.0
        self.samples: list[tuple[float, int, int, int]] = []

    # -- scheduling -------------------------------------------------------------------------------

    def _at(self, t: float, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, fn))

    def _account(self) -> None:
        dt = self.now - max(self._t_acc, self.measure_from)
        self._t_acc = max(self._t_acc, self.now)
        if dt > 0:
            size = len(self.core.conns)
            self._open_time += size * dt
            self._idle_time += (size - self._held) * dt

    def run(
        self,
        duration: float,
        measure_from: float = 0.0,
        calls_until: float | None = None,
        trace: Sequence[Call] | None = None,
    ) -> SimResult:
        """Start the pool at t=0, run the traffic for ``duration`` seconds, return the figures
        of ``[measure_from, duration]`` (a day after a day of learning: a worker that runs).

        ``trace``: these calls instead of :meth:`calls` up to ``calls_until`` (default
        ``duration``)."""
        self.measure_from = measure_from
        self._apply(self.core.start(0.0))
        if trace is None:
            trace = self.calls(duration if calls_until is None else calls_until)
        for at, hold in trace:
            self._at(at, lambda hold=hold: self._call(hold))  # type: ignore[misc]
        t = 0.0
        while t < duration:
            self._at(t, self._sample)
            t += self.sample_every
        if self.tick_every is not None:
            every = self.tick_every

            def tick() -> None:
                self._apply(self.core.tick(self.now))
                if self.now + every <= duration:
                    self._at(self.now + every, tick)

            self._at(every, tick)
        for t in self.ticks:
            if t <= duration:
                self._at(t, lambda: self._apply(self.core.tick(self.now)))
        while True:
            nxt = min(self._events[0][0] if self._events else math.inf, self._wake)
            if nxt > duration:
                break
            self.now = max(self.now, nxt)
            self._account()
            if self._events and self._events[0][0] <= self._wake:
                _t, _s, fn = heapq.heappop(self._events)
                fn()
            else:
                self._wake = math.inf
                self._apply(self.core.tick(self.now))
        self.now = duration
        self._account()
        policy = self.core.policy
        return SimResult(
            acquires=self.acquires,
            waited=self.waited,
            idle_time=self._idle_time,
            open_time=self._open_time,
            connects=self.core.n_connects,
            spare_changes=getattr(policy, "changes", 0),
            samples=self.samples,
            core=self.core,
        )

    def _sample(self) -> None:
        core = self.core
        self.samples.append((self.now, self._held, len(core.conns), core.warm_target))

    def calls(self, duration: float) -> list[Call]:
        """The calls arriving in ``[0, duration)``, in arrival order: what :meth:`run` replays,
        a function of the traffic and the seed only (the same for any pool, and for
        :func:`replay` over real sockets)."""
        tr = self.traffic
        rng = random.Random(self.seed)
        arrivals: list[float] = []
        lam_max = tr.max_concurrency / tr.mean_duration
        t = 0.0
        while True:  # thinning of a Poisson process at the diurnal rate
            t += rng.expovariate(lam_max)
            if t >= duration:
                break
            if rng.random() * tr.max_concurrency <= tr.concurrency(t):
                arrivals.append(t)
        if tr.bursts_per_hour > 0 and tr.burst > 0:
            t = 0.0
            while True:
                t += rng.expovariate(tr.bursts_per_hour / 3600.0)
                if t >= duration:
                    break
                arrivals.extend(t + rng.random() for _ in range(tr.burst))
        arrivals.sort()
        holds = random.Random(self.seed + 2)
        return [(t, tr.median * math.exp(holds.gauss(0, tr.sigma))) for t in arrivals]

    # -- the driver -------------------------------------------------------------------------------

    def _apply(self, actions: Any) -> None:
        for a in actions:
            if isinstance(a, Connect):
                self._connect(a)
            elif isinstance(a, Close):
                a.rec.conn.closed = True
            elif isinstance(a, Ping):
                self._ping(a.rec)
            elif isinstance(a, Grant):
                w = a.waiter
                self.core.served(w, self.now - (w.deadline - w.timeout))
                rec = w.rec
                assert rec is not None
                self._hold(rec, w.future)  # the driver's field: the call's hold duration
            elif isinstance(a, Wake):
                self._wake = min(self._wake, a.at)

    def _connect(self, a: Connect) -> None:
        tr = self.traffic
        if self._connect_times is not None:
            took = next(self._connect_times)
        else:
            took = tr.connect_median * math.exp(self.rng.gauss(0, tr.connect_sigma))

        def done() -> None:
            self._apply(self.core.connected(a, _Conn(), self.now))

        self._at(self.now + took, done)

    def _ping(self, rec: ConnRecord[_Conn]) -> None:
        def done() -> None:
            self._apply(self.core.pinged(rec, not rec.conn.closed, self.now, self.rtt))

        self._at(self.now + self.rtt, done)

    def _call(self, hold: float) -> None:
        """One call: the driver's fast path (Lease.__aenter__), else the core's queue."""
        core = self.core
        counted = self.now >= self.measure_from
        self.acquires += counted
        idle = core.idle
        if idle and not core.closing:
            rec = idle.pop()
            rec.state = ConnState.IN_USE
            core.n_acquired += 1
            self._hold(rec, hold)
            return
        rec_or_none, actions = core.take(self.now)
        self._apply(actions)
        if rec_or_none is not None:
            self._hold(rec_or_none, hold)
            return
        self.waited += counted
        self.waited_at.append(self.now)
        timeout = self.settings.acquire_timeout
        self._apply(core.wait(Waiter(self.now + timeout, timeout, hold), self.now))

    def _hold(self, rec: ConnRecord[_Conn], duration: float) -> None:
        self._held += 1
        self.max_held = max(self.max_held, self._held)

        def release() -> None:
            self._held -= 1
            core = self.core
            rec.last_used = self.now
            if self.exclusive and rec.expires > self.now and not core.waiters.count:
                rec.state = ConnState.IDLE  # Lease.__aexit__'s inlined clean release
                core.idle.append(rec)
                return
            self._apply(core.released(rec, self.now, "ok"))

        self._at(self.now + duration, release)


class _ModeOnly:
    """The two attributes PoolSettings.resolve reads from an adapter."""

    def __init__(self, mode: LeaseMode) -> None:
        self.lease_mode = mode
        self.max_streams = 1


# -- the same calls over real sockets ------------------------------------------------------------


@dataclass
class Replay:
    """What :func:`replay` measured over real sockets, counted as :class:`TrafficSim` counts.

    ``idle_time``: socket-seconds open and not held by a caller, integrated exactly from the
    pool's connect and close events and the callers' hold times (what the simulator counts);
    ``core_idle_time``: the pool's own ``stats().idle_time`` (its telemetry, sampled at events)
    over the whole run. ``calls``: the calls as they really ran (arrival relative to the start of
    the traffic, hold); ``waited_at``: the arrivals of those that waited; ``connect_times``:
    every handshake the pool timed, in order;
    ``warmup``: how long ``start()`` took; ``span``: start of the traffic to the last release;
    ``ping_interval``: the pool's (the adapter may lower the settings' one); ``ping_rtt``: the
    median health ping it timed; ``ticks``: when its timer fired (from the start of ``start()``).
    """

    acquires: int
    waited: int
    idle_time: float
    core_idle_time: float
    calls: list[Call]
    waited_at: list[float]
    connect_times: list[float]
    warmup: float
    span: float
    ping_interval: float
    ping_rtt: float
    ticks: list[float]

    @property
    def wait_share(self) -> float:
        return self.waited / self.acquires if self.acquires else 0.0

    def simulate(
        self,
        settings: PoolSettings,
        mode: LeaseMode,
        *,
        trace: Sequence[Call] | None = None,
        seed: int = 1,
    ) -> SimResult:
        """The simulator on the same calls (default: as they really ran), the same handshake
        times (replayed in order), the pool's ping interval and ping time, its timer's ticks
        replayed (besides the core's wakes: its observer flush ticks the core each second, late
        by the loop's lag), measured over the same span after the same warm-up: the figures to
        set beside this run's."""
        traffic = Traffic(connect_times=self.connect_times or None)
        sim = TrafficSim(
            settings,
            traffic,
            mode=mode,
            seed=seed,
            rtt=self.ping_rtt,
            ping_interval=self.ping_interval,
            ticks=self.ticks,
        )
        calls = self.calls if trace is None else trace
        shifted = [(self.warmup + at, hold) for at, hold in calls]
        return sim.run(self.warmup + self.span, measure_from=self.warmup, trace=shifted)


class _OpenSockets(PoolObserver):
    """Steps of the open-socket count, timed on the pool's clock."""

    def __init__(self, clock: Callable[[], float], steps: list[tuple[float, int]]) -> None:
        self.clock = clock
        self.steps = steps
        self.connect_times: list[float] = []
        self.ping_times: list[float] = []

    def on_ping(self, pool: Pool[Any], duration: float, error: BaseException | None) -> None:
        if error is None:
            self.ping_times.append(duration)

    def on_connected(
        self, pool: Pool[Any], token: object, duration: float, error: BaseException | None
    ) -> None:
        if error is None:
            self.steps.append((self.clock(), 1))
            self.connect_times.append(duration)

    def on_closed(self, pool: Pool[Any], reason: str) -> None:
        self.steps.append((self.clock(), -1))


async def replay(
    adapter: Any,
    settings: PoolSettings,
    trace: Sequence[Call],
    *,
    name: str = "replay",
    acquire_timeout: float = 10.0,
    clock: Callable[[], float] | None = None,
) -> Replay:
    """Start a :class:`~voicepool.Pool` of ``adapter`` and run ``trace`` against it: each call
    acquires at its arrival (relative to the end of ``start()``), holds the lease for its
    duration, releases. Closes the pool before returning.

    Raises what ``Pool.start`` raises, and PoolExhausted / PoolUnavailable from a call that
    could not acquire within ``acquire_timeout``. Bounded: the calls' last arrival plus the
    longest hold plus ``acquire_timeout`` (then TimeoutError). Cancellation-safe: cancelling
    cancels the calls and closes the pool.
    """
    import time

    from voicepool.pool import Pool

    clock = clock or time.monotonic
    now: Callable[[], float] = clock  # (for the class below: mypy narrows no closure's variable)
    steps: list[tuple[float, int]] = []  # (time, +1/-1): open sockets minus held leases
    sockets = _OpenSockets(clock, steps)
    ticks: list[float] = []

    class TickedPool(Pool[Any]):
        """The pool whose driver's timer is recorded, for the simulator to replay."""

        def _on_timer(self) -> None:
            ticks.append(now() - booted)
            super()._on_timer()

    pool: Pool[Any] = TickedPool(adapter, settings, name=name, observers=[sockets], clock=clock)
    ran: list[Call] = []
    waited_at: list[float] = []
    booted = clock()
    async with pool:
        t0 = clock()
        idle_at_start = pool.stats().idle_time

        async def call(at: float, hold: float) -> None:
            await asyncio.sleep(max(0.0, at - (clock() - t0)))
            arrived = clock()
            async with pool.acquire(timeout=acquire_timeout):
                start = clock()
                if start - arrived > 0.001:  # took no idle connection: suspended for a grant
                    waited_at.append(arrived - t0)
                steps.append((start, -1))
                await asyncio.sleep(hold)
                end = clock()
                steps.append((end, 1))
            ran.append((arrived - t0, end - start))

        bound = max((at for at, _ in trace), default=0.0)
        bound += max((hold for _, hold in trace), default=0.0) + acquire_timeout + 5.0
        async with asyncio.timeout(bound):
            await asyncio.gather(*(call(at, hold) for at, hold in trace))
        t_end = clock()
        st = pool.stats()
        core_idle = st.idle_time - idle_at_start
        ping_interval = pool._core.ping_interval
    idle, count, last = 0.0, 0, t0
    for t, step in sorted(steps):  # idle = open - held, integrated over [t0, t_end]
        if t > t0:
            idle += count * (min(t, t_end) - last)
            last = min(t, t_end)
        count += step
    idle += count * max(0.0, t_end - last)
    ran.sort()
    return Replay(
        acquires=st.acquired + st.timeouts,
        waited=st.waited,
        idle_time=idle,
        core_idle_time=core_idle,
        calls=ran,
        waited_at=sorted(waited_at),
        connect_times=sockets.connect_times,
        ping_rtt=statistics.median(sockets.ping_times) if sockets.ping_times else 0.02,
        warmup=t0 - booted,
        span=t_end - t0,
        ping_interval=ping_interval,
        ticks=ticks,
    )

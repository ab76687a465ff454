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

Deterministic from ``seed``. Used by ``benchmarks/warm_floor.py`` and the policy's tests.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from voicepool._engine.actions import Close, Connect, Grant, Ping, Wake
from voicepool._engine.core import PoolCore, SizingPolicy
from voicepool._engine.record import ConnRecord, ConnState
from voicepool._engine.waitqueue import Waiter
from voicepool._engine.warm import sizing_for
from voicepool.adapter import LeaseMode
from voicepool.pool_settings import PoolSettings

__all__ = ["DAY", "SimResult", "Traffic", "TrafficSim", "diurnal"]

DAY = 86400.0


def diurnal(peak: float, trough: float, day: float = DAY) -> Callable[[float], float]:
    """Concurrency over a day: ``trough`` at t=0 (3 a.m.), ``peak`` at mid-day, smooth."""

    def concurrency(t: float) -> float:
        return trough + (peak - trough) * math.sin(math.pi * (t % day) / day) ** 2

    return concurrency


@dataclass
class Traffic:
    """What the callers do. Durations are log-normal (``median`` seconds, ``sigma``); connect
    times log-normal too (``connect_median``, ``connect_sigma``)."""

    concurrency: Callable[[float], float] = field(default_factory=lambda: diurnal(50, 2))
    max_concurrency: float = 50.0  # an upper bound of concurrency(t), for thinning
    median: float = 120.0
    sigma: float = 0.8
    burst: int = 10
    bursts_per_hour: float = 2.0
    connect_median: float = 0.25
    connect_sigma: float = 0.3

    @property
    def mean_duration(self) -> float:
        return self.median * math.exp(self.sigma**2 / 2)


@dataclass
class SimResult:
    acquires: int
    waited: int
    idle_time: float  # socket-seconds open while idle, exact (the simulator sees every change)
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
    ) -> None:
        self.settings = settings
        self.traffic = traffic
        self.rng = random.Random(seed)
        self.rtt = rtt
        self.sample_every = sample_every
        sizing = settings.resolve(cast(Any, _ModeOnly(mode)))
        self.core: PoolCore[_Conn] = PoolCore(
            "sim",
            settings,
            sizing,
            ping_interval=settings.ping_interval,
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
        self, duration: float, measure_from: float = 0.0, calls_until: float | None = None
    ) -> SimResult:
        """Start the pool at t=0, run the traffic for ``duration`` seconds, return the figures
        of ``[measure_from, duration]`` (a day after a day of learning: a worker that runs)."""
        self.measure_from = measure_from
        self._apply(self.core.start(0.0))
        self._schedule_arrivals(duration if calls_until is None else calls_until)
        t = 0.0
        while t < duration:
            self._at(t, self._sample)
            t += self.sample_every
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

    def arrivals(self, duration: float) -> list[float]:
        """The arrival times :meth:`run` would use (for a real-socket run of the same calls)."""
        calls: list[float] = []
        self._at = lambda t, fn: calls.append(t)  # type: ignore[method-assign]
        try:
            self._schedule_arrivals(duration)
        finally:
            del self._at
        return sorted(calls)

    def _schedule_arrivals(self, duration: float) -> None:
        tr, rng = self.traffic, self.rng
        lam_max = tr.max_concurrency / tr.mean_duration
        t = 0.0
        while True:  # thinning of a Poisson process at the diurnal rate
            t += rng.expovariate(lam_max)
            if t >= duration:
                break
            if rng.random() * tr.max_concurrency <= tr.concurrency(t):
                self._at(t, self._call)
        if tr.bursts_per_hour > 0 and tr.burst > 0:
            t = 0.0
            while True:
                t += rng.expovariate(tr.bursts_per_hour / 3600.0)
                if t >= duration:
                    break
                for _ in range(tr.burst):
                    self._at(t + rng.random(), self._call)

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
                self._hold(rec)
            elif isinstance(a, Wake):
                self._wake = min(self._wake, a.at)

    def _connect(self, a: Connect) -> None:
        tr = self.traffic
        took = tr.connect_median * math.exp(self.rng.gauss(0, tr.connect_sigma))

        def done() -> None:
            self._apply(self.core.connected(a, _Conn(), self.now))

        self._at(self.now + took, done)

    def _ping(self, rec: ConnRecord[_Conn]) -> None:
        def done() -> None:
            self._apply(self.core.pinged(rec, not rec.conn.closed, self.now, self.rtt))

        self._at(self.now + self.rtt, done)

    def _call(self) -> None:
        """One call: the driver's fast path (Lease.__aenter__), else the core's queue."""
        core = self.core
        counted = self.now >= self.measure_from
        self.acquires += counted
        idle = core.idle
        if idle and not core.closing:
            rec = idle.pop()
            rec.state = ConnState.IN_USE
            core.n_acquired += 1
            self._hold(rec)
            return
        rec_or_none, actions = core.take(self.now)
        self._apply(actions)
        if rec_or_none is not None:
            self._hold(rec_or_none)
            return
        self.waited += counted
        timeout = self.settings.acquire_timeout
        self._apply(core.wait(Waiter(self.now + timeout, timeout), self.now))

    def _hold(self, rec: ConnRecord[_Conn]) -> None:
        tr = self.traffic
        self._held += 1
        self.max_held = max(self.max_held, self._held)
        duration = tr.median * math.exp(self.rng.gauss(0, tr.sigma))

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

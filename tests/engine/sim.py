"""A discrete-event driver of `PoolCore` on virtual time, for the core's failure-policy tests.

It performs the core's actions as the asyncio driver would, but on a simulated clock: a connect
ends ``connect_time`` later (success or failure as the scripted provider says), a ping
``rtt`` later, the timer at each ``Wake``. Deterministic (seeded), microseconds per event.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from voicepool import LeaseMode, PoolSettings, PoolState
from voicepool._engine.actions import (
    Action,
    Close,
    Connect,
    Fail,
    Grant,
    Ping,
    StateChanged,
    Wake,
)
from voicepool._engine.core import PoolCore
from voicepool._engine.record import ConnRecord
from voicepool._engine.waitqueue import Waiter
from voicepool.errors import ConnectError
from voicepool.testing import FakeAdapter


@dataclass(eq=False)
class Conn:
    ident: int
    open: bool = True
    closed: bool = False
    error: BaseException | None = None  # what the adapter reports (Adapter.connection_error)


@dataclass
class Provider:
    """What the far end does. ``up(t)``: connects and pings succeed; ``hang_up``: every
    connection is closed by the peer ``hang_up`` seconds after it opened; ``capacity``: the
    streams a connection advertises (MULTIPLEXED); ``black_hole``: connects never answer (they
    fail at connect_timeout)."""

    up: Callable[[float], bool] = lambda t: True
    hang_up: float | None = None
    capacity: int = 100
    black_hole: Callable[[float], bool] = lambda t: False
    fatal: bool = False


@dataclass
class Sim:
    settings: PoolSettings
    mode: LeaseMode = LeaseMode.EXCLUSIVE
    max_streams: int = 1
    provider: Provider = field(default_factory=Provider)
    connect_time: float = 0.005
    rtt: float = 0.002
    seed: int = 1

    def __post_init__(self) -> None:
        sizing = self.settings.resolve(_ModeOnly(self.mode, self.max_streams))
        self.core: PoolCore[Conn] = PoolCore(
            "sim",
            self.settings,
            sizing,
            ping_interval=self.settings.ping_interval,
            rng=random.Random(self.seed),
            is_open=lambda c: c.open and not c.closed,
            describe="sim://provider",
            connection_error=lambda c: c.error,
            is_fatal=lambda e: isinstance(e, ConnectError) and e.fatal,
        )
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self._wake = math.inf
        self.connects: list[float] = []  # start times of every connect attempt
        self.states: list[tuple[float, PoolState, PoolState]] = []
        self.failed: list[tuple[float, Waiter, BaseException]] = []
        self.granted: list[tuple[float, Waiter]] = []
        self.conns: list[Conn] = []
        self.actions: list[Action] = []

    # -- scheduling -------------------------------------------------------------------------------

    def at(self, t: float, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, fn))

    def run_until(self, t_end: float) -> None:
        while True:
            nxt = min(self._events[0][0] if self._events else math.inf, self._wake)
            if nxt > t_end:
                break
            self.now = max(self.now, nxt)
            if self._events and self._events[0][0] <= self._wake:
                _t, _s, fn = heapq.heappop(self._events)
                fn()
            else:
                self._wake = math.inf
                self.apply(self.core.tick(self.now))
        self.now = t_end

    # -- the driver -------------------------------------------------------------------------------

    def apply(self, actions: Any) -> None:
        for a in actions:
            self.actions.append(a)
            if isinstance(a, Connect):
                self._connect(a)
            elif isinstance(a, Close):
                a.rec.conn.closed = True
            elif isinstance(a, Ping):
                self._ping(a.rec)
            elif isinstance(a, Grant):
                self.granted.append((self.now, a.waiter))
                self.core.served(a.waiter, self.now - (a.waiter.deadline - a.waiter.timeout))
                rec = a.waiter.rec
                assert rec is not None
                self._release_later(rec)
            elif isinstance(a, Fail):
                self.failed.append((self.now, a.waiter, a.error))
            elif isinstance(a, StateChanged):
                self.states.append((self.now, a.old, a.new))
            elif isinstance(a, Wake):
                self._wake = min(self._wake, a.at)
        self.core.check()

    def _connect(self, a: Connect) -> None:
        self.connects.append(self.now)
        p = self.provider
        if p.black_hole(self.now):
            done = self.now + self.settings.connect_timeout
            err = ConnectError("timed out")
            self.at(done, lambda: self.apply(self.core.connect_failed(a, err, False, self.now)))
            return
        ok = p.up(self.now)

        def finish() -> None:
            if not ok:
                err = ConnectError("refused", fatal=p.fatal)
                self.apply(self.core.connect_failed(a, err, p.fatal, self.now))
                return
            conn = Conn(len(self.conns) + 1)
            self.conns.append(conn)
            self.apply(self.core.connected(a, conn, self.now, p.capacity))
            if p.hang_up is not None:
                self.at(self.now + p.hang_up, lambda: self.kill(conn))

        self.at(self.now + self.connect_time, finish)

    def _ping(self, rec: ConnRecord[Conn]) -> None:
        def finish() -> None:
            ok = self.provider.up(self.now) and rec.conn.open
            self.apply(self.core.pinged(rec, ok, self.now, self.rtt))

        self.at(self.now + self.rtt, finish)

    def kill(self, conn: Conn) -> None:
        if conn.open and not conn.closed:
            conn.open = False
            self.apply(self.core.changed(conn, False, 0, self.now))

    def learn(self, conn: Conn, error: BaseException) -> None:
        """The adapter learnt ``error`` on ``conn`` (a 401 on a request) and keeps it open."""
        conn.error = error
        self.apply(self.core.changed(conn, True, self.provider.capacity, self.now))

    def start(self) -> None:
        self.apply(self.core.start(self.now))

    hold: float = 0.01  # how long a caller holds what it got

    def _release_later(self, rec: ConnRecord[Conn]) -> None:
        def release() -> None:
            if self.mode is LeaseMode.MULTIPLEXED:
                self.apply(self.core.stream_released(rec, self.now, rec.conn.open, None))
            else:
                how = "ok" if rec.conn.open else "remote_closed"
                self.apply(self.core.released(rec, self.now, how))

        self.at(self.now + self.hold, release)

    def acquire(self, timeout: float) -> Waiter | None:
        """A caller: served at once (None; released after ``hold``), else its Waiter."""
        rec, actions = self.core.take(self.now)
        self.apply(actions)
        if rec is not None:
            self._release_later(rec)
            return None
        w = Waiter(self.now + timeout, timeout)
        self.apply(self.core.wait(w, self.now))
        return w


class _ModeOnly(FakeAdapter):
    """An adapter for PoolSettings.resolve, which reads only its mode and stream count."""

    def __init__(self, mode: LeaseMode, max_streams: int) -> None:
        super().__init__()
        self.lease_mode = mode
        self.max_streams = max_streams

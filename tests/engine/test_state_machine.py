"""Hypothesis state machine over `PoolCore` itself: no event loop, no sleeps, no real time.

The machine plays the driver: it performs the core's actions by hand (connects and pings stay
"in flight" until a rule completes them, successfully or not), and plays the callers: acquire,
resume a granted wait, give up, release in every way, in every lease mode. After every step the
core's own invariants (``core.check()``) and the machine's view (nothing held twice, nothing
closed twice, every state change reported once and in order) must hold; at the end every waiter
must have been served or failed, and closing must close every connection ever opened.
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from voicepool import LeaseMode, PoolSettings, PoolState
from voicepool._engine.actions import (
    Action,
    Alarm,
    Close,
    Connect,
    Fail,
    Grant,
    Ping,
    StateChanged,
    Wake,
)
from voicepool._engine.core import PoolCore
from voicepool._engine.record import ConnRecord, ConnState
from voicepool._engine.waitqueue import Waiter
from voicepool.errors import ConnectError, PoolClosed, PoolExhausted, PoolUnavailable
from voicepool.pool import _gate as quota_gate
from voicepool.pool_settings import ResolvedSizing


@dataclass(eq=False)
class Conn:
    ident: int
    open: bool = True
    closed: bool = False
    holders: int = 0
    error: BaseException | None = None  # what the adapter reports (Adapter.connection_error)


@dataclass(eq=False)
class Held:
    rec: ConnRecord[Conn]
    sid: int | None


@dataclass
class World:
    connects: list[Connect] = field(default_factory=list)
    pings: list[ConnRecord[Conn]] = field(default_factory=list)
    waiting: list[Waiter] = field(default_factory=list)
    granted: list[Waiter] = field(default_factory=list)
    held: list[Held] = field(default_factory=list)
    conns: list[Conn] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)


class CoreMachine(RuleBasedStateMachine):
    core: PoolCore[Conn]

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.w = World()
        self.reported = PoolState.NEW
        self.wake_at = math.inf
        self.started = False

    # -- the driver's side --------------------------------------------------------------------

    def apply(self, actions: object) -> None:
        assert isinstance(actions, list | tuple)
        for a in actions:
            self.perform(a)
        self.core.check()

    def perform(self, a: Action) -> None:
        w = self.w
        if isinstance(a, Connect):
            w.connects.append(a)
        elif isinstance(a, Close):
            conn = a.rec.conn
            assert not conn.closed, f"{conn} closed twice"
            assert a.rec.state is ConnState.CLOSED
            if not self.mux and a.reason not in ("shutdown",):
                assert conn.holders == 0, f"closed {conn} while it is held ({a.reason})"
            conn.closed = True
        elif isinstance(a, Ping):
            assert a.rec not in w.pings, "pinged twice at once"
            if not self.mux:
                assert a.rec.conn.holders == 0, "pinged a leased connection"
            w.pings.append(a.rec)
        elif isinstance(a, Grant):
            assert a.waiter in w.waiting, "granted a waiter that is not waiting"
            w.waiting.remove(a.waiter)
            w.granted.append(a.waiter)
            assert a.waiter.rec is not None
            if not self.mux:
                assert a.waiter.rec.conn.holders == 0, "granted a held connection"
                a.waiter.rec.conn.holders += 1  # reserved for this waiter
        elif isinstance(a, Fail):
            assert a.waiter in w.waiting, "failed a waiter that is not waiting"
            assert isinstance(a.error, PoolExhausted | PoolUnavailable | PoolClosed)
            w.waiting.remove(a.waiter)
            name = type(a.error).__name__
            w.outcomes[name] = w.outcomes.get(name, 0) + 1
        elif isinstance(a, StateChanged):
            assert a.old is self.reported, (a, self.reported)
            assert a.new is not a.old
            self.reported = a.new
        elif isinstance(a, Wake):
            self.wake_at = min(self.wake_at, a.at)
        else:
            assert isinstance(a, Alarm)

    @property
    def c(self) -> PoolCore[Conn]:
        return self.core

    # -- setup ----------------------------------------------------------------------------------

    @initialize(
        mode=st.sampled_from(list(LeaseMode)),
        max_size=st.integers(1, 4),
        min_size=st.integers(0, 4),
        seed=st.integers(0, 2**16),
    )
    def start(self, mode: LeaseMode, max_size: int, min_size: int, seed: int) -> None:
        self.launch(mode, max_size, min_size, seed)

    def launch(
        self,
        mode: LeaseMode,
        max_size: int,
        min_size: int,
        seed: int,
        quota: dict[str, Any] | None = None,
    ) -> None:
        """Start the machine's pool (the initialize rules of this machine and its subclasses);
        ``quota``: its ``[quota]`` settings, for a core with a quota gate as the Pool builds it."""
        self.mux = mode is LeaseMode.MULTIPLEXED
        streams = 2 if self.mux else 1
        cfg = PoolSettings(
            min_size=min(min_size, max_size),
            max_size=max_size,
            ping_interval=10,
            ping_timeout=1,
            max_lifetime=60,
            idle_timeout=25,
            failure_threshold=3,
            backoff_initial=1,
            backoff_max=4,
            acquire_timeout=1000,
            alarm_window=30,
            connect_concurrency=2,
            quota=quota,
        )
        sizing = ResolvedSizing(mode, streams, min(min_size, max_size), max_size)
        self.core = PoolCore(
            "sm",
            cfg,
            sizing,
            ping_interval=10,
            rng=random.Random(seed),
            is_open=lambda conn: conn.open and not conn.closed,
            describe="fake://sm",
            connection_error=lambda conn: conn.error,
            is_fatal=lambda exc: isinstance(exc, ConnectError) and exc.fatal,
            quota=quota_gate(cfg, mode, streams),
        )
        self.apply(self.core.start(self.now))
        self.started = True

    # -- callers ---------------------------------------------------------------------------------

    @rule(timeout=st.sampled_from([0.5, 5.0, 1000.0]))
    def acquire(self, timeout: float) -> None:
        rec, actions = self.c.take(self.now)
        self.apply(actions)
        if rec is not None:
            self.hold(rec, rec.seq if self.mux else None)
            return
        waiter = Waiter(self.now + timeout, timeout)
        self.w.waiting.append(waiter)
        self.apply(self.c.wait(waiter, self.now))

    def hold(self, rec: ConnRecord[Conn], sid: int | None, reserved: bool = False) -> None:
        if not self.mux:
            if not reserved:
                assert rec.conn.holders == 0, "connection held twice"
                rec.conn.holders += 1
            assert rec.conn.holders == 1, "connection held twice"
            assert rec.state is ConnState.IN_USE
        # (A MULTIPLEXED stream granted before its connection was retired, by a failed ping, still
        # reaches its caller: the adapter fails its I/O; nothing new is lent on it.)
        assert not rec.conn.closed or (self.mux and reserved), "lent a closed connection"
        self.w.held.append(Held(rec, sid))

    @precondition(lambda self: bool(self.w.granted))
    @rule(data=st.data())
    def resume_granted(self, data: st.DataObject) -> None:
        waiter = data.draw(st.sampled_from(self.w.granted))
        self.w.granted.remove(waiter)
        self.c.served(waiter, 0.01)
        assert waiter.rec is not None
        self.hold(waiter.rec, waiter.stream_id, reserved=True)

    @precondition(lambda self: bool(self.w.granted or self.w.waiting))
    @rule(data=st.data())
    def give_up(self, data: st.DataObject) -> None:
        waiter = data.draw(st.sampled_from(self.w.granted + self.w.waiting))
        if waiter in self.w.granted:
            self.w.granted.remove(waiter)
            if not self.mux and waiter.rec is not None:
                waiter.rec.conn.holders -= 1
        else:
            self.w.waiting.remove(waiter)
        self.apply(self.c.give_up(waiter, self.now))

    @precondition(lambda self: bool(self.w.held))
    @rule(
        data=st.data(),
        how=st.sampled_from(["ok", "ok", "error", "discarded", "reset_failed", "remote_closed"]),
        keep=st.booleans(),
    )
    def release(self, data: st.DataObject, how: str, keep: bool) -> None:
        held = data.draw(st.sampled_from(self.w.held))
        self.w.held.remove(held)
        rec = held.rec
        if self.mux:
            why = {"ok": None, "error": "error", "discarded": "discarded"}.get(how)
            self.apply(self.c.stream_released(rec, self.now, keep and rec.conn.open, why))
            return
        rec.conn.holders -= 1
        if how == "ok" and not rec.conn.open:
            how = "remote_closed"  # what the driver reports for a connection found closed
        self.apply(self.c.released(rec, self.now, how))

    # -- the provider's side -------------------------------------------------------------------

    @precondition(lambda self: bool(self.w.connects))
    @rule(data=st.data(), outcome=st.sampled_from(["ok", "ok", "ok", "fail", "fatal", "zero"]))
    def connect_done(self, data: st.DataObject, outcome: str) -> None:
        attempt = data.draw(st.sampled_from(self.w.connects))
        self.w.connects.remove(attempt)
        if outcome in ("fail", "fatal"):
            err = ConnectError("scripted", fatal=outcome == "fatal")
            self.apply(self.c.connect_failed(attempt, err, outcome == "fatal", self.now))
            return
        conn = Conn(len(self.w.conns) + 1)
        self.w.conns.append(conn)
        cap = 0 if outcome == "zero" else 2
        self.apply(self.c.connected(attempt, conn, self.now, cap if self.mux else 1))
        if outcome == "zero" and not self.mux:
            pass  # capacity means nothing outside MULTIPLEXED

    @precondition(lambda self: bool(self.w.pings))
    @rule(data=st.data(), ok=st.booleans())
    def ping_done(self, data: st.DataObject, ok: bool) -> None:
        rec = data.draw(st.sampled_from(self.w.pings))
        self.w.pings.remove(rec)
        self.apply(self.c.pinged(rec, ok and rec.conn.open, self.now, 0.002))

    @precondition(lambda self: any(c.open and not c.closed for c in self.w.conns))
    @rule(data=st.data(), notify=st.booleans(), cap=st.sampled_from([None, 0, 1, 2]))
    def peer_changes(self, data: st.DataObject, notify: bool, cap: int | None) -> None:
        conn = data.draw(st.sampled_from([c for c in self.w.conns if c.open and not c.closed]))
        if cap is None or not self.mux:
            conn.open = False
            if notify:
                self.apply(self.c.changed(conn, False, 0, self.now))
        else:
            self.apply(self.c.changed(conn, True, cap, self.now))

    @precondition(lambda self: any(c.open and not c.closed for c in self.w.conns))
    @rule(data=st.data())
    def refused_on_a_request(self, data: st.DataObject) -> None:
        """The adapter learns a 401 on a connection it keeps open (a request's answer): the
        circuit opens with nothing lost, a full pool included."""
        conn = data.draw(st.sampled_from([c for c in self.w.conns if c.open and not c.closed]))
        conn.error = ConnectError("fake://sm answered HTTP 401", fatal=True, status=401)
        rec = self.c.by_conn.get(id(conn))
        cap = rec.cap if rec is not None and self.mux else 1
        self.apply(self.c.changed(conn, True, cap, self.now))

    @rule(dt=st.sampled_from([0.001, 0.5, 2.0, 5.0, 11.0, 30.0]))
    def advance_clock(self, dt: float) -> None:
        self.now += dt
        if self.now >= self.wake_at:
            self.wake_at = math.inf
            self.apply(self.c.tick(self.now))

    @rule()
    def expire_all(self) -> None:
        self.apply(self.c.expire_all(self.now))

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def consistent(self) -> None:
        if not self.started:
            return
        c = self.c
        c.check()
        assert self.reported is c.state, "a state change was not reported"
        assert c.opening == len(self.w.connects), "opening is not the connects in flight"
        assert c.waiters.count == len(self.w.waiting)
        live = [h for h in self.w.held if h.rec.state is not ConnState.CLOSED]
        if self.mux:
            for rec in c.conns.values():
                mine = sum(1 for h in live if h.rec is rec) + sum(
                    1 for g in self.w.granted if g.rec is rec
                )
                assert rec.streams == mine, (rec, mine)
        else:
            held_ids = [id(h.rec) for h in live] + [id(g.rec) for g in self.w.granted]
            assert len(held_ids) == len(set(held_ids)), "a connection is held twice"
            in_use = {id(r) for r in c.conns.values() if r.state is ConnState.IN_USE}
            assert set(held_ids) == in_use, "in-use records are not the held ones"
        for conn in self.w.conns:
            if not conn.closed:
                assert c.by_conn.get(id(conn)) is not None, f"{conn} is open but the pool lost it"
        if self.w.waiting and c.state is PoolState.READY and not c.warming:
            # The timer must be armed for the next deadline, retry or refill.
            assert self.wake_at < math.inf or c.opening or len(c.conns) >= c.max_size

    @invariant()
    def open_circuit_probes(self) -> None:
        """An open circuit with no connect in flight always has a probe coming: by timers alone
        (pings answered, nothing released, no caller), a connect starts within backoff_max +
        min_healthy. Unless every slot is taken by a held connection: a lease is never
        interrupted, and its release makes the idle connection the probe replaces."""
        c = self.c
        if not self.started or not c.circuit_open or c.opening or c.closing:
            return
        if c.quota is not None:
            return  # the fleet's tokens decide (the quota machine checks its own liveness)
        spare = any(not r.streams and not r.pinging for r in c.mux_conns) if self.mux else c.idle
        if len(c.conns) >= c.max_size and not spare:
            return
        core, pings = copy.deepcopy((c, self.w.pings))
        now = self.now
        bound = now + c.settings.backoff_max + c.settings.min_healthy
        actions: list[Action] = []
        for rec in pings:
            actions += core.pinged(rec, rec.conn.open, now, 0.001)
        for _ in range(200):
            if any(isinstance(a, Connect) for a in actions):
                return
            for a in actions:
                if isinstance(a, Ping):
                    pings.append(a.rec)
            actions = []
            for rec in pings:
                actions += core.pinged(rec, rec.conn.open, now, 0.001)
            pings.clear()
            if not actions:
                now = max(now, core.next_due(now))
                assert now <= bound, ("no probe is coming", c.stats(), self.now, now)
                actions = core.tick(now)
        raise AssertionError(("no probe is coming", c.stats(), self.now))

    def teardown(self) -> None:
        if not self.started:
            return
        c, w = self.c, self.w
        # Liveness: with the provider healthy again, every waiter is served or failed.
        for _ in range(400):
            if not (w.waiting or w.granted or w.held or w.connects or w.pings):
                break
            for attempt in list(w.connects):
                w.connects.remove(attempt)
                conn = Conn(len(w.conns) + 1)
                w.conns.append(conn)
                self.apply(c.connected(attempt, conn, self.now, 2 if self.mux else 1))
            for rec in list(w.pings):
                w.pings.remove(rec)
                self.apply(c.pinged(rec, rec.conn.open, self.now, 0.001))
            for waiter in list(w.granted):
                w.granted.remove(waiter)
                c.served(waiter, 0.0)
                assert waiter.rec is not None
                self.hold(waiter.rec, waiter.stream_id, reserved=True)
            for held in list(w.held):
                w.held.remove(held)
                if self.mux:
                    self.apply(c.stream_released(held.rec, self.now, held.rec.conn.open, None))
                else:
                    held.rec.conn.holders -= 1
                    how = "ok" if held.rec.conn.open else "remote_closed"
                    self.apply(c.released(held.rec, self.now, how))
            self.now += 1.0
            self.wake_at = math.inf
            self.apply(c.tick(self.now))
        assert not w.waiting, (w.waiting, c.stats())
        assert not w.granted, (w.granted, c.stats())
        self.apply(c.close(self.now))
        for attempt in list(w.connects):
            w.connects.remove(attempt)
            self.apply(c.connect_cancelled(attempt, self.now))
        for rec in list(w.pings):
            w.pings.remove(rec)
            self.apply(c.ping_cancelled(rec, self.now))
        assert not c.busy
        self.apply(c.close_all(self.now))
        self.apply(c.closed(self.now))
        assert all(conn.closed for conn in w.conns), "a connection was never closed"
        s = c.stats()
        assert (s.size, s.opening, s.waiters, s.state) == (0, 0, 0, PoolState.CLOSED)


# What the machines of the core share (the quota machine runs fewer examples of its own).
MACHINE_SETTINGS = settings(
    max_examples=400,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
CoreMachine.TestCase.settings = MACHINE_SETTINGS


TestCoreStateMachine = pytest.mark.timeout(300)(CoreMachine.TestCase)

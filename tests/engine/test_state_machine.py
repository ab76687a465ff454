"""Hypothesis state machine: random acquire / release / discard / error / cancel / ping failure /
connect failure / dead connection / clock advance, with the pool's invariants checked after every
step, in all three lease modes. The pool's clock is fake, so health passes run on command."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from voicepool import Lease, Pool, PoolSettings, VoicepoolError
from voicepool._engine.record import ConnState

from .fakes import FakeAdapter, FakeConn, MuxAdapter, NoResetAdapter, SingleUseAdapter


class Boom(Exception):
    pass


@dataclass
class Caller:
    """One simulated call handler: acquires, holds until told, then releases in some way."""

    task: asyncio.Task[None] | None = None
    lease: Lease[FakeConn] | None = None
    conn: FakeConn | None = None
    go: asyncio.Event = field(default_factory=asyncio.Event)
    action: str = "ok"
    outcome: str = "pending"


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.now = 0.0
        self.callers: list[Caller] = []
        self.pool: Pool[FakeConn] | None = None
        self.adapter: FakeAdapter | None = None

    # -- plumbing -----------------------------------------------------------------------------

    def step(self, n: int = 6) -> None:
        for _ in range(n):
            self.loop.run_until_complete(asyncio.sleep(0))

    def on_loop(self, fn: Callable[[], object]) -> None:
        """Run a synchronous pool entry point on the loop (it may spawn tasks)."""

        async def run() -> None:
            fn()

        self.loop.run_until_complete(run())

    def maintain(self) -> None:
        """One health pass at the fake clock's time."""
        self.on_loop(self.p._maintain)

    async def _call(self, caller: Caller) -> None:
        assert self.pool is not None
        try:
            async with self.pool.acquire() as lease:
                conn = lease.conn
                caller.lease, caller.conn = lease, conn
                conn.holders += 1
                if not self.mux:
                    assert conn.holders == 1, "connection held twice"
                try:
                    await caller.go.wait()
                finally:
                    conn.holders -= 1
                    caller.conn = None
                if caller.action == "discard":
                    lease.discard("test")
                elif caller.action == "error":
                    raise Boom
            caller.outcome = "released"
        except Boom:
            caller.outcome = "errored"
        except VoicepoolError as exc:
            caller.outcome = type(exc).__name__
        except asyncio.CancelledError:
            caller.outcome = "cancelled"
            raise

    @property
    def p(self) -> Pool[FakeConn]:
        assert self.pool is not None
        return self.pool

    @property
    def a(self) -> FakeAdapter:
        assert self.adapter is not None
        return self.adapter

    def holding(self) -> list[Caller]:
        return [c for c in self.callers if c.conn is not None and c.task and not c.task.done()]

    def live(self) -> list[Caller]:
        return [c for c in self.callers if c.task is not None and not c.task.done()]

    # -- rules --------------------------------------------------------------------------------

    @initialize(
        mode=st.sampled_from(["exclusive", "reset", "single_use", "multiplexed"]),
        max_size=st.integers(1, 4),
        min_size=st.integers(0, 4),
    )
    def start(self, mode: str, max_size: int, min_size: int) -> None:
        adapter: FakeAdapter = {
            "exclusive": NoResetAdapter,
            "reset": FakeAdapter,
            "single_use": SingleUseAdapter,
            "multiplexed": MuxAdapter,
        }[mode]()
        self.mux = mode == "multiplexed"
        self.adapter = adapter
        cfg = PoolSettings(
            min_size=min(min_size, max_size),
            max_size=max_size,
            max_streams=2 if self.mux else None,
            ping_interval=10,
            ping_timeout=1,
            max_lifetime=60,
            idle_timeout=25,
            failure_threshold=3,
            backoff_initial=1,
            backoff_max=4,
            acquire_timeout=1000,
            alarm_window=30,
        )
        self.pool = Pool(adapter, cfg, name=f"sm-{mode}", clock=lambda: self.now)
        self.loop.run_until_complete(self.pool.start(require_ready=False))

    @rule()
    def acquire(self) -> None:
        caller = Caller()
        caller.task = self.loop.create_task(self._call(caller))
        self.callers.append(caller)
        self.step()

    @precondition(lambda self: bool(self.holding()))
    @rule(data=st.data(), action=st.sampled_from(["ok", "ok", "discard", "error"]))
    def release(self, data: st.DataObject, action: str) -> None:
        caller = data.draw(st.sampled_from(self.holding()))
        caller.action = action
        caller.go.set()
        self.step()

    @precondition(lambda self: bool(self.live()))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        caller = data.draw(st.sampled_from(self.live()))
        assert caller.task is not None
        caller.task.cancel()
        self.step()

    @rule(n=st.integers(1, 4))
    def fail_connects(self, n: int) -> None:
        self.a.fail_next(ConnectionRefusedError("scripted"), n)

    @precondition(lambda self: bool(self.a.open_conns))
    @rule(data=st.data())
    def ping_will_fail(self, data: st.DataObject) -> None:
        conn = data.draw(st.sampled_from(self.a.open_conns))
        self.a.ping_fails.add(conn.id)

    @precondition(lambda self: bool(self.a.open_conns))
    @rule(data=st.data(), notify=st.booleans())
    def peer_closes(self, data: st.DataObject, notify: bool) -> None:
        conn = data.draw(st.sampled_from(self.a.open_conns))
        conn.open = False
        if notify:
            self.on_loop(lambda: self.a.connection_changed(conn))
        self.step()

    @rule(dt=st.sampled_from([0.5, 2.0, 5.0, 11.0, 30.0]))
    def advance_clock(self, dt: float) -> None:
        self.now += dt
        self.maintain()
        self.step()

    # -- invariants ---------------------------------------------------------------------------

    @invariant()
    def bounded(self) -> None:
        if self.pool is None:
            return
        p = self.p
        assert len(p._conns) + p._opening <= p.max_size
        assert p._opening >= 0
        assert p._opening == self.a.in_flight or p._opening > self.a.in_flight  # counted first

    @invariant()
    def accounted(self) -> None:
        if self.pool is None:
            return
        self.step(3)  # let hand-offs resume and background closes run
        p = self.p
        idle_ids = {id(r) for r in p._idle}
        for rec in p._conns.values():
            assert rec.state is not ConnState.CLOSED
            assert (rec.state is ConnState.IDLE) == (id(rec) in idle_ids)
            if self.mux:
                # cap may drop below streams (drain on expiry / GOAWAY): no new stream then.
                assert 0 <= rec.streams <= p.max_streams
                assert 0 <= rec.cap <= p.max_streams
        assert len(idle_ids) == len(p._idle)
        holders = self.holding()
        if self.mux:
            # Holders on a connection the pool retired (peer closed) are no longer counted.
            live = [c for c in holders if c.lease is not None and c.lease._rec in p._conns.values()]
            assert sum(r.streams for r in p._conns.values()) >= len(live)
            for c in holders:
                assert c.lease is not None
                assert c.lease._rec is not None
                assert c.lease._rec.streams >= 1
        else:
            in_use = [r for r in p._conns.values() if r.state is ConnState.IN_USE]
            held = {id(c.conn) for c in holders}
            assert len(held) == len(holders), "a connection is held by two callers"
            assert held <= {id(r.conn) for r in in_use}
        known = {id(r.conn) for r in p._conns.values()}
        for conn in self.a.open_conns:
            # An open connection is in the pool, or is being closed right now.
            assert id(conn) in known or not p._is_open(conn) or p._closers

    @invariant()
    def waiters_are_live_callers(self) -> None:
        if self.pool is None:
            return
        pending = [f for f, _deadline in self.p._waiters if not f.done()]
        assert len(pending) <= len(self.live())

    def teardown(self) -> None:
        try:
            if self.pool is None:
                return
            # Every waiter is eventually served (or failed fast by an open circuit).
            self.a._fail_queue.clear()
            self.a.ping_fails.clear()
            for _ in range(60):
                for caller in self.live():
                    caller.go.set()
                self.now += 5
                self.maintain()
                self.step()
                if not self.live():
                    break
            assert not self.live(), [c.outcome for c in self.callers]
            assert all(c.outcome != "pending" for c in self.callers)
            self.loop.run_until_complete(self.p.aclose(timeout=1))
            assert not self.a.open_conns
            s = self.p.stats()
            assert (s.size, s.opening, s.waiters) == (0, 0, 0)
        finally:
            # Whatever failed above, leave no task behind on the loop we are about to close.
            if self.pool is not None:
                self.loop.run_until_complete(self.p.aclose(timeout=0))
            for caller in self.callers:
                if caller.task is not None and not caller.task.done():
                    caller.task.cancel()
            self.step()
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()


PoolMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.timeout(300)
class TestPoolStateMachine(PoolMachine.TestCase):  # type: ignore[name-defined,misc]
    pass

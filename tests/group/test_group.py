"""PoolGroup with scripted fake adapters: choosing, failover, fail-back, waiting, cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from voicepool import (
    ConfigError,
    GroupPolicy,
    Pool,
    PoolExhausted,
    PoolGroup,
    PoolSettings,
    PoolState,
    PoolUnavailable,
)
from voicepool._engine.observer import PoolObserver
from voicepool.errors import ConnectError
from voicepool.group import (
    GroupObserver,
    add_group_observer_factory,
    remove_group_observer_factory,
)
from voicepool.lease import Lease
from voicepool.testing.fake import (
    FakeAdapter,
    FakeConn,
    FakeMuxAdapter,
    FakeNoResetAdapter,
    FakeSingleUseAdapter,
)


def settings(**kw: object) -> PoolSettings:
    base: dict[str, object] = {
        "concurrency": 4,
        "headroom": 0.0,
        "backoff_initial": 0.01,
        "backoff_max": 0.02,
        "acquire_timeout": 2.0,
        "failure_threshold": 1,
    }
    base.update(kw)
    return PoolSettings.model_validate(base)


class Switches(GroupObserver):
    """Records every switch and lets a test await the next one (no sleeps)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str, bool]] = []
        self.at: list[float] = []  # loop time of each switch in seen
        self.served: list[tuple[str, str, str]] = []
        self.waited: list[tuple[str, float]] = []
        self._event = asyncio.Event()
        self._cursor = 0

    def on_switch(self, group: PoolGroup[Any], old: str, new: str, why: str, back: bool) -> None:
        self.seen.append((old, new, why, back))
        self.at.append(asyncio.get_running_loop().time())
        self._event.set()

    def on_switch_served(self, group: PoolGroup[Any], old: str, new: str, why: str) -> None:
        self.served.append((old, new, why))

    def on_served(self, group: PoolGroup[Any], member: str, waited: float) -> None:
        self.waited.append((member, waited))

    async def next(self, timeout: float = 3.0) -> tuple[str, str, str, bool]:
        """The next switch not returned yet (it may have happened already)."""
        async with asyncio.timeout(timeout):
            while len(self.seen) <= self._cursor:
                self._event.clear()
                await self._event.wait()
        self._cursor += 1
        return self.seen[self._cursor - 1]


@pytest.fixture
def switches() -> Iterator[Switches]:
    rec = Switches()

    def factory(group: PoolGroup[Any]) -> GroupObserver:
        return rec

    add_group_observer_factory(factory)
    yield rec
    remove_group_observer_factory(factory)


async def settle(predicate: Any, turns: int = 1000) -> None:
    """Let the loop run (no clock involved) until ``predicate()`` holds; bounded."""
    for _ in range(turns):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


class StateWatch(PoolObserver):
    """Lets a test await a pool state through the on_state hook (no polling)."""

    def __init__(self, pool: Pool[Any]) -> None:
        self.pool = pool
        self.changed = asyncio.Event()
        pool.add_observer(self)

    def on_state(self, pool: Pool[Any], old: PoolState, new: PoolState) -> None:
        self.changed.set()

    async def reach(self, state: PoolState, timeout: float = 2.0) -> None:
        async with asyncio.timeout(timeout):
            while self.pool.state is not state:
                self.changed.clear()
                await self.changed.wait()


def kill(adapter: FakeAdapter) -> None:
    """The provider goes away: every socket drops and every connect is refused."""
    adapter.fail_all = ConnectError("connection refused")
    for conn in adapter.open_conns:
        conn.open = False
        adapter.connection_changed(conn)


def revive(adapter: FakeAdapter) -> None:
    adapter.fail_all = None


@pytest.fixture
async def pair(
    switches: Switches,
) -> AsyncIterator[tuple[PoolGroup[FakeConn], FakeAdapter, FakeAdapter]]:
    a, b = FakeNoResetAdapter(), FakeNoResetAdapter()
    group = PoolGroup(
        [Pool(a, settings(), name="eu"), Pool(b, settings(), name="us")],
        name="tts",
        failback_after=0.2,
    )
    async with group:
        yield group, a, b


async def test_priority_lends_from_the_first_and_standby_keeps_standby_min(
    pair: tuple[PoolGroup[FakeConn], FakeAdapter, FakeAdapter],
) -> None:
    group, _a, b = pair
    eu, us = group.members
    assert group.active is eu
    assert group.state is PoolState.READY
    assert (eu.stats().size, us.stats().size) == (4, 1)  # the standby warmed only standby_min
    async with group.acquire() as lease:
        assert lease.pool is eu
    leases = [await group.lease() for _ in range(4)]
    assert {lease.pool.name for lease in leases} == {"eu"}
    # eu is exhausted: the standby's warm connection beats waiting (no handshake anywhere).
    extra = await group.lease()
    assert extra.pool is us
    assert b.connects == 1
    for lease in [*leases, extra]:
        await lease.release()


async def test_failover_is_immediate_warm_and_fails_back_after_failback_after(
    pair: tuple[PoolGroup[FakeConn], FakeAdapter, FakeAdapter], switches: Switches
) -> None:
    group, a, b = pair
    eu, us = group.members
    held = await group.lease()  # a lease in use on eu never moves
    kill(a)
    assert await switches.next() == ("eu", "us", "eu unavailable", False)
    connects = b.connects
    async with group.acquire() as lease:  # served at once by the warm standby
        assert lease.pool is us
        assert b.connects == connects  # no handshake for the first call on the standby
    assert switches.served == [("eu", "us", "eu unavailable")]
    assert us.min_size == 4  # the new active grows to its full floor in the background
    assert held.pool is eu
    await held.release()
    revive(a)
    assert await switches.next() == ("us", "eu", "failback", True)
    assert eu.state is PoolState.READY
    assert group.active is eu
    assert (group.failovers, group.failbacks) == (1, 1)
    assert us.min_size == 1
    assert us.stats().size <= 1
    async with group.acquire() as lease:
        assert lease.pool is eu


async def test_every_member_unavailable_fails_at_once_with_each_error(
    pair: tuple[PoolGroup[FakeConn], FakeAdapter, FakeAdapter], switches: Switches
) -> None:
    group, a, b = pair
    kill(a)
    await switches.next()
    kill(b)
    await settle(lambda: group.state is PoolState.UNAVAILABLE)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(PoolUnavailable) as info:
        async with group.acquire():
            pass
    assert loop.time() - t0 < 0.01
    cause = info.value.__cause__
    assert isinstance(cause, ExceptionGroup)
    assert len(cause.exceptions) == 2
    assert all(isinstance(e, ConnectError) for e in cause.exceptions)  # each member's last error


async def test_exhausted_group_waits_on_every_member_fifo_then_times_out(
    switches: Switches,
) -> None:
    a, b = FakeNoResetAdapter(), FakeNoResetAdapter()
    group = PoolGroup(
        [
            Pool(a, settings(concurrency=1), name="p"),
            Pool(b, settings(concurrency=1), name="q"),
        ],
        name="g",
        standby_min=1,
    )
    async with group:
        first, second = await group.lease(), await group.lease()
        assert {first.pool.name, second.pool.name} == {"p", "q"}
        order: list[str] = []

        async def waiter(tag: str) -> None:
            async with group.acquire() as lease:
                order.append(f"{tag}:{lease.pool.name}")

        w1 = asyncio.create_task(waiter("w1"))
        # w1 queues in both members first (FIFO across the group)
        await settle(lambda: all(p.stats().waiters == 1 for p in group.members))
        w2 = asyncio.create_task(waiter("w2"))
        await settle(lambda: all(p.stats().waiters == 2 for p in group.members))
        await second.release()  # q frees first: w1 (queued first everywhere) gets it
        await w1
        await w2  # then w1's release of q serves w2
        assert order == ["w1:q", "w2:q"]
        await first.release()
        assert all(p.stats().waiters == 0 for p in group.members)
        assert {m for m, _ in switches.waited} <= {"p", "q"}
        held = [await group.lease(), await group.lease()]
        with pytest.raises(PoolExhausted):
            await group.lease(timeout=0.05)
        assert all(p.stats().waiters == 0 for p in group.members)
        for lease in held:
            await lease.release()


async def test_cancelled_group_wait_leaves_no_waiter_and_no_leak() -> None:
    a, b = FakeNoResetAdapter(), FakeNoResetAdapter()
    group = PoolGroup(
        [
            Pool(a, settings(concurrency=1), name="p"),
            Pool(b, settings(concurrency=1), name="q"),
        ],
        name="g",
    )
    async with group:
        held = [await group.lease(), await group.lease()]
        task = asyncio.create_task(group.lease())
        await settle(lambda: all(p.stats().waiters == 1 for p in group.members))
        # Both members grant in the same loop iteration, then the caller is cancelled: both
        # grants must come back.
        for lease in held:
            await lease.release()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await settle(lambda: not any(p.stats().in_use for p in group.members))
        assert all(p.stats().waiters == 0 for p in group.members)
        assert all(p.stats().idle == 1 for p in group.members)


async def test_no_flapping_under_a_member_that_goes_up_and_down(switches: Switches) -> None:
    a, b = FakeNoResetAdapter(), FakeNoResetAdapter()
    group = PoolGroup(
        [Pool(a, settings(), name="eu"), Pool(b, settings(), name="us")],
        name="tts",
        failback_after=0.5,
    )
    async with group:
        kill(a)
        await switches.next()
        watch = StateWatch(group.members[0])
        for _ in range(4):  # up for less than failback_after, then down again: bounded loop
            revive(a)
            await watch.reach(PoolState.READY)
            kill(a)
            await watch.reach(PoolState.UNAVAILABLE)
        assert [s[:2] for s in switches.seen] == [("eu", "us")]
        assert group.active.name == "us"


async def test_lowest_rtt_picks_the_nearest_with_hysteresis(switches: Switches) -> None:
    near, far = FakeNoResetAdapter(connect_delay=0.01), FakeNoResetAdapter(connect_delay=0.04)
    group = PoolGroup(
        [Pool(far, settings(), name="far"), Pool(near, settings(), name="near")],
        name="asr",
        policy="lowest_rtt",
        failback_after=0.0,
    )
    async with group:
        assert group.active.name == "near"  # by connect time until pings arrive
        far_pool, near_pool = group.members
        assert (far_pool.min_size, near_pool.min_size) == (1, 4)
        member = next(m for m in group._members if m.name == "far")
        nearm = next(m for m in group._members if m.name == "near")
        nearm.rtt, member.rtt = 0.020, 0.019  # 1 ms better: inside the hysteresis, no switch
        group._reselect()
        assert group.active.name == "near"
        member.rtt = 0.005  # clearly better: switch
        group._reselect()
        assert group.active.name == "far"
        assert switches.seen[-1][2] == "lower_rtt"


def test_validation_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"groups\.g\.members: .*not compatible"):
        PoolGroup(
            [
                Pool(FakeNoResetAdapter(), settings(), name="a"),
                Pool(FakeMuxAdapter(), settings(), name="b"),
            ],
            name="g",
        )
    p = Pool(FakeNoResetAdapter(), settings(), name="a")
    with pytest.raises(ConfigError, match=r"groups\.g\.members: a pool is listed twice"):
        PoolGroup([p, p], name="g")
    with pytest.raises(ConfigError, match=r"groups\.g\.policy"):
        PoolGroup([p], name="g", policy="fastest")
    with pytest.raises(ConfigError, match=r"groups\.g\.members"):
        PoolGroup([], name="g")
    assert GroupPolicy("lowest_rtt") is GroupPolicy.LOWEST_RTT


async def test_set_min_size_grows_and_shrinks_without_touching_leases() -> None:
    adapter = FakeAdapter()
    async with Pool(adapter, settings(min_size=1), name="p") as pool:
        pool.set_min_size(3)
        await settle(lambda: pool.stats().size == 3)
        async with pool.acquire():
            pool.set_min_size(0)
            assert pool.stats().size == 1  # the idle ones went, the lease stayed
        with pytest.raises(ValueError):
            pool.set_min_size(99)


async def test_a_member_that_lost_a_connection_is_suspect_until_it_connects_again() -> None:
    a, b = FakeNoResetAdapter(), FakeNoResetAdapter()
    lenient = settings(failure_threshold=5)  # one early loss must not open eu's circuit here
    group = PoolGroup(
        [Pool(a, lenient, name="eu"), Pool(b, lenient, name="us")], name="tts", failback_after=0.2
    )
    async with group:
        await _suspect_scenario(group, a)


async def _suspect_scenario(group: PoolGroup[FakeConn], a: FakeAdapter) -> None:
    eu, us = group.members
    gate = asyncio.Event()
    a.gate = gate  # hold eu's refill in flight: it stays suspect meanwhile
    dead = a.open_conns[0]
    dead.open = False
    a.connection_changed(dead)  # one socket lost: its neighbours may be dead too
    assert eu.state is not PoolState.UNAVAILABLE  # not a failover: eu still lends
    first = await group.lease()
    assert first.pool is us  # a free connection elsewhere beats a suspect's idle one
    second = await group.lease()
    assert second.pool is eu  # nothing free elsewhere: the suspect's idle one is lent
    await first.release()
    await second.release()
    gate.set()  # the refill succeeds: eu proved itself
    await settle(lambda: eu.stats().size == 4)
    async with group.acquire() as lease:
        assert lease.pool is eu


async def test_a_leased_connection_lost_makes_its_member_suspect_at_once() -> None:
    """A crash reaches the sockets in use first when most are in use: the first of them to drop
    sends new leases to the other member's free connections, before any idle socket is lent."""
    a, b = FakeNoResetAdapter(), FakeNoResetAdapter()
    lenient = settings(failure_threshold=5)
    group = PoolGroup(
        [Pool(a, lenient, name="eu"), Pool(b, lenient, name="us")], name="tts", failback_after=60
    )
    async with group:
        eu, us = group.members
        held = await group.lease()
        assert held.pool is eu
        a.gate = asyncio.Event()  # no connect of eu's succeeds meanwhile (none would prove it)
        a.kill(held.conn)  # the peer dropped a socket in use; eu's idle ones look open
        assert eu.stats().idle == 3
        lease = await group.lease()
        assert lease.pool is us  # not one of eu's (perhaps dead) idle sockets
        await lease.release()
        await held.release()
        a.gate.set()


async def test_a_single_use_connection_closed_in_use_is_no_news() -> None:
    """SINGLE_USE sockets end with their call (the server answers the end of the stream with a
    close): that keeps the member trusted."""
    a, b = FakeSingleUseAdapter(), FakeSingleUseAdapter()
    group = PoolGroup(
        [Pool(a, settings(min_size=2), name="eu"), Pool(b, settings(), name="us")],
        name="asr",
        failback_after=60,
    )
    async with group:
        eu, _us = group.members
        held = await group.lease()
        assert held.pool is eu
        a.kill(held.conn)  # the stream's normal end
        lease = await group.lease()
        assert lease.pool is eu
        await lease.release()
        await held.release()


async def test_round_trips_that_cross_back_and_forth_switch_once_per_failback_after(
    switches: Switches,
) -> None:
    now = [100.0]
    a, b = FakeNoResetAdapter(), FakeNoResetAdapter()
    group = PoolGroup(
        [Pool(a, settings(), name="a"), Pool(b, settings(), name="b")],
        name="asr",
        policy="lowest_rtt",
        failback_after=5.0,
        clock=lambda: now[0],
    )
    async with group:
        ma, mb = group._members
        ma.ready_since = mb.ready_since = now[0] - 60  # both READY for long
        ma.rtt, mb.rtt = 0.020, 0.060
        group._reselect()
        assert group.active.name == "a"  # (perhaps a switch: boot ranked them by connect time)
        now[0] += 10
        seen = len(switches.seen)
        ma.rtt = 0.200  # a's pings slow down: b is clearly better, and READY for long
        group._reselect()
        assert group.active.name == "b"
        ma.rtt = 0.020  # and back: a is better again, but b took over just now
        now[0] += 4.9
        group._reselect()
        assert group.active.name == "b"
        now[0] += 0.2  # failback_after since the last switch
        group._reselect()
        assert group.active.name == "a"
        assert [s[:3] for s in switches.seen[seen:]] == [
            ("a", "b", "lower_rtt"),
            ("b", "a", "lower_rtt"),
        ]


def enter_without_suspending(group: PoolGroup[FakeConn]) -> tuple[Any, Lease[FakeConn]]:
    """Enter ``group.acquire()`` by driving its ``__aenter__`` one step by hand: a hit must
    complete in that step (StopIteration), never yield to the event loop: a yield would let
    every other call's callbacks run inside this call's acquire. Returns (acquire, lease)."""
    acquire = group.acquire()
    step = acquire.__aenter__()
    try:
        step.send(None)
    except StopIteration as done:
        return acquire, done.value
    step.close()  # (gives its place in line back)
    raise AssertionError("group.acquire() suspended although a connection was free")


async def test_an_acquire_that_finds_a_connection_free_never_suspends(
    pair: tuple[PoolGroup[FakeConn], FakeAdapter, FakeAdapter], switches: Switches
) -> None:
    group, a, b = pair
    eu, us = group.members
    acquire, lease = enter_without_suspending(group)  # the active member's idle connection
    assert lease.pool is eu
    await acquire.__aexit__(None, None, None)
    held = [await group.lease() for _ in range(4)]  # eu has nothing free: the standby's spare
    acquire, lease = enter_without_suspending(group)
    assert lease.pool is us
    await acquire.__aexit__(None, None, None)
    for h in held:
        await h.release()
    kill(a)
    assert await switches.next() == ("eu", "us", "eu unavailable", False)
    connects = b.connects
    # The first call after the failover (its switch announced to the observers in the same
    # step) and the next ones, while the standby grows: all without suspending.
    acquire, lease = enter_without_suspending(group)
    assert lease.pool is us
    assert b.connects == connects
    assert switches.served == [("eu", "us", "eu unavailable")]
    await settle(lambda: us.stats().idle >= 2)
    second, lease2 = enter_without_suspending(group)
    assert lease2.pool is us
    await acquire.__aexit__(None, None, None)
    await second.__aexit__(None, None, None)

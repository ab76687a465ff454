"""Cancellation at every await of acquire, connect, reset, release, start and close.

After each scenario the pool must be clean: no waiter left, no slot counted for a connect that
is not running, nothing leased, every open connection known to the pool, nothing held twice.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from voicepool import Pool, PoolClosed, PoolSettings, PoolState
from voicepool.testing import FakeAdapter, FakeConn, wait_until
from voicepool.testing import FakeMuxAdapter as MuxAdapter
from voicepool.testing import FakeNoResetAdapter as NoResetAdapter


def settings(**kw: Any) -> PoolSettings:
    base: dict[str, Any] = {
        "concurrency": 2,
        "headroom": 0.0,
        "backoff_initial": 0.01,
        "backoff_max": 0.02,
        "acquire_timeout": 5.0,
    }
    base.update(kw)
    return PoolSettings.model_validate(base)


async def settle(pool: Pool[Any], adapter: FakeAdapter) -> None:
    """Until nothing is in flight and every connection the adapter has open is in the pool."""

    def quiet() -> bool:
        s = pool.stats()
        return (
            s.opening == 0
            and s.in_use == 0
            and s.waiters == 0
            and len(adapter.open_conns) == s.size
        )

    await wait_until(quiet, timeout=2, what="a settled pool")


async def assert_clean(pool: Pool[FakeConn], adapter: FakeAdapter) -> None:
    await settle(pool, adapter)
    s = pool.stats()
    assert s.waiters == 0, s
    assert s.opening == 0, s
    assert s.in_use == 0, s
    assert s.streams_in_use == 0, s
    assert s.size <= s.max_size
    # Every connection the adapter has open is one the pool counts (none lost, none leaked).
    assert len(adapter.open_conns) == s.size, (adapter.open_conns, s)
    assert all(c.holders == 0 for c in adapter.conns)
    # And the pool still works.
    async with pool.acquire(timeout=2) as lease:
        assert lease.conn.open


async def cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_cancel_while_waiting() -> None:
    adapter = NoResetAdapter()
    pool = Pool(adapter, settings(min_size=1, max_size=1), name="t")
    await pool.start()
    async with pool.acquire():
        waiter = asyncio.create_task(pool.acquire().__aenter__())
        await wait_until(lambda: pool.stats().waiters == 1)
        await cancel(waiter)
        assert pool.stats().waiters == 0
    await assert_clean(pool, adapter)
    await pool.aclose()


async def test_cancel_while_connecting() -> None:
    adapter = NoResetAdapter()
    pool = Pool(adapter, settings(min_size=0, max_size=2), name="t")
    await pool.start()
    adapter.gate = asyncio.Event()

    async def use() -> None:
        async with pool.acquire():
            pass

    task = asyncio.create_task(use())
    await wait_until(lambda: adapter.in_flight == 1)
    assert pool.stats().opening == 1
    await cancel(task)
    adapter.gate.set()  # the connect completes after its caller is gone: it becomes idle
    await settle(pool, adapter)
    assert pool.stats().idle == 1
    await assert_clean(pool, adapter)
    await pool.aclose()


async def test_cancel_while_resetting() -> None:
    adapter = FakeAdapter()
    adapter.reset_delay = 1.0
    adapter.reset_started = asyncio.Event()
    pool = Pool(adapter, settings(min_size=1, max_size=1), name="t")
    await pool.start()
    first: list[FakeConn] = []

    async def use() -> None:
        async with pool.acquire() as lease:
            first.append(lease.conn)

    task = asyncio.create_task(use())
    await adapter.reset_started.wait()  # now inside reset()
    assert first
    assert first[0].resets == 1
    await cancel(task)
    adapter.reset_delay = 0
    await settle(pool, adapter)
    assert first[0].closed  # state unknown after a cancelled reset: discarded, replaced
    assert pool.stats().closed.get("error") == 1
    await assert_clean(pool, adapter)
    await pool.aclose()


async def test_cancel_while_releasing_a_stream() -> None:
    adapter = MuxAdapter()
    adapter.release_delay = 1.0
    adapter.release_started = asyncio.Event()
    pool = Pool(adapter, settings(min_size=1, max_size=1, max_streams=2), name="t")
    await pool.start()

    async def use() -> None:
        async with pool.acquire():
            pass

    task = asyncio.create_task(use())
    await adapter.release_started.wait()  # inside release_stream()
    assert pool.stats().streams_in_use == 1
    await cancel(task)
    adapter.release_delay = 0
    assert pool.stats().streams_in_use == 0
    assert not adapter.conns[0].closed  # the shared connection survives
    await assert_clean(pool, adapter)
    await pool.aclose()


async def test_cancel_after_assigned_before_resumed() -> None:
    """The waiter's future holds a connection, then the task is cancelled before it runs."""
    adapter = NoResetAdapter()
    pool = Pool(adapter, settings(min_size=1, max_size=1), name="t")
    await pool.start()
    lease = pool.acquire()
    await lease.__aenter__()
    waiter = asyncio.create_task(pool.acquire().__aenter__())
    second = asyncio.create_task(pool.acquire().__aenter__())
    await wait_until(lambda: pool.stats().waiters == 2)
    await lease.__aexit__(None, None, None)  # hands the connection to `waiter`, synchronously
    await cancel(waiter)  # ... which never resumes to take it
    got = await asyncio.wait_for(second, 1)  # it was passed on to the next waiter, FIFO
    await got.__aexit__(None, None, None)
    await assert_clean(pool, adapter)
    await pool.aclose()


async def test_timeout_racing_a_hand_off() -> None:
    adapter = NoResetAdapter()
    pool = Pool(adapter, settings(min_size=1, max_size=1), name="t")
    await pool.start()
    for delay in (0.0, 0.001, 0.002, 0.005):
        lease = pool.acquire()
        await lease.__aenter__()
        waiter = asyncio.create_task(pool.acquire(timeout=0.005).__aenter__())
        await asyncio.sleep(delay)
        await lease.__aexit__(None, None, None)
        try:
            got = await waiter
        except TimeoutError:
            pass
        else:
            await got.__aexit__(None, None, None)
    await assert_clean(pool, adapter)
    await pool.aclose()


async def test_cancel_between_slot_counted_and_connected() -> None:
    """Connect tasks cancelled (the pool closes) before one of them even ran free their slots."""
    adapter = NoResetAdapter()
    pool = Pool(adapter, settings(min_size=0, max_size=3), name="t")
    await pool.start()
    adapter.gate = asyncio.Event()
    waiters = [asyncio.create_task(pool.acquire().__aenter__()) for _ in range(2)]
    await asyncio.sleep(0)  # both queued; their connects are created but have not run yet
    assert pool.stats().opening == 2
    assert adapter.in_flight == 0
    await pool.aclose(timeout=0)  # cancels both connect tasks before their first step
    for w in waiters:
        with pytest.raises(PoolClosed):
            await w
    s = pool.stats()
    assert (s.opening, s.size, s.waiters) == (0, 0, 0)
    assert not adapter.open_conns


async def test_cancel_while_connecting_in_flight_on_close() -> None:
    """A connect suspended inside adapter.connect() when the pool closes frees its slot."""
    adapter = NoResetAdapter()
    pool = Pool(adapter, settings(min_size=0, max_size=3), name="t")
    await pool.start()
    adapter.gate = asyncio.Event()
    task = asyncio.create_task(pool.acquire().__aenter__())
    await wait_until(lambda: adapter.in_flight == 1)
    await pool.aclose(timeout=0)
    with pytest.raises(PoolClosed):
        await task
    assert pool.stats().opening == 0
    assert not adapter.open_conns


async def test_cancel_during_start_closes_what_was_opened() -> None:
    adapter = FakeAdapter(connect_delay=0.05)
    pool = Pool(adapter, settings(min_size=4, max_size=4, connect_concurrency=2), name="t")
    task = asyncio.create_task(pool.start())
    await wait_until(lambda: adapter.connects == 2 and adapter.in_flight == 2)  # one wave open
    await cancel(task)
    await wait_until(lambda: not adapter.open_conns)
    s = pool.stats()
    assert (s.size, s.opening, s.state) == (0, 0, PoolState.CLOSED)


async def test_cancel_during_aclose_finishes_in_background() -> None:
    adapter = NoResetAdapter()
    pool = Pool(adapter, settings(min_size=2, max_size=2), name="t")
    await pool.start()
    gate = asyncio.Event()

    async def holder() -> None:
        async with pool.acquire():
            await gate.wait()

    h = asyncio.create_task(holder())
    await wait_until(lambda: pool.stats().in_use == 1)
    closing = asyncio.create_task(pool.aclose(timeout=5))
    await wait_until(lambda: pool.stats().state is PoolState.CLOSING)
    await cancel(closing)
    gate.set()
    await h
    await pool.aclose()  # awaits the same close
    assert pool.stats().state is PoolState.CLOSED
    assert not adapter.open_conns
    with pytest.raises(PoolClosed):
        async with pool.acquire():
            pass


async def test_cancel_inside_block_discards_exclusive_connection() -> None:
    adapter = NoResetAdapter()
    pool = Pool(adapter, settings(min_size=1, max_size=1), name="t")
    await pool.start()
    seen: list[FakeConn] = []
    inside = asyncio.Event()

    async def use() -> None:
        async with pool.acquire() as lease:
            seen.append(lease.conn)
            inside.set()
            await asyncio.Event().wait()  # held until cancelled

    task = asyncio.create_task(use())
    await inside.wait()
    await cancel(task)  # barge-in mid-use: the connection's state is unknown
    await settle(pool, adapter)
    assert seen[0].closed
    await assert_clean(pool, adapter)
    await pool.aclose()


async def test_cancel_inside_block_keeps_multiplexed_connection() -> None:
    adapter = MuxAdapter()
    pool = Pool(adapter, settings(min_size=1, max_size=1, max_streams=2), name="t")
    await pool.start()

    inside = asyncio.Event()

    async def use() -> None:
        async with pool.acquire():
            inside.set()
            await asyncio.Event().wait()  # held until cancelled

    task = asyncio.create_task(use())
    await inside.wait()
    await cancel(task)
    assert isinstance(adapter.released[-1][2], asyncio.CancelledError)
    assert not adapter.conns[0].closed
    await assert_clean(pool, adapter)
    await pool.aclose()


async def test_cancel_waiters_in_bulk_under_load() -> None:
    adapter = NoResetAdapter(connect_delay=0.002)
    pool = Pool(adapter, settings(min_size=1, max_size=4), name="t")
    await pool.start()

    async def use(i: int) -> None:
        async with pool.acquire() as lease:
            lease.conn.holders += 1
            try:
                assert lease.conn.holders == 1, "a connection held twice"
                await asyncio.sleep(0.001 * (i % 3))
            finally:
                # (in finally: a holder cancelled in its sleep must not stay counted; that
                # skipped decrement was this test's flake, not the pool's)
                lease.conn.holders -= 1

    for _round in range(5):
        tasks = [asyncio.create_task(use(i)) for i in range(40)]
        await wait_until(lambda: pool.stats().waiters > 0)  # contended
        for t in tasks[::3]:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    await assert_clean(pool, adapter)
    await pool.aclose()


async def test_cancel_lease_api_waiting_and_release() -> None:
    """``await pool.lease()`` cancelled while queued, and ``lease.release()`` cancelled in reset."""
    adapter = FakeAdapter()
    adapter.reset_started = asyncio.Event()
    pool = Pool(adapter, settings(min_size=1, max_size=1), name="t")
    await pool.start()
    lease = await pool.lease()
    waiting = asyncio.create_task(pool.lease())
    await wait_until(lambda: pool.stats().waiters == 1)
    await cancel(waiting)
    assert pool.stats().waiters == 0
    adapter.reset_delay = 1.0
    releasing = asyncio.create_task(lease.release())
    await adapter.reset_started.wait()
    await cancel(releasing)  # a cancelled reset discards the connection
    adapter.reset_delay = 0
    await assert_clean(pool, adapter)
    await lease.release()  # a second release does nothing
    await pool.aclose()


async def test_cancel_during_ping_on_close() -> None:
    """A ping in flight when the pool closes: cancelled, its connection closed, nothing leaked."""
    adapter = NoResetAdapter()
    adapter.ping_delay = 10.0  # (ping_timeout is 1 s: the close cancels it first)
    now = [0.0]
    cfg = settings(min_size=1, max_size=1, ping_interval=1, ping_timeout=1)
    pool = Pool(adapter, cfg, name="t", clock=lambda: now[0])
    await pool.start()
    now[0] = 5.0  # the ping is due
    pool.maintain()
    await wait_until(lambda: adapter.conns[0].pings == 1)
    await pool.aclose(timeout=1)
    assert not adapter.open_conns
    s = pool.stats()
    assert (s.size, s.opening) == (0, 0)

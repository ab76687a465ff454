"""Cancellation at every await of acquire, connect, reset, release, start and close.

After each scenario the pool must be clean: no waiter left, no slot counted for a connect that
is not running, nothing leased, every open connection known to the pool, nothing held twice.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from voicepool import Pool, PoolClosed, PoolSettings, PoolState

from .fakes import FakeAdapter, FakeConn, MuxAdapter, NoResetAdapter


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


async def settle(pool: Pool[Any]) -> None:
    for _ in range(200):
        s = pool.stats()
        if s.opening == 0 and s.in_use == 0 and s.waiters == 0 and not pool._closers:
            return
        await asyncio.sleep(0.005)


async def assert_clean(pool: Pool[FakeConn], adapter: FakeAdapter) -> None:
    await settle(pool)
    s = pool.stats()
    assert s.waiters == 0, s
    assert s.opening == 0, s
    assert s.in_use == 0, s
    assert s.streams_in_use == 0, s
    assert s.size <= s.max_size
    known = {id(r.conn) for r in pool._conns.values()}
    for conn in adapter.open_conns:
        assert id(conn) in known, f"{conn} is open but the pool lost it"
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
        await asyncio.sleep(0.01)
        assert pool.stats().waiters == 1
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
    await asyncio.sleep(0.01)
    assert pool.stats().opening == 1
    await cancel(task)
    adapter.gate.set()  # the connect completes after its caller is gone: it becomes idle
    await settle(pool)
    assert pool.stats().idle == 1
    await assert_clean(pool, adapter)
    await pool.aclose()


async def test_cancel_while_resetting() -> None:
    adapter = FakeAdapter()
    adapter.reset_delay = 1.0
    pool = Pool(adapter, settings(min_size=1, max_size=1), name="t")
    await pool.start()
    first: list[FakeConn] = []

    async def use() -> None:
        async with pool.acquire() as lease:
            first.append(lease.conn)

    task = asyncio.create_task(use())
    await asyncio.sleep(0.02)  # now inside reset()
    assert first
    assert first[0].resets == 1
    await cancel(task)
    adapter.reset_delay = 0
    await settle(pool)
    assert first[0].closed  # state unknown after a cancelled reset: discarded, replaced
    assert pool.stats().closed.get("error") == 1
    await assert_clean(pool, adapter)
    await pool.aclose()


async def test_cancel_while_releasing_a_stream() -> None:
    adapter = MuxAdapter()
    adapter.release_delay = 1.0
    pool = Pool(adapter, settings(min_size=1, max_size=1, max_streams=2), name="t")
    await pool.start()

    async def use() -> None:
        async with pool.acquire():
            pass

    task = asyncio.create_task(use())
    await asyncio.sleep(0.02)  # inside release_stream()
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
    await asyncio.sleep(0.01)
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
    """A connect task cancelled before it even ran must still free its slot."""
    adapter = NoResetAdapter()
    pool = Pool(adapter, settings(min_size=0, max_size=3), name="t")
    await pool.start()
    adapter.gate = asyncio.Event()
    pool._spawn_connect()
    pool._spawn_connect()
    assert pool.stats().opening == 2
    for task in list(pool._work):
        task.cancel()  # one has not started yet
    await asyncio.sleep(0.01)
    assert pool.stats().opening == 0
    adapter.gate.set()
    await assert_clean(pool, adapter)
    await pool.aclose()


async def test_cancel_during_start_closes_what_was_opened() -> None:
    adapter = FakeAdapter(connect_delay=0.05)
    pool = Pool(adapter, settings(min_size=4, max_size=4, connect_concurrency=2), name="t")
    task = asyncio.create_task(pool.start())
    await asyncio.sleep(0.07)  # two opened, two connecting
    await cancel(task)
    await asyncio.sleep(0.01)
    assert not adapter.open_conns
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
    await asyncio.sleep(0)
    closing = asyncio.create_task(pool.aclose(timeout=5))
    await asyncio.sleep(0.01)
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

    async def use() -> None:
        async with pool.acquire() as lease:
            seen.append(lease.conn)
            await asyncio.sleep(1)

    task = asyncio.create_task(use())
    await asyncio.sleep(0.01)
    await cancel(task)  # barge-in mid-use: the connection's state is unknown
    await settle(pool)
    assert seen[0].closed
    await assert_clean(pool, adapter)
    await pool.aclose()


async def test_cancel_inside_block_keeps_multiplexed_connection() -> None:
    adapter = MuxAdapter()
    pool = Pool(adapter, settings(min_size=1, max_size=1, max_streams=2), name="t")
    await pool.start()

    async def use() -> None:
        async with pool.acquire():
            await asyncio.sleep(1)

    task = asyncio.create_task(use())
    await asyncio.sleep(0.01)
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
            assert lease.conn.holders == 1
            await asyncio.sleep(0.001 * (i % 3))
            lease.conn.holders -= 1

    for _round in range(5):
        tasks = [asyncio.create_task(use(i)) for i in range(40)]
        await asyncio.sleep(0.003)
        for t in tasks[::3]:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    await assert_clean(pool, adapter)
    await pool.aclose()

"""Engine behaviour with scripted fake adapters (no sockets)."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time

import pytest

from voicepool import (
    LeaseReleased,
    Pool,
    PoolClosed,
    PoolExhausted,
    PoolSettings,
    PoolState,
    PoolUnavailable,
)
from voicepool.errors import ConnectError, PoolError
from voicepool.testing import FakeAdapter, FakeConn, wait_until
from voicepool.testing import FakeMuxAdapter as MuxAdapter
from voicepool.testing import FakeNoResetAdapter as NoResetAdapter
from voicepool.testing import FakeSingleUseAdapter as SingleUseAdapter
from voicepool.testing.fake import fatal_error


def settings(**kw: object) -> PoolSettings:
    base: dict[str, object] = {
        "concurrency": 4,
        "headroom": 0.0,
        "backoff_initial": 0.01,
        "backoff_max": 0.05,
        "acquire_timeout": 2.0,
    }
    base.update(kw)
    return PoolSettings.model_validate(base)


async def hold(pool: Pool[FakeConn], seconds: float) -> int:
    async with pool.acquire() as lease:
        conn = lease.conn
        conn.holders += 1
        assert conn.holders == 1, "connection held twice"
        await asyncio.sleep(seconds)
        conn.holders -= 1
        return conn.id


async def test_warm_start_and_clean_close() -> None:
    adapter = FakeAdapter()
    async with Pool(adapter, settings(), name="t") as pool:
        s = pool.stats()
        assert (s.size, s.idle, s.in_use, s.state) == (4, 4, 0, PoolState.READY)
    assert pool.stats().state is PoolState.CLOSED
    assert len(adapter.closed_ids) == 4
    assert not adapter.open_conns


async def test_fast_path_performs_no_io() -> None:
    adapter = NoResetAdapter()
    async with Pool(adapter, settings(), name="t") as pool:
        before = adapter.io_calls
        lease = pool.acquire()
        enter = lease.__aenter__()
        # The fast path completes without suspending: no await on I/O, no loop round trip.
        with pytest.raises(StopIteration):
            enter.send(None)
        exit_ = lease.__aexit__(None, None, None)
        # ... and the release completes in __aexit__ itself (the connection is idle before
        # anything awaits what it returns): that has nothing left to run, and returns at once.
        assert inspect.getgeneratorstate(exit_) == inspect.GEN_CLOSED  # type: ignore[arg-type]
        with pytest.raises(StopIteration):
            exit_.send(None)
        assert adapter.io_calls == before
        assert pool.stats().idle == 4


async def test_lease_use_after_release_raises() -> None:
    async with Pool(FakeAdapter(), settings(), name="t") as pool:
        async with pool.acquire() as lease:
            assert lease.conn.id >= 1
        with pytest.raises(LeaseReleased):
            _ = lease.conn
        with pytest.raises(LeaseReleased):
            lease.discard()
        with pytest.raises(RuntimeError):
            async with lease:
                pass


async def test_max_size_never_exceeded_under_races() -> None:
    adapter = FakeAdapter(connect_delay=0.005)
    pool = Pool(adapter, settings(min_size=0, max_size=5, connect_concurrency=50), name="t")
    await pool.start()
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            s = pool.stats()
            peak = max(peak, s.size + s.opening)
            assert s.size + s.opening <= 5
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    ids = await asyncio.gather(*(hold(pool, 0.001 * (i % 4)) for i in range(200)))
    watcher.cancel()
    assert len(ids) == 200
    assert adapter.connects <= 5
    assert peak <= 5
    assert adapter.max_in_flight <= 5
    await pool.aclose()


async def test_waiters_served_fifo() -> None:
    pool = Pool(NoResetAdapter(), settings(min_size=1, max_size=1), name="t")
    await pool.start()
    order: list[int] = []
    gate = asyncio.Event()

    async def first() -> None:
        async with pool.acquire():
            await gate.wait()

    async def waiter(i: int) -> None:
        async with pool.acquire():
            order.append(i)
            await asyncio.sleep(0)

    holder = asyncio.create_task(first())
    await asyncio.sleep(0)
    tasks = []
    for i in range(10):
        tasks.append(asyncio.create_task(waiter(i)))
        await asyncio.sleep(0)
    assert pool.stats().waiters == 10
    gate.set()
    await asyncio.gather(holder, *tasks)
    assert order == list(range(10))
    assert pool.stats().exhausted == 10
    await pool.aclose()


async def test_timeout_raises_pool_exhausted_with_counts_and_cause() -> None:
    adapter = NoResetAdapter()
    pool = Pool(adapter, settings(min_size=1, max_size=2, failure_threshold=100), name="asr")
    await pool.start()
    adapter.fail_all = ConnectionRefusedError("refused by test")
    async with pool.acquire():
        t0 = time.monotonic()
        with pytest.raises(PoolExhausted) as info:
            async with pool.acquire(timeout=0.2):
                pass
        assert 0.15 < time.monotonic() - t0 < 1.5
    err = info.value
    assert isinstance(err, TimeoutError)
    assert "size=1/2" in str(err)
    assert "in_use=1" in str(err)
    assert "waiters=1" in str(err)
    assert isinstance(err.__cause__, ConnectError)
    assert "refused by test" in str(err.__cause__)
    assert pool.stats().timeouts == 1
    assert pool.stats().waiters == 0
    await pool.aclose()


async def test_release_during_failing_connects_serves_the_waiter() -> None:
    adapter = NoResetAdapter(connect_delay=0.01)
    pool = Pool(adapter, settings(min_size=1, max_size=2, failure_threshold=1000), name="t")
    await pool.start()
    adapter.fail_all = ConnectionResetError("provider flapping")
    gate = asyncio.Event()

    async def holder() -> None:
        async with pool.acquire():
            await gate.wait()

    h = asyncio.create_task(holder())
    await asyncio.sleep(0)
    w = asyncio.create_task(hold(pool, 0))
    await wait_until(lambda: adapter.connect_attempts >= 3)  # the pool keeps trying and failing
    assert not w.done()
    gate.set()
    assert await asyncio.wait_for(w, 1.0) == 1
    await h
    await pool.aclose()


async def test_open_circuit_fails_fast_and_recovers() -> None:
    adapter = NoResetAdapter()
    pool = Pool(adapter, settings(min_size=1, max_size=1, failure_threshold=3), name="llm")
    await pool.start()
    adapter.fail_all = ConnectionRefusedError("down")
    (conn,) = adapter.open_conns
    adapter.kill(conn)  # the provider dropped us
    await wait_until(lambda: pool.stats().state is PoolState.UNAVAILABLE)
    assert pool.stats().connect_failures >= 3
    t0 = time.perf_counter()
    with pytest.raises(PoolUnavailable) as info:
        async with pool.acquire():
            pass
    assert time.perf_counter() - t0 < 0.010
    assert isinstance(info.value.__cause__, ConnectError)
    adapter.fail_all = None  # provider back: the background probe closes the circuit
    await wait_until(lambda: pool.stats().state is PoolState.READY, timeout=3)
    assert await hold(pool, 0) >= 2
    await pool.aclose()


async def test_fatal_error_opens_circuit_at_once() -> None:
    adapter = NoResetAdapter()
    adapter.fail_all = fatal_error()
    pool = Pool(adapter, settings(min_size=2, failure_threshold=50), name="tts")
    with pytest.raises(PoolUnavailable) as info:
        await pool.start()
    assert "401" in str(info.value)
    assert isinstance(info.value.__cause__, ConnectError)
    assert pool.stats().state is PoolState.CLOSED

    pool2 = Pool(adapter, settings(min_size=2, failure_threshold=50), name="tts2")
    await pool2.start(require_ready=False)
    assert pool2.stats().state is PoolState.UNAVAILABLE
    # A fatal error does not cause a retry storm: one probe at a time, with backoff.
    attempts = adapter.connect_attempts
    await asyncio.sleep(0.1)
    assert adapter.connect_attempts - attempts <= 10
    await pool2.aclose()


async def test_start_without_require_ready_recovers_in_background() -> None:
    adapter = NoResetAdapter()
    adapter.fail_all = ConnectionRefusedError("not yet")
    pool = Pool(adapter, settings(min_size=2, failure_threshold=2), name="t")
    await pool.start(require_ready=False)
    assert pool.stats().size == 0
    adapter.fail_all = None
    await wait_until(lambda: pool.stats().size == 2, timeout=3)
    assert pool.stats().state is PoolState.READY
    await pool.aclose()


async def test_ping_replaces_dead_idle_connection_before_acquire() -> None:
    adapter = NoResetAdapter()
    pool = Pool(
        adapter, settings(min_size=2, max_size=2, ping_interval=0.05, ping_timeout=0.05), name="t"
    )
    await pool.start()
    victim = adapter.open_conns[0]
    adapter.ping_fails.add(victim.id)
    await wait_until(lambda: victim.closed)
    await wait_until(lambda: len(adapter.open_conns) == 2)
    assert pool.stats().closed.get("ping_failed") == 1
    for _ in range(5):
        async with pool.acquire() as lease:
            assert lease.conn is not victim
    await pool.aclose()


async def test_ping_timeout_counts_as_failure() -> None:
    adapter = NoResetAdapter()
    adapter.ping_delay = 1.0  # a black-holed peer never answers
    pool = Pool(
        adapter, settings(min_size=1, max_size=1, ping_interval=0.05, ping_timeout=0.05), name="t"
    )
    await pool.start()
    first = adapter.open_conns[0]
    await wait_until(lambda: first.closed, timeout=2)
    assert pool.stats().closed.get("ping_failed", 0) >= 1
    await pool.aclose()


async def test_pings_never_touch_a_leased_connection() -> None:
    adapter = NoResetAdapter()  # its ping asserts holders == 0
    pool = Pool(
        adapter, settings(min_size=2, max_size=2, ping_interval=0.02, ping_timeout=0.02), name="t"
    )
    await pool.start()
    async with pool.acquire() as lease:
        lease.conn.holders += 1
        held = lease.conn.pings
        await asyncio.sleep(0.2)
        assert lease.conn.pings == held
        lease.conn.holders -= 1
    assert sum(c.pings for c in adapter.conns) >= 3
    await pool.aclose()


async def test_max_idle_shrinks_ping_interval() -> None:
    class ShortIdle(NoResetAdapter):
        max_idle = 0.1

    adapter = ShortIdle()
    pool = Pool(
        adapter, settings(min_size=1, max_size=1, ping_interval=30, ping_timeout=0.04), name="t"
    )
    await pool.start()
    await asyncio.sleep(0.3)
    assert adapter.conns[0].pings >= 3  # every ~50 ms, well under the 100 ms idle close
    await pool.aclose()


async def test_lifetime_retirement_only_while_idle_with_jitter() -> None:
    adapter = NoResetAdapter()
    pool = Pool(adapter, settings(min_size=3, max_size=3, max_lifetime=0.15), name="t")
    await pool.start()
    async with pool.acquire() as lease:
        held = lease.conn
        await asyncio.sleep(0.3)
        assert not held.closed  # never retired while leased
    await wait_until(lambda: held.closed)  # ... but at release, since it expired
    assert pool.stats().closed.get("expired", 0) >= 3
    await wait_until(lambda: len(adapter.open_conns) == 3)
    await pool.aclose()


async def test_idle_timeout_only_above_min_size() -> None:
    adapter = NoResetAdapter()
    pool = Pool(adapter, settings(min_size=1, max_size=4, idle_timeout=0.1), name="t")
    await pool.start()
    await asyncio.gather(*(hold(pool, 0.02) for _ in range(4)))
    assert pool.stats().size == 4
    await wait_until(lambda: pool.stats().size == 1, timeout=2)
    assert pool.stats().closed.get("idle") == 3
    await asyncio.sleep(0.2)
    assert pool.stats().size == 1  # the warm floor stays
    await pool.aclose()


async def test_reset_runs_on_clean_release_and_errors_discard() -> None:
    adapter = FakeAdapter()
    pool = Pool(adapter, settings(min_size=1, max_size=1), name="t")
    await pool.start()
    async with pool.acquire() as lease:
        conn = lease.conn
    assert conn.resets == 1
    assert not conn.closed
    with pytest.raises(ValueError, match="boom"):
        async with pool.acquire() as lease:
            raise ValueError("boom")
    await wait_until(lambda: conn.closed)
    async with pool.acquire() as lease:
        lease.discard("bad audio")
        second = lease.conn
    await wait_until(lambda: second.closed)
    assert pool.stats().closed == {"error": 1, "discarded": 1}
    adapter.reset_fails = True
    async with pool.acquire() as lease:
        third = lease.conn
    await wait_until(lambda: third.closed)
    await pool.aclose()


async def test_multiplexed_streams_bounded_and_spread() -> None:
    adapter = MuxAdapter()
    pool = Pool(adapter, settings(concurrency=6, max_streams=3), name="mux")
    await pool.start()
    assert pool.stats().size == 2
    seen: dict[int, int] = {}
    peak: dict[int, int] = {}

    async def stream() -> tuple[int, int]:
        async with pool.acquire() as lease:
            cid = lease.conn.id
            assert lease.stream_id is not None
            seen[cid] = seen.get(cid, 0) + 1
            peak[cid] = max(peak.get(cid, 0), seen[cid])
            assert seen[cid] <= 3
            await asyncio.sleep(0.01)
            seen[cid] -= 1
            return cid, lease.stream_id

    results = await asyncio.gather(*(stream() for _ in range(30)))
    assert len(set(results)) == 30  # stream ids unique per connection
    assert set(peak) == {c.id for c in adapter.conns}
    assert all(v == 3 for v in peak.values())
    assert pool.stats().streams_in_use == 0
    await pool.aclose()


async def test_multiplexed_first_acquires_go_to_least_loaded() -> None:
    adapter = MuxAdapter()
    pool = Pool(adapter, settings(concurrency=6, max_streams=3), name="mux")
    await pool.start()
    async with pool.acquire() as a, pool.acquire() as b:
        assert a.conn is not b.conn
    await pool.aclose()


async def test_multiplexed_opens_another_when_full_and_drains_on_zero_capacity() -> None:
    adapter = MuxAdapter()
    pool = Pool(adapter, settings(min_size=1, max_size=3, max_streams=2), name="mux")
    await pool.start()
    assert pool.stats().size == 1
    async with pool.acquire() as a, pool.acquire() as b:
        assert a.conn is b.conn
        await wait_until(lambda: pool.stats().size == 2)  # saturated: one more opened ahead
        first = a.conn
        adapter.capacity[first.id] = 0  # GOAWAY: drain
        adapter.connection_changed(first)
        async with pool.acquire() as c:
            assert c.conn is not first
        assert not first.closed  # in-flight streams finish
    await wait_until(lambda: first.closed)
    assert all(sid > 0 for _, sid, _ in adapter.released)
    await pool.aclose()


async def test_multiplexed_error_lets_adapter_decide() -> None:
    adapter = MuxAdapter()
    pool = Pool(adapter, settings(min_size=1, max_size=1, max_streams=2), name="mux")
    await pool.start()
    with pytest.raises(KeyError):
        async with pool.acquire() as lease:
            conn = lease.conn
            raise KeyError("barge-in")
    assert not conn.closed
    assert isinstance(adapter.released[-1][2], KeyError)
    adapter.kill_on_error = True
    with pytest.raises(KeyError):
        async with pool.acquire() as lease:
            raise KeyError("socket broke")
    await wait_until(lambda: conn.closed)
    await pool.aclose()


async def test_single_use_spares_refill() -> None:
    adapter = SingleUseAdapter(connect_delay=0.005)
    pool = Pool(adapter, settings(concurrency=8, headroom=0.25), name="asr")
    await pool.start()
    assert pool.min_size == 2
    assert pool.max_size == 10
    assert pool.stats().idle == 2
    used = []
    for _ in range(5):
        async with pool.acquire() as lease:
            used.append(lease.conn)
    await wait_until(lambda: all(c.closed for c in used))
    await wait_until(lambda: pool.stats().idle == 2 and pool.stats().opening == 0)
    assert len({c.id for c in used}) == 5
    assert pool.stats().closed.get("used") == 5
    await pool.aclose()


@pytest.mark.timeout(20)
async def test_warmup_of_fifty_costs_one_connect_time() -> None:
    adapter = FakeAdapter(connect_delay=0.05)
    pool = Pool(adapter, settings(min_size=50, max_size=50, connect_concurrency=50), name="t")
    t0 = time.perf_counter()
    await pool.start()
    elapsed = time.perf_counter() - t0
    assert pool.stats().size == 50
    assert elapsed < 0.05 * 4, elapsed  # about one connect (50 ms), never fifty (2.5 s)
    await pool.aclose()


async def test_warmup_respects_connect_concurrency() -> None:
    adapter = FakeAdapter(connect_delay=0.01)
    pool = Pool(adapter, settings(min_size=12, max_size=12, connect_concurrency=4), name="t")
    await pool.start()
    assert adapter.max_in_flight == 4
    await pool.aclose()


async def test_aclose_while_tasks_acquire() -> None:
    adapter = FakeAdapter(connect_delay=0.01)
    pool = Pool(adapter, settings(min_size=2, max_size=3), name="t")
    await pool.start()
    tasks = [asyncio.create_task(hold(pool, 0.05)) for _ in range(10)]
    await asyncio.sleep(0.01)
    await pool.aclose(timeout=1)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, int | PoolClosed) for r in results), results
    assert any(isinstance(r, PoolClosed) for r in results)
    assert not adapter.open_conns
    s = pool.stats()
    assert (s.size, s.opening, s.waiters, s.state) == (0, 0, 0, PoolState.CLOSED)
    with pytest.raises(PoolClosed):
        async with pool.acquire():
            pass


async def test_aclose_hard_closes_leases_held_past_timeout() -> None:
    adapter = NoResetAdapter()
    pool = Pool(adapter, settings(min_size=1, max_size=1), name="t")
    await pool.start()
    gate = asyncio.Event()

    async def stuck() -> None:
        async with pool.acquire():
            await gate.wait()

    task = asyncio.create_task(stuck())
    await asyncio.sleep(0)
    t0 = time.monotonic()
    await pool.aclose(timeout=0.1)
    assert time.monotonic() - t0 < 1
    assert not adapter.open_conns
    gate.set()
    await task  # the late release is harmless


async def test_acquire_before_start_is_an_error() -> None:
    pool = Pool(FakeAdapter(), settings(), name="t")
    with pytest.raises(PoolError, match="not started"):
        async with pool.acquire():
            pass


async def test_leak_detection_warns_once_with_the_acquire_site(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pool = Pool(NoResetAdapter(), settings(leak_threshold=0.05), name="leaky")
    await pool.start()
    with caplog.at_level(logging.WARNING, logger="voicepool"):
        async with pool.acquire():
            await asyncio.sleep(0.15)
        async with pool.acquire():
            pass
    leaks = [r for r in caplog.records if "possible leak" in r.getMessage()]
    assert len(leaks) == 1
    assert "leaky" in leaks[0].getMessage()
    assert "test_pool.py" in leaks[0].getMessage()
    await pool.aclose()


async def test_wait_p95_counts_fast_acquires_as_zero() -> None:
    pool = Pool(NoResetAdapter(), settings(min_size=1, max_size=1), name="t")
    await pool.start()
    for _ in range(100):
        async with pool.acquire():
            pass
    assert pool.stats().wait_p95_ms == 0.0
    await asyncio.gather(*(hold(pool, 0.01) for _ in range(20)))
    assert pool.stats().wait_p95_ms > 5
    await pool.aclose()


async def test_alarm_fires_and_recovers(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    pool = Pool(
        NoResetAdapter(),
        settings(min_size=1, max_size=1, alarm_window=10, alarm_wait_p95_ms=5),
        name="alarmed",
        clock=lambda: now[0],
    )
    await pool.start()
    with caplog.at_level(logging.WARNING, logger="voicepool"):
        lease = await pool.lease()
        waiter = asyncio.create_task(hold(pool, 0))
        await wait_until(lambda: pool.stats().waiters == 1)
        now[0] += 0.050  # the waiter waits 50 ms on the pool's clock
        await lease.release()
        await waiter
        now[0] = 11
        pool.maintain()
        now[0] = 22
        pool.maintain()
    messages = [r.getMessage() for r in caplog.records]
    assert any("p95 50.0 ms is above 5.0 ms" in m for m in messages)
    assert any("back to" in m for m in messages)
    await pool.aclose()


async def test_expire_all_rotates_without_interrupting_leases() -> None:
    adapter = NoResetAdapter(connect_delay=0.01)
    pool = Pool(adapter, settings(min_size=3, max_size=4), name="rotate")
    await pool.start()
    old = set(adapter.open_conns)
    async with pool.acquire() as lease, pool.acquire(), pool.acquire():
        held = lease.conn
        adapter.gate = asyncio.Event()
        fourth = asyncio.create_task(hold(pool, 0))  # nothing idle: a connect in flight ...
        await wait_until(lambda: adapter.in_flight == 1)
        pool.expire_all()  # ... when the credentials rotate
        adapter.gate.set()
        await fourth  # served by it, then it retires at its release
        assert not held.closed  # the lease is never interrupted
    await wait_until(lambda: all(c.closed for c in old))
    await wait_until(lambda: len(adapter.open_conns) == 3)
    # Every connection open now was connected after the rotation.
    assert not old & set(adapter.open_conns)
    in_flight = next(c for c in adapter.conns if c.id == 4)  # opened under the old credentials
    await wait_until(lambda: in_flight.closed)
    await pool.aclose()

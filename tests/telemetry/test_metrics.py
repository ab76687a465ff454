"""Metric names, units, attributes and values after scripted scenarios (SDK in-memory reader)."""

from __future__ import annotations

import asyncio

import pytest

from tests.telemetry.conftest import Otel, attributes
from tests.telemetry.fakes import FakeConn, Probe, ScriptedAdapter, auth_error, settle
from voicepool import Pool, PoolExhausted, PoolSettings, PoolUnavailable
from voicepool.telemetry import names as n

NAME = {n.ATTR_POOL_NAME: "asr"}

EXPECTED_UNITS = {
    n.CONNECTION_COUNT: "{connection}",
    n.CONNECTION_MAX: "{connection}",
    n.CONNECTION_IDLE_MIN: "{connection}",
    n.PENDING_REQUESTS: "{request}",
    n.TIMEOUTS: "{timeout}",
    n.EXHAUSTED: "{acquire}",
    n.UNAVAILABLE: "{acquire}",
    n.ACQUIRES: "{acquire}",
    n.CLOSED: "{connection}",
    n.WAIT_P95: "s",
    n.POOL_STATE: "{state}",
    n.IDLE_TIME: "s",
    n.WARM_TARGET: "{connection}",
    n.ACQUIRES_WAITED: "{acquire}",
    n.CREATE_TIME: "s",
    n.WAIT_TIME: "s",
    n.USE_TIME: "s",
}


def settings(**kw: object) -> PoolSettings:
    base: dict[str, object] = {"min_size": 1, "max_size": 2, "acquire_timeout": 5.0}
    base.update(kw)
    return PoolSettings(**base)


async def test_gauges_units_and_limits(otel: Otel) -> None:
    adapter = ScriptedAdapter()
    async with Pool(adapter, settings(min_size=2, max_size=3), name="asr") as pool:
        async with pool.acquire():
            m = otel.metrics()
            for name, unit in EXPECTED_UNITS.items():
                if name in (n.CREATE_TIME, n.WAIT_TIME, n.USE_TIME, n.CLOSED):
                    continue  # histograms after a flush below; closed once something closed
                assert m[name].unit == unit, name
            assert otel.value(n.CONNECTION_COUNT, m, **{n.ATTR_STATE: "idle"}, **_k()) == 1
            assert otel.value(n.CONNECTION_COUNT, m, **{n.ATTR_STATE: "used"}, **_k()) == 1
            assert otel.value(n.CONNECTION_COUNT, m, **{n.ATTR_STATE: "opening"}, **_k()) == 0
            assert otel.value(n.CONNECTION_MAX, m, **_k()) == 3
            assert otel.value(n.CONNECTION_IDLE_MIN, m, **_k()) == 2
            assert otel.value(n.PENDING_REQUESTS, m, **_k()) == 0
            assert otel.value(n.ACQUIRES, m, **_k()) == 1
            assert otel.value(n.TIMEOUTS, m, **_k()) == 0
            assert otel.value(n.EXHAUSTED, m, **_k()) == 0
            assert otel.value(n.POOL_STATE, m, **{n.ATTR_STATE: "ready"}, **_k()) == 1
            assert otel.value(n.POOL_STATE, m, **{n.ATTR_STATE: "unavailable"}, **_k()) == 0
            assert otel.value(n.WAIT_P95, m, **_k()) == 0.0
            assert otel.value(n.WARM_TARGET, m, **_k()) == 2  # fixed: min_size
            assert otel.value(n.ACQUIRES_WAITED, m, **_k()) == 0
            assert otel.value(n.IDLE_TIME, m, **_k()) >= 0.0
            for metric in m.values():
                for point in metric.data.data_points:
                    assert attributes(point)[n.ATTR_POOL_NAME] == "asr"
        pool.maintain()  # the health task's flush, now rather than within a second
        m = otel.metrics()
        for name in (n.CREATE_TIME, n.WAIT_TIME, n.USE_TIME):
            assert m[name].unit == "s", name
        create = otel.histogram(n.CREATE_TIME)
        assert create.count == 2  # warm-up opened min_size connections
        assert dict(attributes(create)) == NAME
        assert otel.histogram(n.WAIT_TIME).count == 1  # one acquire, served from idle
        assert otel.histogram(n.WAIT_TIME).sum == 0.0
        assert otel.histogram(n.USE_TIME).count == 1
        assert list(otel.histogram(n.WAIT_TIME).explicit_bounds)[:3] == [0.0, 0.0005, 0.001]


def _k() -> dict[str, str]:
    return {n.ATTR_POOL_NAME.replace(".", "__"): "asr"}


async def test_exhaustion_counts_and_waits(otel: Otel) -> None:
    adapter = ScriptedAdapter()
    async with Pool(adapter, settings(max_size=1), name="asr") as pool:
        release = asyncio.Event()

        async def hold() -> None:
            async with pool.acquire():
                await release.wait()

        holder = asyncio.create_task(hold())
        await settle(lambda: pool.stats().in_use == 1)
        waiter = asyncio.create_task(_acquire_once(pool))
        await settle(lambda: pool.stats().waiters == 1)
        m = otel.metrics()
        assert otel.value(n.PENDING_REQUESTS, m, **_k()) == 1
        assert otel.value(n.EXHAUSTED, m, **_k()) == 1
        assert otel.value(n.CONNECTION_COUNT, m, **{n.ATTR_STATE: "used"}, **_k()) == 1
        release.set()
        await asyncio.gather(holder, waiter)
        pool.maintain()
        m = otel.metrics()
        assert otel.value(n.PENDING_REQUESTS, m, **_k()) == 0
        assert otel.value(n.ACQUIRES, m, **_k()) == 2
        wait = otel.histogram(n.WAIT_TIME)
        assert wait.count == 2  # the holder's zero wait and the waiter's real one
        assert wait.sum > 0
        assert otel.histogram(n.USE_TIME).count == 2


async def _acquire_once(pool: Pool[FakeConn], timeout: float | None = None) -> None:
    async with pool.acquire(timeout):
        pass


async def test_timeouts_counted_and_wait_recorded(otel: Otel) -> None:
    async with Pool(ScriptedAdapter(), settings(max_size=1), name="asr") as pool:
        async with pool.acquire():
            with pytest.raises(PoolExhausted):
                await _acquire_once(pool, timeout=0.02)
        pool.maintain()
        m = otel.metrics()
        assert otel.value(n.TIMEOUTS, m, **_k()) == 1
        assert otel.value(n.EXHAUSTED, m, **_k()) == 1
        wait = otel.histogram(n.WAIT_TIME)
        assert wait.count == 2
        assert wait.max >= 0.015  # the timed-out acquire's wait is a wait too


async def test_circuit_open_state_and_failed_connects(otel: Otel) -> None:
    adapter = ScriptedAdapter()
    adapter.fail_all_connects = auth_error(adapter)
    pool = Pool(adapter, settings(min_size=1, max_size=1), name="asr")
    await pool.start(require_ready=False)
    try:
        with pytest.raises(PoolUnavailable):
            await _acquire_once(pool)
        m = otel.metrics()
        assert otel.value(n.POOL_STATE, m, **{n.ATTR_STATE: "unavailable"}, **_k()) == 1
        assert otel.value(n.POOL_STATE, m, **{n.ATTR_STATE: "ready"}, **_k()) == 0
        assert otel.value(n.UNAVAILABLE, m, **_k()) == 1
        failed = otel.histogram(n.CREATE_TIME, **{n.ATTR_ERROR_TYPE: "ConnectError"})
        assert failed.count >= 1
        assert set(attributes(failed)) == {n.ATTR_POOL_NAME, n.ATTR_ERROR_TYPE}
    finally:
        await pool.aclose()


async def test_ping_failure_histogram_and_close_reason(otel: Otel, probe: Probe) -> None:
    adapter = ScriptedAdapter()
    s = settings(min_size=1, max_size=1, ping_interval=0.05, ping_timeout=0.05)
    async with Pool(adapter, s, name="asr"):
        await asyncio.wait_for(probe.pinged.wait(), 10)
        adapter.ping_error = ConnectionResetError("peer reset")
        await adapter.wait_for(lambda: len(adapter.closed) >= 1)
        adapter.ping_error = None
        m = otel.metrics()
        ok = otel.histogram(n.PING_DURATION)
        assert ok.count >= 1
        assert dict(attributes(ok)) == NAME
        bad = otel.histogram(n.PING_DURATION, **{n.ATTR_ERROR_TYPE: "ConnectionResetError"})
        assert bad.count >= 1
        assert otel.value(n.CLOSED, m, **{n.ATTR_REASON: "ping_failed"}, **_k()) >= 1
        assert m[n.PING_DURATION].unit == "s"


async def test_retirement_reasons_and_final_snapshot(otel: Otel) -> None:
    adapter = ScriptedAdapter()
    s = settings(min_size=1, max_size=3, idle_timeout=0.05)
    pool = Pool(adapter, s, name="asr")
    async with pool:
        async with pool.acquire() as lease:
            lease.discard("bad state")
        with pytest.raises(RuntimeError):
            async with pool.acquire():
                raise RuntimeError("handler failed")
        await settle(lambda: pool.stats().idle >= 1 and pool.stats().opening == 0)
        async with pool.acquire() as lease:
            conn = lease.conn
        adapter.kill(conn)
        # Two leases at once grow the pool above min_size; the surplus then retires as idle.
        async with pool.acquire(), pool.acquire():
            pass
        await adapter.wait_for(lambda: pool.stats().closed.get("idle", 0) >= 1)
        m = otel.metrics()
        assert m[n.CLOSED].unit == "{connection}"
        for reason in ("discarded", "error", "remote_closed", "idle"):
            assert otel.value(n.CLOSED, m, **{n.ATTR_REASON: reason}, **_k()) == 1, reason
    # After aclose the final counters are still reported once more (shutdown included).
    m = otel.metrics()
    assert otel.value(n.CLOSED, m, **{n.ATTR_REASON: "shutdown"}, **_k()) >= 1
    assert otel.value(n.POOL_STATE, m, **{n.ATTR_STATE: "closed"}, **_k()) == 1
    assert otel.value(n.CONNECTION_COUNT, m, **{n.ATTR_STATE: "idle"}, **_k()) == 0
    spans = {s.attributes[n.ATTR_CLOSE_REASON] for s in otel.spans(n.SPAN_RETIRE) if s.attributes}
    assert {"discarded", "error", "remote_closed", "idle", "shutdown"} <= spans


async def test_two_pools_report_separately_and_same_name_sums(otel: Otel) -> None:
    async with (
        Pool(ScriptedAdapter(), settings(min_size=1, max_size=2), name="asr") as a,
        Pool(ScriptedAdapter(), settings(min_size=2, max_size=4), name="tts"),
        Pool(ScriptedAdapter(), settings(min_size=1, max_size=5), name="asr"),
    ):
        assert a.stats().size == 1
        m = otel.metrics()
        assert otel.value(n.CONNECTION_MAX, m, **_k()) == 7  # two live pools named "asr"
        tts = {n.ATTR_POOL_NAME.replace(".", "__"): "tts"}
        assert otel.value(n.CONNECTION_MAX, m, **tts) == 4
        assert otel.value(n.CONNECTION_COUNT, m, **{n.ATTR_STATE: "idle"}, **tts) == 2


async def test_removed_instrumentation_goes_quiet(otel: Otel) -> None:
    async with Pool(ScriptedAdapter(), settings(), name="asr") as pool:
        assert otel.points(n.CONNECTION_MAX)
        otel.inst.remove()
        async with pool.acquire():
            pass
        pool.maintain()
        assert otel.points(n.CONNECTION_MAX) == []
    async with Pool(ScriptedAdapter(), settings(), name="later"):
        assert otel.points(n.CONNECTION_MAX) == []
    otel.inst.remove()  # idempotent


async def test_collection_from_another_thread_while_the_loop_churns(otel: Otel) -> None:
    """Exporters collect on their own thread; stats() races the loop and must never break it."""
    adapter = ScriptedAdapter()
    async with Pool(adapter, settings(min_size=4, max_size=8), name="asr") as pool:
        stop = False

        def collect() -> int:
            rounds = 0
            while not stop and rounds < 2000:
                otel.metrics()
                rounds += 1
            return rounds

        collector = asyncio.create_task(asyncio.to_thread(collect))
        for _ in range(300):
            async with pool.acquire() as lease:
                if lease.conn.ident % 3 == 0:
                    lease.discard()
            await asyncio.sleep(0)
        stop = True
        assert await collector >= 1
        m = otel.metrics()
        assert otel.value(n.ACQUIRES, m, **_k()) == 300

"""`FleetQuota` (issue 15) on a real redis-server: the Lua script and the pool driving it."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from tests.fleet.conftest import needs_redis
from tests.peers.redis import RedisServer
from voicepool import Pool, PoolExhausted, PoolSettings
from voicepool.quota import FleetQuota
from voicepool.testing import FakeAdapter, FaultProxy, wait_until

pytestmark = needs_redis


def _sync(q: FleetQuota, holder: str, **kw: Any) -> Any:
    args: dict[str, Any] = {"want": 0, "claimed": 0, "waiting": 0, "busy": 0, "limit": 5}
    args["ttl"] = 10.0
    args.update(kw)
    return q.sync("acct", holder, **args)


async def _evalsha_calls(q: FleetQuota) -> int:
    stats = await q._client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_reserve_up_to_the_limit_across_holders(redis_server: RedisServer) -> None:
    q = FleetQuota(redis_server.url, worker="w")
    try:
        a = await _sync(q, "a", want=3)
        b = await _sync(q, "b", want=4, waiting=1, busy=1)
        c = await _sync(q, "c", want=2, waiting=1, busy=1)
        assert (a.granted, b.granted, c.granted) == (3, 2, 0)
        assert (c.used, c.holders, c.workers, c.others_waiting) == (5, 2, 3, 1)
        assert await q.held("acct") == {"a": 3, "b": 2}
        a = await _sync(q, "a", want=1, claimed=3)  # give two back
        c = await _sync(q, "c", want=2, waiting=1, busy=1)
        assert (a.granted, c.granted) == (1, 2)
        assert await q.held("acct") == {"a": 1, "b": 2, "c": 2}
    finally:
        await q.aclose()


async def test_spares_yield_to_a_holder_with_callers_waiting(redis_server: RedisServer) -> None:
    q = FleetQuota(redis_server.url, worker="w")
    try:
        await _sync(q, "starved", want=2, waiting=2, busy=2)
        spare = await _sync(q, "spares", want=5)  # nobody waits here: no new tokens
        assert spare.granted == 0
        assert spare.others_waiting == 2
        starved = await _sync(q, "starved", want=5, claimed=2, waiting=3, busy=5)
        assert starved.granted == 5
    finally:
        await q.aclose()


async def test_a_dead_workers_tokens_expire_after_the_ttl(redis_server: RedisServer) -> None:
    q = FleetQuota(redis_server.url, worker="w")
    try:
        loop = asyncio.get_running_loop()
        await _sync(q, "dead", want=5, ttl=0.3)
        t0 = loop.time()
        assert (await _sync(q, "live", want=5, waiting=1, busy=1, ttl=0.3)).granted == 0
        # The dead one never refreshes; poll (bounded) until Redis's clock passes its TTL.
        got = 0
        while got == 0 and loop.time() - t0 < 3.0:
            got = (await _sync(q, "live", want=5, waiting=1, busy=1, ttl=0.3)).granted
            await asyncio.sleep(0.02)  # Redis's clock has no event to wait on
        assert got == 5
        assert loop.time() - t0 <= 0.3 + 0.2
        assert await q.held("acct") == {"live": 5}
    finally:
        await q.aclose()


async def test_the_refresh_is_one_round_trip_whatever_the_tokens(
    redis_server: RedisServer,
) -> None:
    q = FleetQuota(redis_server.url, worker="w")
    try:
        await _sync(q, "a", want=40, limit=50)
        before = await _evalsha_calls(q)
        for _ in range(5):
            assert (await _sync(q, "a", want=40, claimed=40, limit=50)).granted == 40
        assert await _evalsha_calls(q) - before == 5  # one per refresh, not one per token
    finally:
        await q.aclose()


async def test_a_redis_that_lost_its_data_gives_holders_their_share_back_first(
    redis_server: RedisServer,
) -> None:
    a = FleetQuota(redis_server.url, worker="a")
    b = FleetQuota(redis_server.url, worker="b")
    try:
        await _sync(a, "a", want=3, ttl=1.0)
        await _sync(b, "b", want=2, ttl=1.0)
        await redis_server.restart()  # no persistence: every token is gone
        first: Any = None
        for _ in range(3):  # the first call after a restart may meet the old connection
            try:
                first = await _sync(a, "a", want=5, claimed=3, ttl=1.0)
                break
            except Exception:
                continue
        assert first is not None
        # a asked for 5 first, but only its 3 came back: b's 2 are kept for it.
        assert first.granted == 3
        assert first.recovering
        second: Any = None
        for _ in range(3):
            try:
                second = await _sync(b, "b", want=2, claimed=2, ttl=1.0)
                break
            except Exception:
                continue
        assert second is not None
        assert second.granted == 2
    finally:
        await a.aclose()
        await b.aclose()


def _settings(url: str, limit: int, **kw: Any) -> PoolSettings:
    quota = {"key": "acct", "limit": limit, "backend": url, "ttl": 2.0, "refresh": 0.2}
    quota.update(kw.pop("quota", {}))
    return PoolSettings.model_validate({"quota": quota, "acquire_timeout": 1.0, **kw})


async def test_pool_exhaustion_names_the_fleet_quota(redis_server: RedisServer) -> None:
    url = redis_server.url
    async with (
        Pool(FakeAdapter(), _settings(url, 2, min_size=2, max_size=2), name="first") as first,
        Pool(FakeAdapter(), _settings(url, 2, min_size=0, max_size=4), name="second") as second,
    ):
        held = [await first.lease(), await first.lease()]  # the account's 2, in use
        with pytest.raises(PoolExhausted) as info:
            async with second.acquire(timeout=0.5):
                pass
        for lease in held:
            await lease.release()
    msg = str(info.value)
    assert "fleet quota 'acct' at its limit (2/2 tokens held by 1 workers" in msg, msg


async def test_pool_survives_redis_stopped_and_restarted(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """SINGLE_USE (a connection per call): calls go on while Redis is down, from the
    reservation; nothing opens beyond it; one warning per outage; reconciled on return."""
    adapter = FakeAdapter()
    settings = _settings(
        redis_server.url, 10, min_size=3, max_size=6, lease_mode="single_use", concurrency=3
    )
    caplog.set_level(logging.WARNING, logger="voicepool.pool")
    failed = 0
    async with Pool(adapter, settings, name="asr") as pool:

        async def calls(n: int) -> None:
            nonlocal failed
            for _ in range(n):
                try:
                    async with pool.acquire():
                        await asyncio.sleep(0.005)  # the call's hold time (the traffic)
                except Exception:
                    failed += 1

        await calls(20)
        await redis_server.stop()
        await wait_until(lambda: pool.stats().quota_backend_errors >= 1, timeout=5.0)
        await calls(40)
        st = pool.stats()
        assert st.size + st.opening <= st.quota_reserved <= 6
        await redis_server.start()
        errors = pool.stats().quota_backend_errors
        await wait_until(lambda: "reachable again" in caplog.text, timeout=5.0)
        await calls(20)
        assert pool.stats().quota_backend_errors >= errors
        q = FleetQuota(redis_server.url, worker="probe")
        try:
            await wait_until(lambda: pool.stats().quota_reserved >= 3, timeout=5.0)
            held = await q.held("acct")
        finally:
            await q.aclose()
        assert sum(held.values()) == pool.stats().quota_reserved
    assert failed == 0
    warnings = [r for r in caplog.records if "backend unreachable" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]


async def test_slow_redis_never_delays_a_warm_call(redis_server: RedisServer) -> None:
    """Redis black-holed (answers nothing): warm calls are served with no wait, every sync
    times out as a backend error, and closing the pool mid-sync leaves nothing behind."""
    async with FaultProxy("127.0.0.1", redis_server.port) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}/0"
        settings = _settings(url, 10, min_size=3, max_size=3, quota={"timeout": 0.1})
        pool = Pool(FakeAdapter(), settings, name="asr")
        await pool.start()
        assert pool.stats().size == 3
        proxy.black_hole()
        await wait_until(lambda: pool.stats().quota_backend_errors >= 2, timeout=5.0)
        loop = asyncio.get_running_loop()
        worst = 0.0
        for _ in range(200):
            t0 = loop.time()
            async with pool.acquire():
                pass
            worst = max(worst, loop.time() - t0)
        assert worst < 0.01, worst  # never a Redis timeout (0.1 s) on the warm path
        await wait_until(lambda: bool(pool._core.quota and pool._core.quota.in_flight), 5.0)
        await pool.aclose()  # cancels the sync in flight
        assert pool._core.quota is not None
        assert not pool._core.quota.in_flight


async def test_redis_down_at_boot_starts_the_pool_and_names_it_at_exhaustion() -> None:
    from tests.peers.nginx import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    settings = _settings(url, 5, min_size=2, max_size=4, quota={"timeout": 0.1})
    async with Pool(FakeAdapter(), settings, name="asr") as pool:  # require_ready: no raise
        assert pool.stats().size == 0
        with pytest.raises(PoolExhausted, match="backend unreachable"):
            async with pool.acquire(timeout=0.3):
                pass
        assert pool.stats().quota_backend_errors >= 1


def test_a_redis_password_never_shows() -> None:
    q = FleetQuota("redis://:quota-s3cret-pass@127.0.0.1:1/0")
    assert "quota-s3cret-pass" not in repr(q)
    from voicepool._redact import scrub

    assert "quota-s3cret-pass" not in scrub("auth failed for quota-s3cret-pass")


async def test_pools_of_a_worker_share_one_redis_client(redis_server: RedisServer) -> None:
    from voicepool import quota as quota_mod

    url = redis_server.url
    a = Pool(FakeAdapter(), _settings(url, 6, min_size=2, max_size=2), name="asr")
    b = Pool(FakeAdapter(), _settings(url, 6, min_size=2, max_size=2), name="asr")
    async with a, b:
        assert a._quota is b._quota  # one Redis connection for the worker
        assert a._holder != b._holder  # two holders all the same
        q = FleetQuota(url, worker="probe")
        try:
            held = await q.held("acct")
        finally:
            await q.aclose()
        assert sorted(held.values()) == [2, 2], held
    assert not quota_mod._shared  # the last pool closed the client


async def test_a_workers_pools_refresh_in_one_round_trip(redis_server: RedisServer) -> None:
    """Three pools of one worker, one Redis client: their refreshes share the refresh grid and
    go in one pipelined round trip (one per worker per refresh, not one per pool or token)."""
    url = redis_server.url
    pools = [
        Pool(FakeAdapter(), _settings(url, 30, min_size=3, max_size=3), name=f"p{i}")
        for i in range(3)
    ]
    for p in pools:
        await p.start()
    client = pools[0]._quota
    assert isinstance(client, FleetQuota)
    calls, trips = client.calls, client.round_trips
    await wait_until(lambda: client.calls - calls >= 30, timeout=10.0)  # ~10 refreshes each
    made, taken = client.calls - calls, client.round_trips - trips
    for p in pools:
        await p.aclose()
    print(f"\n{made} syncs in {taken} round trips")
    assert taken <= made * 0.5, (made, taken)  # mostly three syncs a round trip

"""The urgent asks' direct connection (a redis-py Connection outside its client's pool) on a
real redis-server: used while open, redis-py's client whenever it is not, and what ends it (a
restart, a lost script, a caller that stops waiting)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from tests.fleet.conftest import needs_redis
from tests.peers.redis import RedisServer
from voicepool import Pool, PoolSettings
from voicepool._engine.calls import Resume
from voicepool.quota import FleetQuota
from voicepool.testing import FakeAdapter, wait_until

pytestmark = needs_redis


def _sync(q: FleetQuota, holder: str, **kw: Any) -> Any:
    args: dict[str, Any] = {"want": 1, "claimed": 0, "waiting": 1, "busy": 1, "limit": 5}
    args.update({"ttl": 10.0, "urgent": True, **kw})
    return q.sync("acct", holder, **args)


async def _opened(q: FleetQuota) -> None:
    """The first sync starts the direct connection's open in the background."""
    await _sync(q, "boot", want=0, waiting=0, busy=0, urgent=False)
    await wait_until(lambda: q.direct_open, timeout=5.0, what="the direct connection")


async def test_urgent_asks_go_on_the_direct_connection(redis_server: RedisServer) -> None:
    q = FleetQuota(redis_server.url, worker="w")
    try:
        await _opened(q)
        calls = q.direct_calls
        assert (await _sync(q, "a", want=3)).granted == 3
        assert (await _sync(q, "b", want=4)).granted == 2  # the same script, the same limit
        assert q.direct_calls - calls == 2
        await _sync(q, "a", want=0, claimed=3, waiting=0, busy=0, urgent=False)  # batched
        assert q.direct_calls - calls == 2  # (refreshes go through redis-py's client)
        assert await q.held("acct") == {"b": 2}
    finally:
        await q.aclose()
    assert not q.direct_open


async def test_direct_false_sends_every_ask_through_the_client(redis_server: RedisServer) -> None:
    q = FleetQuota(redis_server.url, worker="w", direct=False)
    try:
        for _ in range(3):
            assert (await _sync(q, "a", want=2, claimed=2)).granted == 2
        assert not q.direct_open
        assert q.direct_calls == 0
    finally:
        await q.aclose()


async def test_a_redis_restart_falls_back_to_the_client_then_reopens(
    redis_server: RedisServer,
) -> None:
    """The restart ends the direct connection: the next ask meets its EOF and goes through the
    client (its one retry meets the new server), the direct connection comes back, and the
    script Redis lost is loaded again (NOSCRIPT on the direct connection: that ask, through
    the client)."""
    q = FleetQuota(redis_server.url, worker="w")
    try:
        await _opened(q)
        await redis_server.restart()
        calls = q.direct_calls
        assert (await _sync(q, "a", want=2)).granted == 2
        assert q.direct_calls == calls
        await wait_until(lambda: q.direct_open, timeout=5.0, what="the direct connection again")
        assert (await _sync(q, "a", want=3, claimed=2)).granted == 3
        assert q.direct_calls == calls + 1
        await q._client.script_flush()  # Redis forgets the script, the connection stays
        assert (await _sync(q, "a", want=1, claimed=3)).granted == 1
        assert q.direct_calls == calls + 1  # answered through the client, which loaded it
        assert q.direct_open
        assert (await _sync(q, "a", want=2, claimed=1)).granted == 2
        assert q.direct_calls == calls + 2
    finally:
        await q.aclose()


async def test_an_ask_that_stops_waiting_closes_the_direct_connection(
    redis_server: RedisServer,
) -> None:
    """A caller that times out (Redis paused) does not leave the next ask behind a reply that
    may never come: the connection is closed, asks go through the client until it reopens."""
    q = FleetQuota(redis_server.url, worker="w")
    other = Redis.from_url(redis_server.url)
    try:
        await _opened(q)
        await other.execute_command("CLIENT", "PAUSE", "300", "ALL")
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await _sync(q, "a", want=2)
        assert not q.direct_open
        assert (await _sync(q, "a", want=2)).granted == 2  # after the pause, via the client
        await wait_until(lambda: q.direct_open, timeout=5.0, what="the direct connection again")
        calls = q.direct_calls
        assert (await _sync(q, "a", want=3, claimed=2)).granted == 3
        assert q.direct_calls == calls + 1
    finally:
        await other.aclose()
        await q.aclose()


async def test_urgent_asks_in_flight_together_each_get_their_own_reply(
    redis_server: RedisServer,
) -> None:
    """Several asks written before the first reply (pipelined on the one connection): each
    reads its own reply, in the order they were written."""
    q = FleetQuota(redis_server.url, worker="w")
    try:
        await _opened(q)
        calls = q.direct_calls
        grants = await asyncio.gather(*(_sync(q, f"h{n}", want=n, limit=100) for n in range(1, 7)))
        assert [g.granted for g in grants] == [1, 2, 3, 4, 5, 6]
        assert q.direct_calls == calls + 6
        assert q.direct_open
    finally:
        await q.aclose()


async def test_an_ask_that_gives_up_among_others_in_flight(redis_server: RedisServer) -> None:
    """One of three asks in flight stops waiting: the connection closes, and the other two
    (one reading, one waiting for its turn) are answered through the client, each its own."""
    q = FleetQuota(redis_server.url, worker="w")
    other = Redis.from_url(redis_server.url)
    try:
        await _opened(q)
        calls = q.direct_calls
        await other.execute_command("CLIENT", "PAUSE", "300", "ALL")
        asks = [asyncio.create_task(_sync(q, f"h{n}", want=n, limit=100)) for n in (1, 2, 3)]
        await asyncio.sleep(0)  # (every ask written, the first one reading)
        asks[1].cancel()
        with pytest.raises(asyncio.CancelledError):
            await asks[1]
        assert not q.direct_open
        assert [(await asks[0]).granted, (await asks[2]).granted] == [1, 3]
        assert q.direct_calls == calls
        await wait_until(lambda: q.direct_open, timeout=5.0, what="the direct connection again")
        assert (await _sync(q, "h2", want=2, limit=100)).granted == 2
        assert q.direct_calls == calls + 1
    finally:
        await other.aclose()
        await q.aclose()


async def test_an_urgent_ask_started_outside_a_task(redis_server: RedisServer) -> None:
    """A pool's timer starts an ask from a callback (no current task), and a task finishes it
    (the pool's Resume): the ask works on the direct connection all the same."""
    q = FleetQuota(redis_server.url, worker="w")
    try:
        await _opened(q)
        calls = q.direct_calls
        loop = asyncio.get_running_loop()
        started: asyncio.Future[Resume] = loop.create_future()

        def from_a_timer() -> None:
            assert asyncio.current_task() is None
            call = _sync(q, "a", want=2)
            started.set_result(Resume(call, call.send(None)))

        loop.call_soon(from_a_timer)
        assert (await (await started)).granted == 2
        assert q.direct_calls == calls + 1
    finally:
        await q.aclose()


async def test_an_error_reply_is_raised_and_keeps_the_direct_connection(
    redis_server: RedisServer,
) -> None:
    q = FleetQuota(redis_server.url, worker="w")
    try:
        await _opened(q)
        calls = q.direct_calls
        with pytest.raises(ResponseError):
            await _sync(q, "a", limit="not a number")  # (the script fails on the server)
        assert q.direct_open
        assert (await _sync(q, "a", want=2)).granted == 2
        assert q.direct_calls == calls + 1
    finally:
        await q.aclose()


async def test_the_direct_connection_authenticates_and_selects_the_db(
    redis_server: RedisServer,
) -> None:
    admin = Redis.from_url(redis_server.url)
    await admin.config_set("requirepass", "direct-pw")
    await admin.aclose()
    url = f"redis://:direct-pw@127.0.0.1:{redis_server.port}/3"
    q = FleetQuota(url, worker="w")
    db0 = Redis.from_url(f"redis://:direct-pw@127.0.0.1:{redis_server.port}/0")
    try:
        await _opened(q)
        calls = q.direct_calls
        assert (await _sync(q, "a", want=2)).granted == 2
        assert q.direct_calls == calls + 1
        assert await q.held("acct") == {"a": 2}  # (the client reads db 3)
        assert await db0.exists("vp:q:{acct}:tokens") == 0
    finally:
        await db0.aclose()
        await q.aclose()


async def test_a_cold_acquire_waits_for_one_direct_round_trip(redis_server: RedisServer) -> None:
    """The path benchmarks/fleet.py times: an empty reservation, a caller; the pool's ask is
    answered on the direct connection and the connect follows."""
    url = redis_server.url
    q = FleetQuota(url, worker="w")
    settings = PoolSettings.model_validate(
        {"min_size": 0, "max_size": 2, "quota": {"key": "acct", "limit": 5, "backend": url}}
    )
    try:
        await _opened(q)
        async with Pool(FakeAdapter(), settings, name="asr", quota=q) as pool:
            calls = q.direct_calls
            async with pool.acquire(timeout=2.0):
                assert pool.stats().quota_reserved == 1
            assert q.direct_calls == calls + 1
    finally:
        await q.aclose()


def test_the_direct_connection_runs_on_uvloop(redis_server: RedisServer) -> None:
    """uvloop's transports are not asyncio's classes: the direct connection must not depend on
    them (it would never open, and every ask would take the slow path)."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        q = FleetQuota(redis_server.url, worker="w")
        try:
            await _opened(q)
            assert (await _sync(q, "a", want=2)).granted == 2
            assert q.direct_calls == 1
        finally:
            await q.aclose()

    uvloop.run(scenario())

"""Node's own HTTP/2 server (nghttp2) as the peer that refuses streams: REFUSED_STREAM and a
GOAWAY whose last-stream-id lies below streams it already received (RFC 9113 8.7, 6.8). Such
streams were never processed, so the transport re-sends them on another connection, outside any
retry budget, and no request is lost or processed twice."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.http2.conftest import MakePool, settings
from tests.peers.node_h2 import NodeH2Server, node_available
from voicepool.adapters.http2 import PooledTransport

pytestmark = [
    pytest.mark.needs_bin,
    pytest.mark.skipif(not node_available(), reason="node is not installed"),
]


async def _burst(http: httpx.AsyncClient, url: str, count: int) -> list[int | BaseException]:
    async def one(i: int) -> int:
        resp = await http.post(url + "/v1/echo", content=b"x", headers={"x-request-id": f"r{i}"})
        return resp.status_code

    return await asyncio.gather(*(one(i) for i in range(count)), return_exceptions=True)


async def _processed(http: httpx.AsyncClient, url: str) -> dict[str, dict[str, int]]:
    stats: dict[str, dict[str, int]] = json.loads((await http.get(url + "/stats")).text)
    return stats


async def test_refused_streams_are_resent_outside_any_retry_budget(make_pool: MakePool) -> None:
    # Every request is refused three times (more than the old budget of two) before nghttp2
    # lets it through: each one must still succeed, processed exactly once.
    async with NodeH2Server(refuse_times=3) as server:
        pool = await make_pool(server.url, settings(min_size=2, max_size=2))
        async with httpx.AsyncClient(transport=PooledTransport(pool), timeout=10.0) as http:
            statuses = await _burst(http, server.url, 40)
            stats = await _processed(http, server.url)
    assert statuses == [200] * 40
    assert stats["processed"] == {f"r{i}": 1 for i in range(40)}
    assert stats["refused"] == {f"r{i}": 3 for i in range(40)}
    assert pool.stats().connects == 2  # refusals are not connection failures


async def test_streams_above_a_goaway_last_stream_id_are_resent(make_pool: MakePool) -> None:
    # nghttp2 sends GOAWAY naming the 5th stream of each connection as the last it processes,
    # while up to 16 more are in flight on it: those go to another connection.
    async with NodeH2Server(goaway_after=5, max_streams=16, delay_ms=20) as server:
        pool = await make_pool(server.url, settings(min_size=2, max_size=6, acquire_timeout=10.0))
        async with httpx.AsyncClient(transport=PooledTransport(pool), timeout=10.0) as http:
            statuses = await _burst(http, server.url, 120)
            stats = await _processed(http, server.url)
    assert statuses == [200] * 120
    assert stats["processed"] == {f"r{i}": 1 for i in range(120)}
    closed = pool.stats().closed
    assert closed.get("goaway", 0) >= 120 // 5 - 6
    assert "expired" not in closed

"""Stream scheduling: many concurrent streams over several connections, barge-in cancellation,
and the server's SETTINGS_MAX_CONCURRENT_STREAMS."""

from __future__ import annotations

import asyncio

import httpx

from tests.http2.conftest import MakePool, settings
from voicepool.adapters.http2 import PooledTransport
from voicepool.testing import wait_until
from voicepool.testing.llm import LlmEmulator

CHAT = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


async def _stream(http: httpx.AsyncClient, url: str, headers: dict[str, str] | None = None) -> int:
    """One streaming chat completion; returns the number of SSE data events."""
    events = 0
    async with http.stream("POST", url, json=CHAT, headers=headers) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            events += line.startswith("data: ")
    return events


async def test_300_streams_spread_over_3_connections_all_at_once(
    make_pool: MakePool,
) -> None:
    # Each stream lasts ~1 s: first token after 0.2 s, then 2 more at 2.5 tokens/s.
    async with LlmEmulator(ttft=0.2, tokens=3, tokens_per_second=2.5) as emu:
        pool = await make_pool(
            emu.url, settings(min_size=3, max_size=4, max_streams=100, acquire_timeout=10.0)
        )
        url = emu.base_url + "/chat/completions"
        async with httpx.AsyncClient(transport=PooledTransport(pool), timeout=30) as http:
            assert await _stream(http, url) == 5  # 3 tokens, a stop chunk, [DONE]
            results = await asyncio.gather(*(_stream(http, url) for _ in range(300)))
    assert results == [5] * 300
    # All 300 were open at the emulator at the same moment: nothing queued behind a full
    # connection (a client that queues 100 per connection peaks at 100). This is the proof of
    # concurrency; a wall-clock bound on a shared machine would only measure its load
    # (benchmarks/llm.py measures the time, paired against one shared httpx client).
    assert emu.peak_open_streams == 300
    assert 3 <= pool.stats().connects <= 4  # the 4th opens when the last free stream is taken


async def test_cancelling_50_inflight_streams_resets_them_all(
    llm: LlmEmulator, make_pool: MakePool
) -> None:
    pool = await make_pool(llm.url, settings(min_size=1, max_size=1, max_streams=100))
    url = llm.base_url + "/chat/completions"
    first_bytes = 0
    async with httpx.AsyncClient(transport=PooledTransport(pool)) as http:

        async def barge_in_victim() -> None:
            nonlocal first_bytes
            headers = {"x-emulator-tokens": "100000", "x-emulator-ttft": "0"}
            async with http.stream("POST", url, json=CHAT, headers=headers) as resp:
                async for _ in resp.aiter_bytes():
                    first_bytes += 1
                    await asyncio.Event().wait()  # the caller holds the stream until cancelled

        tasks = [asyncio.create_task(barge_in_victim()) for _ in range(50)]
        await llm.wait_for(lambda: llm.open_streams == 50)
        await wait_until(lambda: first_bytes == 50)
        assert pool.stats().streams_in_use == 50
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert pool.stats().streams_in_use == 0  # freed at once, before any server reaction
        await llm.wait_for(lambda: llm.open_streams == 0)
        assert llm.resets_received == 50
        # The connection survives barge-in: the next request reuses it.
        assert (await http.get(llm.url + "/v1/models")).status_code == 200
    assert pool.stats().connects == 1
    assert pool.stats().closed == {}


async def test_cancelling_while_waiting_for_headers_resets_the_stream(
    llm: LlmEmulator, make_pool: MakePool
) -> None:
    pool = await make_pool(llm.url)
    async with httpx.AsyncClient(transport=PooledTransport(pool)) as http:
        held = {"x-emulator-head-delay": "5"}  # the server sits on the response head
        task = asyncio.create_task(
            http.post(llm.base_url + "/chat/completions", json=CHAT, headers=held)
        )
        await llm.wait_for(lambda: llm.open_streams == 1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await llm.wait_for(lambda: llm.open_streams == 0)
    assert pool.stats().streams_in_use == 0
    assert llm.resets_received == 1


async def test_stream_capacity_follows_server_max_concurrent_streams(
    make_pool: MakePool,
) -> None:
    async with LlmEmulator(ttft=0.2, tokens=1, max_concurrent_streams=5) as emu:
        pool = await make_pool(emu.url, settings(min_size=1, max_size=1, max_streams=100))
        adapter = pool.adapter
        async with pool.acquire() as lease:  # the pool's one connection
            conn = lease.conn
        assert adapter.stream_capacity(conn) == 5
        url = emu.base_url + "/chat/completions"
        async with httpx.AsyncClient(transport=PooledTransport(pool)) as http:
            results = await asyncio.gather(*(_stream(http, url) for _ in range(12)))
            assert results == [3] * 12
            assert emu.peak_open_streams == 5  # never above the server's limit, none refused
            emu.set_max_concurrent_streams(12)
            await wait_until(lambda: adapter.stream_capacity(conn) == 12)
            emu.peak_open_streams = 0
            results = await asyncio.gather(*(_stream(http, url) for _ in range(12)))
            assert results == [3] * 12
            assert emu.peak_open_streams == 12
        assert emu.connections_accepted == 1

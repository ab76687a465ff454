"""Connection lifecycle: GOAWAY drain and replacement, PING health through a black hole, ping
back-off on ENHANCE_YOUR_CALM, and how connect failures are classified."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from h2.errors import ErrorCodes

from tests.http2.conftest import API_KEY, MakePool, adapter_for, settings
from voicepool import ConnectError, Pool, PoolUnavailable
from voicepool.adapters.http2 import PooledTransport
from voicepool.testing import wait_until
from voicepool.testing.faultproxy import FaultProxy
from voicepool.testing.llm import LlmEmulator

CHAT = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


async def test_goaway_mid_stream_drains_while_new_streams_go_to_a_replacement(
    make_pool: MakePool,
) -> None:
    async with LlmEmulator(ttft=0.0, tokens=40, tokens_per_second=100.0) as emu:
        pool = await make_pool(emu.url, settings(min_size=1, max_size=2))
        url = emu.base_url + "/chat/completions"
        async with httpx.AsyncClient(transport=PooledTransport(pool)) as http:
            started = asyncio.Event()

            async def in_flight() -> str:
                body = []
                async with http.stream("POST", url, json=CHAT) as resp:
                    async for line in resp.aiter_lines():
                        started.set()
                        body.append(line)
                return "\n".join(body)

            old = [asyncio.create_task(in_flight()) for _ in range(5)]
            await started.wait()
            await emu.wait_for(lambda: emu.open_streams == 5)
            assert emu.goaway() == 1
            # New requests go to a new connection while the old one drains.
            fresh = await http.get(emu.url + "/v1/models")
            assert fresh.status_code == 200
            assert emu.connections_accepted == 2
            texts = await asyncio.gather(*old)
        for text in texts:  # every in-flight stream finished completely on the draining one
            assert "tok39 " in text
            assert text.rstrip().endswith("data: [DONE]")
        # Retired once: when its last stream ended, or when the server closed it after draining
        # (the engine then labels the release "error").
        await wait_until(lambda: sum(pool.stats().closed.values()) == 1)
        assert pool.stats().size == 1
        assert pool.stats().streams_in_use == 0


async def test_streams_a_goaway_refused_are_retried_on_a_new_connection(
    make_pool: MakePool,
) -> None:
    async with LlmEmulator(ttft=0.3, tokens=2) as emu:
        pool = await make_pool(emu.url, settings(min_size=1, max_size=2))
        url = emu.base_url + "/chat/completions"
        async with httpx.AsyncClient(transport=PooledTransport(pool)) as http:
            calls = [asyncio.create_task(http.post(url, json=CHAT)) for _ in range(3)]
            await emu.wait_for(lambda: emu.open_streams == 3)
            emu.goaway(ErrorCodes.NO_ERROR, last_stream_id=0)  # "I processed none of them"
            responses = await asyncio.gather(*calls)
        assert [r.status_code for r in responses] == [200, 200, 200]
        assert all(r.text.endswith("data: [DONE]\n\n") for r in responses)
        assert emu.connections_accepted == 2


async def test_black_holed_connection_is_detected_by_ping_and_replaced(
    llm: LlmEmulator, make_pool: MakePool
) -> None:
    async with FaultProxy("127.0.0.1", llm.port) as proxy:
        pool = await make_pool(
            f"https://127.0.0.1:{proxy.port}",
            settings(min_size=1, max_size=1, ping_interval=0.2, ping_timeout=0.1),
            server_hostname="127.0.0.1",
        )
        await llm.wait_for(lambda: llm.pings_received >= 1)  # healthy pings get answers
        proxy.black_hole(True, new_connections=False)  # the old socket goes silent, no FIN/RST
        await wait_until(lambda: pool.stats().closed.get("ping_failed") == 1)
        await wait_until(lambda: pool.stats().size == 1)
        async with httpx.AsyncClient(transport=PooledTransport(pool)) as http:
            resp = await http.get(f"https://127.0.0.1:{proxy.port}/v1/models")
        assert resp.status_code == 200
        assert pool.stats().connects == 2


async def test_enhance_your_calm_lengthens_the_ping_interval(make_pool: MakePool) -> None:
    async with LlmEmulator(min_ping_interval=0.3) as emu:
        pool = await make_pool(
            emu.url, settings(min_size=1, max_size=1, ping_interval=0.1, ping_timeout=0.1)
        )
        adapter = pool.adapter
        # Pings every ~0.1 s are "too many": GOAWAY ENHANCE_YOUR_CALM, the connection is
        # replaced and the adapter spaces its pings out until the server is content.
        await emu.wait_for(lambda: emu.calm_goaways >= 1, timeout=10)
        await wait_until(lambda: adapter.ping_gap >= 0.3, timeout=10)  # type: ignore[attr-defined]
        calms = emu.calm_goaways
        pings = emu.pings_received
        await emu.wait_for(lambda: emu.pings_received >= pings + 3, timeout=10)
        assert emu.calm_goaways == calms  # no more complaints at the new spacing
        assert adapter.calm_goaways == calms  # type: ignore[attr-defined]
        assert pool.stats().state.value == "ready"


async def test_server_without_http2_is_a_fatal_connect_error() -> None:
    async with LlmEmulator(alpn=["http/1.1"]) as emu:  # an HTTP/1.1-only TLS server
        adapter = adapter_for(emu.url)
        with pytest.raises(ConnectError, match="does not speak HTTP/2") as info:
            await adapter.connect()
        assert info.value.fatal
        assert adapter.is_fatal(info.value)


async def test_untrusted_certificate_opens_the_circuit_at_start(llm: LlmEmulator) -> None:
    pool = Pool(adapter_for(llm.url, ca_file=None), settings(), name="llm")
    with pytest.raises(PoolUnavailable) as info:
        await pool.start()
    cause = info.value.__cause__
    assert isinstance(cause, ConnectError)
    assert cause.fatal
    assert "certificate" in str(cause)


async def test_rejected_credentials_at_warmup_are_fatal(llm: LlmEmulator) -> None:
    adapter = adapter_for(llm.url, api_key="sk-wrong", warmup_path="/v1/models")
    with pytest.raises(ConnectError, match="HTTP 401") as info:
        await adapter.connect()
    assert info.value.fatal
    assert info.value.status == 401
    assert "sk-wrong" not in str(info.value)


async def test_refused_connections_are_retryable_connect_errors(llm: LlmEmulator) -> None:
    llm.refuse_connections()
    adapter = adapter_for(llm.url)
    with pytest.raises(ConnectError) as info:
        await adapter.connect()
    assert not info.value.fatal


async def test_cleartext_http2_with_prior_knowledge(make_pool: MakePool) -> None:
    async with LlmEmulator(tls=False, api_key=API_KEY, tokens=3) as emu:
        pool = await make_pool(emu.url, warmup_path="/v1/models")
        async with httpx.AsyncClient(transport=PooledTransport(pool)) as http:
            resp = await http.post(emu.base_url + "/chat/completions", json=CHAT)
        assert resp.status_code == 200
        assert resp.http_version == "HTTP/2"
        assert emu.connections_accepted == 1


async def test_ping_round_trip_and_close(llm: LlmEmulator) -> None:
    adapter = adapter_for(llm.url)
    conn = await adapter.connect()
    try:
        await adapter.ping(conn)
        assert llm.pings_received == 1
        assert adapter.stream_capacity(conn) == 100
    finally:
        await adapter.close(conn)
    assert not adapter.is_open(conn)
    assert adapter.stream_capacity(conn) == 0
    await llm.wait_for(lambda: llm.open_connections == 0)

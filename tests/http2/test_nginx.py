"""A real nginx (Debian package) as the TLS HTTP/2 front of the LLM emulator: the pool multiplexes
through it, adopts its stream limit, and survives its keepalive timeout closing idle connections."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.http2.conftest import MakePool, adapter_for, settings
from tests.peers.nginx import Nginx, free_port, nginx_available
from voicepool import ConnectError, Pool, PoolUnavailable
from voicepool.adapters.http2 import H2Connection, Http2Adapter, PooledTransport
from voicepool.testing import wait_until
from voicepool.testing.llm import LlmEmulator
from voicepool.testing.tls import test_certificates

pytestmark = [
    pytest.mark.needs_bin,
    pytest.mark.skipif(not nginx_available(), reason="nginx is not installed"),
]

CHAT = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
NGINX_STREAMS = 32
KEEPALIVE = 1  # seconds nginx keeps an idle HTTP/2 connection


def _http_block(port: int, upstream: int) -> str:
    certs = test_certificates()
    # nginx 1.22: "listen ... http2" (the "http2 on" directive is 1.25+); keepalive_timeout also
    # closes idle HTTP/2 connections (http2_idle_timeout is obsolete since 1.19.7).
    return f"""
    upstream llm_emulator {{ server 127.0.0.1:{upstream}; keepalive 16; }}
    server {{
        listen 127.0.0.1:{port} ssl http2;
        ssl_certificate {certs.cert_path};
        ssl_certificate_key {certs.key_path};
        keepalive_timeout {KEEPALIVE}s;
        http2_max_concurrent_streams {NGINX_STREAMS};
        location / {{
            proxy_pass http://llm_emulator;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
    """


@pytest.fixture
async def front() -> AsyncIterator[tuple[LlmEmulator, str]]:
    """The emulator (cleartext HTTP/1.1 upstream) behind nginx; yields (emulator, nginx URL)."""
    async with LlmEmulator(tls=False, ttft=0.2, tokens=3, tokens_per_second=50.0) as emu:
        port = free_port()
        async with Nginx(_http_block(port, emu.port)):
            yield emu, f"https://127.0.0.1:{port}"


async def _stream(http: httpx.AsyncClient, url: str) -> str:
    async with http.stream("POST", url + "/v1/chat/completions", json=CHAT) as resp:
        assert resp.status_code == 200
        return "".join([part async for part in resp.aiter_text()])


async def test_pool_multiplexes_through_nginx_within_its_stream_limit(
    front: tuple[LlmEmulator, str], make_pool: MakePool
) -> None:
    emu, url = front
    pool = await make_pool(url, settings(min_size=1, max_size=3), warmup_path="/v1/models")
    async with pool.acquire() as lease:  # the pool's one connection
        conn = lease.conn
    assert pool.adapter.stream_capacity(conn) == NGINX_STREAMS  # nginx's SETTINGS, not 100
    async with httpx.AsyncClient(transport=PooledTransport(pool)) as http:
        texts = await asyncio.gather(*(_stream(http, url) for _ in range(40)))
    assert all("data: [DONE]" in text for text in texts)
    assert pool.stats().connects == 2  # 40 streams over 2 connections (32 + 8)
    assert emu.requests["/v1/chat/completions"] == 40
    assert pool.stats().streams_in_use == 0


async def test_pool_survives_nginx_keepalive_timeout(
    front: tuple[LlmEmulator, str], make_pool: MakePool
) -> None:
    _, url = front
    # nginx applies keepalive_timeout once a connection has served a request (before that,
    # client_header_timeout): the warm-up request makes every connection count.
    pool = await make_pool(url, settings(min_size=2, max_size=2), warmup_path="/v1/models")
    async with httpx.AsyncClient(transport=PooledTransport(pool)) as http:
        assert "data: [DONE]" in await _stream(http, url)
        # Left idle, nginx closes both connections after its keepalive timeout; the pool hears
        # it at once (GOAWAY / EOF) and reopens them without waiting for a request.
        await wait_until(lambda: sum(pool.stats().closed.values()) >= 2, timeout=KEEPALIVE + 5)
        await wait_until(lambda: pool.stats().size == 2 and pool.stats().opening == 0)
        connects = pool.stats().connects
        assert connects >= 4
        texts = await asyncio.gather(*(_stream(http, url) for _ in range(10)))
    assert all("data: [DONE]" in text for text in texts)
    assert pool.stats().connects == connects  # served by the replacements, no handshake inline


BUDGET_STREAMS = 16
BUDGET_REQUESTS = 10  # nginx's keepalive_requests: below its stream limit, so GOAWAY mid-burst


def _budget_block(port: int, upstream: int) -> str:
    certs = test_certificates()
    return f"""
    upstream llm_emulator {{ server 127.0.0.1:{upstream}; keepalive 16; }}
    server {{
        listen 127.0.0.1:{port} ssl http2;
        ssl_certificate {certs.cert_path};
        ssl_certificate_key {certs.key_path};
        keepalive_requests {BUDGET_REQUESTS};
        http2_max_concurrent_streams {BUDGET_STREAMS};
        location / {{
            proxy_pass http://llm_emulator;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
    """


class _Recording(Http2Adapter):  # type: ignore[misc,unused-ignore]
    """Keeps every connection it opened, to count the streams they carried."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.conns: list[H2Connection] = []

    async def connect(self) -> H2Connection:
        conn = await super().connect()
        self.conns.append(conn)
        return conn


def _recording(url: str) -> _Recording:
    return _Recording(base_url=url, ca_file=str(test_certificates().ca_path))


async def _burst(http: httpx.AsyncClient, url: str, batches: int) -> list[int | BaseException]:
    async def one() -> int:
        resp = await http.post(url + "/v1/chat/completions", json=CHAT)
        return resp.status_code

    statuses: list[int | BaseException] = []
    for _ in range(batches):  # 60 at a time
        statuses.extend(await asyncio.gather(*(one() for _ in range(60)), return_exceptions=True))
    return statuses


async def test_no_request_lost_at_nginx_request_budget() -> None:
    # Every nginx connection takes 16 streams but serves 10 requests, then GOAWAY: the streams
    # above its last-stream-id (or refused) were never processed and are retried elsewhere
    # (RFC 9113 8.7), outside any retry budget. After two such GOAWAYs the adapter knows the
    # budget and opens no stream nginx would refuse: without that, a retried request could be
    # refused on every new connection it landed on (9 times in a row: 1-2 of 600 lost, 1 run
    # in 8) and ~350 of the 950 streams opened were refused.
    async with LlmEmulator(tls=False, ttft=0.01, tokens=2, tokens_per_second=1000.0) as emu:
        port = free_port()
        async with Nginx(_budget_block(port, emu.port)):
            url = f"https://127.0.0.1:{port}"
            adapter = _recording(url)
            pool: Pool[H2Connection] = Pool(
                adapter, settings(min_size=2, max_size=8, acquire_timeout=10.0), name="llm"
            )
            async with (
                pool,
                httpx.AsyncClient(transport=PooledTransport(pool), timeout=10.0) as http,
            ):
                statuses = await _burst(http, url, 10)  # 600 requests
            failed = [s for s in statuses if s != 200]
            assert failed == []
            assert len(statuses) == 600
            assert emu.requests["/v1/chat/completions"] == 600
            assert adapter.request_budget == BUDGET_REQUESTS
            refused = sum(c.streams_started for c in adapter.conns) - 600
            # Only connections opened before the budget was learnt (8 at most) refuse streams.
            assert refused <= 8 * (BUDGET_STREAMS - BUDGET_REQUESTS)
            closed = pool.stats().closed
            assert closed.get("goaway", 0) >= 600 // BUDGET_REQUESTS - 10
            assert "expired" not in closed


async def test_a_learnt_request_budget_is_forgotten_when_the_server_serves_more() -> None:
    # nginx restarted with a larger budget (a config change): connections capped at the old
    # budget serve it all without a GOAWAY, so the cap goes and they take streams again.
    async with LlmEmulator(tls=False, ttft=0.01, tokens=2, tokens_per_second=1000.0) as emu:
        port = free_port()
        adapter = _recording(f"https://127.0.0.1:{port}")
        url = f"https://127.0.0.1:{port}"
        pool: Pool[H2Connection] = Pool(
            adapter, settings(min_size=2, max_size=8, acquire_timeout=10.0), name="llm"
        )
        async with Nginx(_budget_block(port, emu.port)):
            await pool.start()
            async with httpx.AsyncClient(transport=PooledTransport(pool), timeout=10.0) as http:
                assert set(await _burst(http, url, 2)) == {200}
        assert adapter.request_budget == BUDGET_REQUESTS
        async with Nginx(
            _budget_block(port, emu.port).replace(
                f"keepalive_requests {BUDGET_REQUESTS};", "keepalive_requests 1000;"
            )
        ):
            # The pool found nginx gone and backs off: wait for its refill by the new one.
            await wait_until(lambda: pool.stats().size == 2 and pool.stats().opening == 0)
            before = len(adapter.conns)
            async with httpx.AsyncClient(transport=PooledTransport(pool), timeout=10.0) as http:
                assert set(await _burst(http, url, 3)) == {200}
            assert adapter.request_budget is None
            assert max(c.streams_started for c in adapter.conns[before:]) > BUDGET_REQUESTS
            await pool.aclose(1.0)


def _http11_block(port: int) -> str:
    certs = test_certificates()
    return f"""
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {certs.cert_path};
        ssl_certificate_key {certs.key_path};
        location / {{ return 200 "ok"; }}
    }}
    """


async def test_http11_only_nginx_is_unavailable_at_once_with_a_clear_error() -> None:
    port = free_port()
    async with Nginx(_http11_block(port)):
        pool = Pool(
            adapter_for(f"https://127.0.0.1:{port}"),
            settings(min_size=2, max_size=2, failure_threshold=5),
            name="llm",
        )
        t0 = time.monotonic()
        with pytest.raises(PoolUnavailable) as info:
            await pool.start()
        assert time.monotonic() - t0 < 1.0  # one handshake, not connect_timeout or retries
    cause = info.value.__cause__
    assert isinstance(cause, ConnectError)
    assert cause.fatal
    assert "does not speak HTTP/2 (ALPN negotiated http/1.1)" in str(cause)

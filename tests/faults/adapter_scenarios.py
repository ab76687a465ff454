"""The adapters' fault scenarios of issue 12, over real sockets on 127.0.0.1, for
``benchmarks/faults.py`` (the adapter branches test each item themselves).

A black hole under traffic (LLM over HTTP/2, ElevenLabs TTS): which requests started after the
drop hang, and how long a dead connection keeps taking new streams. nginx as the HTTP/2 front:
a request budget below the stream limit, and an HTTP/1.1-only server.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from tests.faults.scenarios import started
from tests.peers.nginx import Nginx, free_port
from voicepool import Pool, PoolSettings
from voicepool.adapters.elevenlabs import ElevenLabsAdapter
from voicepool.adapters.http2 import H2Connection, Http2Adapter, PooledTransport
from voicepool.testing import ElevenLabsEmulator, FaultProxy, LlmEmulator, test_certificates

log = logging.getLogger(__name__)

CHAT = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


class _Opened:
    """When each connection of a pool was opened (by object identity; references are kept)."""

    def __init__(self) -> None:
        self.at: dict[int, float] = {}
        self.conns: list[object] = []  # keeps ids unique for the run

    def add(self, conn: object) -> None:
        self.conns.append(conn)
        self.at[id(conn)] = time.monotonic()


class _TrackedHttp2(Http2Adapter):  # type: ignore[misc,unused-ignore]
    """Records each connection's opening and every stream started on it."""

    opened: _Opened
    streams: list[tuple[float, int]]

    async def connect(self) -> H2Connection:
        conn = await super().connect()
        self.opened.add(conn)
        start_request = conn.start_request

        def recorded(slot: int, headers: Any, *, end: bool) -> Any:
            self.streams.append((time.monotonic(), id(conn)))
            return start_request(slot, headers, end=end)

        conn.start_request = recorded  # type: ignore[method-assign,unused-ignore]
        return conn


class _TrackedElevenLabs(ElevenLabsAdapter):  # type: ignore[misc,unused-ignore]
    opened: _Opened

    async def connect(self) -> Any:
        conn = await super().connect()
        self.opened.add(conn)
        return conn


@dataclass(frozen=True, slots=True)
class BlackHoleResult:
    after_drop: int  # requests started after the drop
    hung: int  # of those, the ones that did not complete within the request timeout
    dead_stream_time: float  # last new stream on a dead connection - first failed stream, s
    hung_later: int  # hung requests started after the first failed stream (the adapter's part)

    @property
    def hung_share(self) -> float:
        return self.hung / self.after_drop if self.after_drop else 0.0


def _dead_stream_time(
    drop: float, opened: _Opened, streams: list[tuple[float, int]], failures: list[float]
) -> float:
    dead = {ident for ident, at in opened.at.items() if at < drop}
    on_dead = [t for t, ident in streams if ident in dead and t >= drop]
    if not on_dead or not failures:
        return 0.0
    return max(0.0, max(on_dead) - min(failures))


async def _traffic(
    one: Callable[[], Awaitable[None]], rate: float, before: float, after: float, drop: Any
) -> tuple[float, list[tuple[float, bool, float]]]:
    """Start ``one()`` ``rate`` times a second for ``before`` s, call ``drop()``, go on for
    ``after`` s, then wait for every request; returns (drop time, [(start, ok, end)])."""
    results: list[tuple[float, bool, float]] = []

    async def timed() -> None:
        t0 = time.monotonic()
        try:
            await one()
        except Exception:
            results.append((t0, False, time.monotonic()))
        else:
            results.append((t0, True, time.monotonic()))

    tasks: list[asyncio.Task[None]] = []
    loop = asyncio.get_running_loop()
    t_start = loop.time()
    drop_at = 0.0
    n = int((before + after) * rate)
    for i in range(n):
        if i == int(before * rate):
            drop()
            drop_at = time.monotonic()
        await asyncio.sleep(max(0.0, t_start + i / rate - loop.time()))  # arrivals
        tasks.append(asyncio.create_task(timed()))
    await asyncio.gather(*tasks)
    return drop_at, results


def _result(
    drop: float, results: list[tuple[float, bool, float]], opened: _Opened, streams: Any
) -> BlackHoleResult:
    late = [r for r in results if r[0] >= drop]
    failures = [end for start, ok, end in late if not ok]
    first = min(failures, default=float("inf"))
    later = sum(1 for start, ok, _ in late if not ok and start >= first)
    return BlackHoleResult(
        len(late), len(failures), _dead_stream_time(drop, opened, streams, failures), later
    )


async def llm_black_hole(
    size: int = 2, rate: float = 10.0, before: float = 1.0, after: float = 10.0, timeout: float = 2
) -> BlackHoleResult:
    """An HTTP/2 LLM pool (shipped ping settings) under ``rate`` requests a second; every open
    connection is black-holed (new ones go through) ``before`` s in."""
    async with (
        LlmEmulator(ttft=0.02, tokens=5, tokens_per_second=250.0) as llm,
        FaultProxy("127.0.0.1", llm.port) as proxy,
    ):
        url = f"https://127.0.0.1:{proxy.port}"
        adapter = _TrackedHttp2(base_url=url, ca_file=str(test_certificates().ca_path))
        adapter.opened, adapter.streams = _Opened(), []
        pool: Pool[Any] = Pool(adapter, PoolSettings(min_size=size, max_size=2 * size), name="llm")
        async with started(pool), httpx.AsyncClient(transport=PooledTransport(pool)) as http:

            async def one() -> None:
                async with asyncio.timeout(timeout):
                    resp = await http.post(url + "/v1/chat/completions", json=CHAT)
                    resp.raise_for_status()

            drop, results = await _traffic(
                one, rate, before, after, lambda: proxy.black_hole(new_connections=False)
            )
        return _result(drop, results, adapter.opened, adapter.streams)


async def tts_black_hole(
    size: int = 2, rate: float = 10.0, before: float = 1.0, after: float = 10.0, timeout: float = 2
) -> BlackHoleResult:
    """The same for an ElevenLabs TTS pool (contexts are the streams)."""
    async with (
        ElevenLabsEmulator(api_key="k", chunk_interval=0.0) as tts,
        FaultProxy("127.0.0.1", tts.port) as proxy,
    ):
        adapter = _TrackedElevenLabs(url=f"ws://127.0.0.1:{proxy.port}", api_key="k")
        adapter.opened = _Opened()
        streams: list[tuple[float, int]] = []
        pool: Pool[Any] = Pool(adapter, PoolSettings(min_size=size, max_size=2 * size), name="tts")
        async with started(pool):

            async def one() -> None:
                async with asyncio.timeout(timeout), pool.acquire() as lease:
                    streams.append((time.monotonic(), id(lease.conn)))
                    ctx = lease.conn.context(lease.stream_id)
                    async for _chunk in ctx.synthesize("Hello there. "):
                        pass

            drop, results = await _traffic(
                one, rate, before, after, lambda: proxy.black_hole(new_connections=False)
            )
        return _result(drop, results, adapter.opened, streams)


def _nginx_h2_front(port: int, upstream: int, extra: str, *, http2: bool = True) -> str:
    certs = test_certificates()
    return f"""
    upstream llm_emulator {{ server 127.0.0.1:{upstream}; keepalive 16; }}
    server {{
        listen 127.0.0.1:{port} ssl{" http2" if http2 else ""};
        ssl_certificate {certs.cert_path};
        ssl_certificate_key {certs.key_path};
        {extra}
        location / {{
            proxy_pass http://llm_emulator;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
    """


def _chain(exc: BaseException) -> str:
    """``Type: message`` of ``exc`` and up to four of its causes, joined by `` <- ``."""
    parts: list[str] = []
    cause: BaseException | None = exc
    while cause is not None and len(parts) < 5:
        parts.append(f"{type(cause).__name__}: {cause}")
        cause = cause.__cause__
    return " <- ".join(parts)


async def nginx_request_budget(requests: int = 600, concurrency: int = 60) -> int:
    """Failed requests out of ``requests`` (``concurrency`` at a time) through nginx with
    ``keepalive_requests 10`` and a 16-stream limit (GOAWAY every 10 requests a connection)."""
    async with LlmEmulator(tls=False, ttft=0.01, tokens=3, tokens_per_second=300.0) as llm:
        port = free_port()
        block = _nginx_h2_front(
            port, llm.port, "keepalive_requests 10; http2_max_concurrent_streams 16;"
        )
        async with Nginx(block):
            url = f"https://127.0.0.1:{port}"
            adapter = Http2Adapter(base_url=url, ca_file=str(test_certificates().ca_path))
            pool = Pool(adapter, PoolSettings(min_size=2, max_size=8), name="nginx")
            gate = asyncio.Semaphore(concurrency)
            failed = 0
            async with started(pool), httpx.AsyncClient(transport=PooledTransport(pool)) as http:

                async def one() -> None:
                    nonlocal failed
                    async with gate:
                        try:
                            async with asyncio.timeout(10.0):
                                resp = await http.post(url + "/v1/chat/completions", json=CHAT)
                            if resp.status_code != 200:
                                log.warning("nginx budget: HTTP %s", resp.status_code)
                                failed += 1
                        except Exception as exc:
                            log.warning("nginx budget: %s", _chain(exc))
                            failed += 1

                await asyncio.gather(*(one() for _ in range(requests)))
            return failed


@dataclass(frozen=True, slots=True)
class Http11Result:
    seconds: float
    error: str  # the exception's type and message, chained causes included

    @property
    def clear(self) -> bool:
        return self.error.startswith("PoolUnavailable") and "does not speak HTTP/2" in self.error


async def nginx_http11_only() -> Http11Result:
    """``start()`` of an HTTP/2 pool against a TLS nginx without HTTP/2."""
    async with LlmEmulator(tls=False) as llm:
        port = free_port()
        async with Nginx(_nginx_h2_front(port, llm.port, "", http2=False)):
            adapter = Http2Adapter(
                base_url=f"https://127.0.0.1:{port}", ca_file=str(test_certificates().ca_path)
            )
            pool = Pool(adapter, PoolSettings(min_size=1, connect_timeout=5.0), name="h1")
            t0 = time.monotonic()
            try:
                await pool.start()
            except Exception as exc:
                return Http11Result(time.monotonic() - t0, _chain(exc))
            await pool.aclose(0)
            return Http11Result(time.monotonic() - t0, "no error: the pool started")

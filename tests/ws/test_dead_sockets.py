"""A silently dead socket (black-holed by FaultProxy) is reported dead the moment a ping fails.

The pool pings a multiplexed connection at once when a lease on it ends with an error; what the
adapter owes it is a ping that fails within ``ping_timeout`` and, from then on, honest answers:
``is_open`` False, no stream capacity, consumers failed now rather than left hanging.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from voicepool import Adapter, Pool
from voicepool.adapters.cartesia import CartesiaAdapter
from voicepool.adapters.deepgram import DeepgramAdapter
from voicepool.adapters.elevenlabs import ElevenLabsAdapter
from voicepool.adapters.websocket import StreamClosed, WebSocketAdapter
from voicepool.testing import FaultProxy, wait_until
from voicepool.testing.asr import DeepgramEmulator
from voicepool.testing.tts import CartesiaEmulator, ElevenLabsEmulator

from ._util import API_KEY, settings

PING_TIMEOUT = 0.3


async def ping_fails(ad: Adapter[Any], conn: Any) -> float:
    """Ping as the pool does (under ``ping_timeout``); return how long the failure took."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(PING_TIMEOUT):
            await ad.ping(conn)
    return loop.time() - t0


@pytest.mark.parametrize("provider", ["elevenlabs", "cartesia"])
async def test_tts_socket_with_a_timed_out_context_is_reported_dead(provider: str) -> None:
    emulator = (ElevenLabsEmulator if provider == "elevenlabs" else CartesiaEmulator)(
        tls=True, api_key=API_KEY, idle_timeout=None
    )
    async with emulator as server, FaultProxy("127.0.0.1", server.port) as proxy:
        url = f"wss://127.0.0.1:{proxy.port}"
        kind = ElevenLabsAdapter if provider == "elevenlabs" else CartesiaAdapter
        ad = kind(url=url, api_key=API_KEY, ca_file=server.ca_file, close_timeout=0.5)
        conn = await ad.connect()
        try:
            first, second = conn.context(1), conn.context(2)
            assert b"".join([c async for c in first.synthesize("Before. ")])
            proxy.black_hole()  # nothing passes, nothing closes
            await second.send_text("After the drop. ")
            await second.end()
            with pytest.raises(TimeoutError):  # the call's own stream timeout
                async with asyncio.timeout(PING_TIMEOUT):
                    async for _ in second.audio():
                        pass
            assert await conn.release(2, TimeoutError()) is True  # no proof yet either way
            waiting = conn.context(3)
            await waiting.send_text("Stuck. ")
            assert await ping_fails(ad, conn) < PING_TIMEOUT * 2
            assert not ad.is_open(conn)
            assert ad.stream_capacity(conn) == 0
            with pytest.raises(StreamClosed, match="no pong"):  # failed now, not left hanging
                async with asyncio.timeout(1):
                    async for _ in waiting.audio():
                        pass
        finally:
            proxy.black_hole(False)
            await ad.close(conn)


async def test_deepgram_socket_is_reported_dead_after_a_failed_ping() -> None:
    async with (
        DeepgramEmulator(tls=True, api_key=API_KEY, idle_timeout=None) as server,
        FaultProxy("127.0.0.1", server.port) as proxy,
    ):
        ad = DeepgramAdapter(
            url=f"wss://127.0.0.1:{proxy.port}",
            api_key=API_KEY,
            ca_file=server.ca_file,
            close_timeout=0.5,
        )
        conn = await ad.connect()
        proxy.black_hole()
        await ping_fails(ad, conn)
        assert not ad.is_open(conn)
        with pytest.raises(StreamClosed):
            async with asyncio.timeout(1):
                await conn.recv()
        proxy.black_hole(False)
        await ad.close(conn)


async def test_generic_socket_is_reported_dead_after_a_failed_ping() -> None:
    async with (
        DeepgramEmulator(tls=True, api_key=API_KEY, idle_timeout=None) as server,
        FaultProxy("127.0.0.1", server.port) as proxy,
    ):
        ad = WebSocketAdapter(
            url=f"wss://127.0.0.1:{proxy.port}/v1/listen",
            api_key=API_KEY,
            auth_scheme="Token",
            ca_file=server.ca_file,
            close_timeout=0.5,
        )
        ws = await ad.connect()
        changed = asyncio.Event()
        ad.watch(lambda conn: changed.set() if conn is ws else None)
        proxy.black_hole()
        await ping_fails(ad, ws)
        async with asyncio.timeout(1):
            await changed.wait()  # the pool hears of it at once
        assert not ad.is_open(ws)
        proxy.black_hole(False)
        await ad.close(ws)


@pytest.mark.parametrize("provider", ["elevenlabs", "cartesia"])
async def test_pool_stops_lending_a_dead_tts_socket_within_ping_timeout(provider: str) -> None:
    """Shipped-like health (a 30 s ping interval): only the ping the pool sends when a lease
    ends with an error, and the adapter's honest answer to it, can retire the dead socket."""
    emulator = (ElevenLabsEmulator if provider == "elevenlabs" else CartesiaEmulator)(
        tls=True, api_key=API_KEY, idle_timeout=None
    )
    async with emulator as server, FaultProxy("127.0.0.1", server.port) as proxy:
        kind = ElevenLabsAdapter if provider == "elevenlabs" else CartesiaAdapter
        ad = kind(
            url=f"wss://127.0.0.1:{proxy.port}",
            api_key=API_KEY,
            ca_file=server.ca_file,
            close_timeout=0.5,
        )
        pool_settings = settings(
            min_size=1, max_size=2, ping_interval=30, ping_timeout=PING_TIMEOUT
        )
        async with Pool(ad, pool_settings, name="tts") as pool:
            async with pool.acquire() as lease:
                dead = lease.conn
                assert await speak(lease)
            proxy.black_hole(new_connections=False)  # that socket goes silent, nothing closes
            loop = asyncio.get_running_loop()
            with pytest.raises(TimeoutError):
                async with pool.acquire() as lease:
                    assert lease.conn is dead
                    ctx = lease.conn.context(lease.stream_id)
                    await ctx.send_text("Into the void. ")
                    await ctx.end()
                    async with asyncio.timeout(PING_TIMEOUT):
                        async for _ in ctx.audio():
                            pass
            failed_at = loop.time()
            await wait_until(
                lambda: not ad.is_open(dead),
                timeout=PING_TIMEOUT * 3,
                what="the dead socket reported closed",
            )
            assert loop.time() - failed_at <= PING_TIMEOUT * 2
            async with pool.acquire() as lease:
                assert lease.conn is not dead
                assert await speak(lease)


async def speak(lease: Any) -> bytes:
    ctx = lease.conn.context(lease.stream_id)
    return b"".join([chunk async for chunk in ctx.synthesize("Hello. ")])

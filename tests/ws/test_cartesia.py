"""Cartesia: context_id multiplexing, cancel on barge-in, per-context 429, idle recycling."""

from __future__ import annotations

import asyncio
import json

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from voicepool import LeaseMode, Pool
from voicepool.adapters._tts import ContextError
from voicepool.adapters.cartesia import CartesiaAdapter
from voicepool.testing import test_certificates, wait_until
from voicepool.testing.tts import CartesiaEmulator, synthesize

from ._util import API_KEY, settings


def adapter(server: CartesiaEmulator, **kw: object) -> CartesiaAdapter:
    opts: dict[str, object] = {
        "url": server.url,
        "api_key": API_KEY,
        "ca_file": server.ca_file,
        "close_timeout": 1.0,
    }
    opts.update(kw)
    return CartesiaAdapter(**opts)


async def speak(pool: Pool[object], text: str) -> bytes:
    async with pool.acquire() as lease:
        ctx = lease.conn.context(lease.stream_id)  # type: ignore[attr-defined]
        return b"".join([chunk async for chunk in ctx.synthesize(text)])


async def test_streams_share_sockets_and_get_their_own_audio(cartesia: CartesiaEmulator) -> None:
    ad = adapter(cartesia)
    assert ad.lease_mode is LeaseMode.MULTIPLEXED
    async with Pool(ad, settings(concurrency=4), name="tts") as pool:
        assert pool.stats().size == 1
        texts = [f"Hello number {i}." for i in range(4)]
        audios = await asyncio.gather(*(speak(pool, t) for t in texts))
        for text, audio in zip(texts, audios, strict=True):
            assert audio == synthesize(text, cartesia.bytes_per_char)
    assert cartesia.accepted == 1
    assert cartesia.contexts_opened == 4


async def test_cancel_on_barge_in_frees_the_context(cartesia: CartesiaEmulator) -> None:
    cartesia.chunk_interval = 0.02
    async with Pool(adapter(cartesia), settings(min_size=1, max_size=1), name="tts") as pool:
        got_audio = asyncio.Event()

        async def long_turn() -> None:
            async with pool.acquire() as lease:
                ctx = lease.conn.context(lease.stream_id)
                async for _ in ctx.synthesize("z" * 2000):
                    got_audio.set()

        task = asyncio.create_task(long_turn())
        await got_audio.wait()
        assert cartesia.contexts_active == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(lambda: cartesia.contexts_active == 0, what="context cancelled")
        assert cartesia.cancels == 1
        assert await speak(pool, "Yes?") == synthesize("Yes?", cartesia.bytes_per_char)
    assert cartesia.accepted == 1


async def test_context_over_the_plan_fails_alone() -> None:
    emulator = CartesiaEmulator(tls=True, api_key=API_KEY, max_concurrency=1)
    async with emulator as server:
        server.chunk_interval = 0.02
        async with Pool(adapter(server), settings(min_size=1, max_size=1), name="tts") as pool:
            first_audio = asyncio.Event()

            async def first() -> bytes:
                async with pool.acquire() as lease:
                    ctx = lease.conn.context(lease.stream_id)
                    out = b""
                    async for chunk in ctx.synthesize("a" * 200):
                        out += chunk
                        first_audio.set()
                    return out

            task = asyncio.create_task(first())
            await first_audio.wait()
            with pytest.raises(ContextError) as info:
                await speak(pool, "over the limit")
            assert info.value.status == 429
            assert len(await task) == 200 * server.bytes_per_char  # the other context went on
            assert pool.stats().closed == {}  # and so did the shared socket
            assert await speak(pool, "now there is room")
        assert server.accepted == 1
        assert server.context_errors[429] >= 1  # (a request sent before the error also gets one)


async def test_socket_limit_is_ten_times_the_plan() -> None:
    async with CartesiaEmulator(api_key=API_KEY, max_concurrency=1) as server:
        url = f"{server.url}/tts/websocket?cartesia_version=2025-04-16"
        headers = {"X-API-Key": API_KEY}
        sockets = [await connect(url, additional_headers=headers) for _ in range(10)]
        try:
            with pytest.raises(InvalidStatus) as info:
                await connect(url, additional_headers=headers)
            assert info.value.response.status_code == 429
        finally:
            for ws in sockets:
                await ws.close()


async def test_idle_sockets_are_recycled_before_the_idle_close() -> None:
    async with CartesiaEmulator(tls=True, api_key=API_KEY, idle_timeout=1.2) as server:
        ad = adapter(server, max_idle=1.2)  # recycled by the first ping after 0.48 s idle
        async with Pool(ad, settings(min_size=2, max_size=2), name="tts") as pool:
            await wait_until(lambda: server.accepted >= 4, timeout=5, what="recycling")
            assert server.idle_closes == 0  # the provider never had to close one
            assert await speak(pool, "fresh socket")
            assert pool.stats().idle == 2


async def test_emulator_rejects_bad_requests_per_context(cartesia: CartesiaEmulator) -> None:
    url = f"{cartesia.url}/tts/websocket?cartesia_version=2025-04-16"
    ctx = test_certificates().client_context()
    async with connect(url, additional_headers={"X-API-Key": API_KEY}, ssl=ctx) as ws:
        await ws.send(json.dumps({"context_id": "a", "transcript": "hi"}))  # no model/voice
        error = json.loads(await ws.recv())
        assert (error["type"], error["status_code"], error["context_id"]) == ("error", 400, "a")
        await ws.send("not json")
        assert json.loads(await ws.recv())["status_code"] == 400
        await (await ws.ping())  # the socket lives on
    with pytest.raises(InvalidStatus) as info:
        async with connect(f"{cartesia.url}/tts/websocket", ssl=ctx):
            pass
    assert info.value.response.status_code == 400  # no version


def test_url_and_headers() -> None:
    ad = CartesiaAdapter(api_key="sk_car_secret", version="2024-06-10")
    assert ad.url() == "wss://api.cartesia.ai/tts/websocket?cartesia_version=2024-06-10"
    assert ("X-API-Key", "sk_car_secret") in ad.request_headers()
    assert ("Cartesia-Version", "2024-06-10") in ad.request_headers()
    assert "sk_car_secret" not in repr(ad.options) + ad.describe()

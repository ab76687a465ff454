"""Raw mode: the lease is the plain ``websockets`` connection; the pool keeps the provider's
URL, the keepalive of idle sockets, the idle limits and the polite goodbye."""

from __future__ import annotations

import asyncio
import json

import pytest
from websockets.asyncio.client import ClientConnection

from voicepool import LeaseMode, Pool
from voicepool.adapters.cartesia import CartesiaAdapter, CartesiaOptions
from voicepool.adapters.deepgram import DeepgramAdapter, DeepgramOptions
from voicepool.adapters.elevenlabs import ElevenLabsAdapter, ElevenLabsOptions
from voicepool.adapters.provider import RawWebSocketAdapter
from voicepool.testing import wait_until
from voicepool.testing.asr import DeepgramEmulator
from voicepool.testing.tts import CartesiaEmulator, ElevenLabsEmulator

from ._util import API_KEY, IDLE, settings


def raw_deepgram(server: DeepgramEmulator, **kw: object) -> RawWebSocketAdapter:
    opts = DeepgramOptions.model_validate(
        {
            "url": server.url,
            "api_key": API_KEY,
            "ca_file": server.ca_file,
            "max_idle": IDLE,
            "keepalive_interval": IDLE / 3,
            "close_timeout": 1.0,
            "raw": True,
            **kw,
        }
    )
    ad = DeepgramAdapter.from_options(opts)  # what the settings layer calls
    assert isinstance(ad, RawWebSocketAdapter)
    return ad


async def test_deepgram_raw_lease_is_the_plain_socket(deepgram: DeepgramEmulator) -> None:
    ad = raw_deepgram(deepgram)
    assert ad.lease_mode is LeaseMode.SINGLE_USE
    assert ad.describe().endswith("/v1/listen (raw)")
    async with Pool(ad, settings(min_size=1, max_size=1), name="asr") as pool:
        async with pool.acquire() as lease:
            ws = lease.conn
            assert type(ws) is ClientConnection  # no wrapper, no voicepool reader
            await ws.send(b"raw audio")
            result = json.loads(await ws.recv())
            assert result["channel"]["alternatives"][0]["transcript"] == "raw audio"
        # Released with the stream still open: the pool says goodbye (CloseStream) for it.
        await wait_until(lambda: deepgram.close_streams == 1, what="CloseStream")
        await wait_until(lambda: pool.stats().closed.get("used") == 1, what="used socket closed")
        await wait_until(lambda: deepgram.close_codes[1000] == 1, what="a clean close")


async def test_deepgram_raw_idle_sockets_get_the_keepalive(deepgram: DeepgramEmulator) -> None:
    async with Pool(raw_deepgram(deepgram), settings(min_size=2, max_size=2), name="asr") as pool:
        await asyncio.sleep(IDLE * 2.5)  # the thing under test is the passage of time
        assert deepgram.idle_closes == 0
        assert deepgram.keepalives >= 4
        assert deepgram.accepted == 2
        assert pool.stats().closed == {}


def test_raw_options_are_checked() -> None:
    with pytest.raises(ValueError, match="raw and reuse"):
        DeepgramOptions(raw=True, reuse=True)
    with pytest.raises(TypeError, match="from_options"):
        DeepgramAdapter(raw=True)
    managed = DeepgramAdapter.from_options(DeepgramOptions(api_key="sk-raw-secret"))
    assert isinstance(managed, DeepgramAdapter)
    raw = RawWebSocketAdapter(DeepgramAdapter(api_key="sk-raw-secret"))
    assert "sk-raw-secret" not in repr(raw) + raw.describe()


async def test_elevenlabs_raw_idle_keepalive_opens_no_context(
    elevenlabs: ElevenLabsEmulator,
) -> None:
    opts = ElevenLabsOptions(
        url=elevenlabs.url, api_key=API_KEY, ca_file=elevenlabs.ca_file, max_idle=IDLE, raw=True
    )
    ad = ElevenLabsAdapter.from_options(opts)
    assert ad.lease_mode is LeaseMode.SINGLE_USE  # not multiplexed: the holder owns the socket
    async with Pool(ad, settings(min_size=1, max_size=1), name="tts") as pool:
        await wait_until(lambda: elevenlabs.keepalives >= 2, timeout=IDLE * 4, what="keepalives")
        assert elevenlabs.contexts_opened == 0
        async with pool.acquire() as lease:
            ws = lease.conn
            await ws.send(json.dumps({"text": "Hi ", "context_id": "mine"}))
            await ws.send(json.dumps({"context_id": "mine", "close_context": True}))
            while not json.loads(await ws.recv()).get("isFinal"):
                pass
        await wait_until(lambda: elevenlabs.close_codes[1000] >= 1, what="close_socket")
    assert elevenlabs.idle_closes == 0


async def test_cartesia_raw_idle_sockets_are_recycled_before_the_idle_close() -> None:
    async with CartesiaEmulator(tls=True, api_key=API_KEY, idle_timeout=1.2) as server:
        opts = CartesiaOptions(
            url=server.url, api_key=API_KEY, ca_file=server.ca_file, max_idle=1.2, raw=True
        )
        ad = CartesiaAdapter.from_options(opts)
        async with Pool(ad, settings(min_size=1, max_size=1), name="tts") as pool:
            await wait_until(lambda: server.accepted >= 3, timeout=5, what="recycling")
            assert server.idle_closes == 0
            await wait_until(lambda: pool.stats().idle == 1, what="a warm socket")  # (refilling)


async def test_deepgram_sdk_drives_a_raw_lease(deepgram: DeepgramEmulator) -> None:
    """What raw mode is for: deepgram-sdk's socket client on the pooled, warm socket."""
    socket_client = pytest.importorskip("deepgram.listen.v1.socket_client")  # the conformance extra
    async with Pool(raw_deepgram(deepgram), settings(min_size=1, max_size=1), name="asr") as pool:
        assert deepgram.accepted == 1  # warm before the call
        async with pool.acquire() as lease:
            client = socket_client.AsyncV1SocketClient(websocket=lease.conn)
            await client.send_media(b"through the sdk")
            result = await client.recv()
            assert result.channel.alternatives[0].transcript == "through the sdk"
            await client.send_close_stream()
        await wait_until(lambda: deepgram.close_streams == 1, what="the SDK's CloseStream")
    assert deepgram.accepted >= 1


def test_raw_and_aiohttp_pools_from_settings() -> None:
    from voicepool import VoicePoolSettings
    from voicepool.adapters.aiohttp_websocket import AiohttpWebSocketAdapter

    s = VoicePoolSettings.model_validate(
        {
            "pools": {
                "asr": {"adapter": "deepgram", "options": {"raw": True, "api_key": "sk-1"}},
                "lk": {
                    "adapter": "aiohttp_websocket",
                    "options": {"provider": "elevenlabs", "endpoint": {"api_key": "sk-2"}},
                },
            }
        }
    )
    asr, lk = s.pools["asr"], s.pools["lk"]
    raw = asr.adapter_class.from_options(asr.options)
    assert isinstance(raw, RawWebSocketAdapter)
    assert raw.lease_mode is LeaseMode.SINGLE_USE
    assert raw.max_idle == 10.0  # the provider's idle limit, kept
    aio = lk.adapter_class.from_options(lk.options)
    assert isinstance(aio, AiohttpWebSocketAdapter)
    assert "/multi-stream-input" in aio.url()
    assert "sk-2" not in repr(s) + repr(aio)

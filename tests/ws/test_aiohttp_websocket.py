"""The ``aiohttp_websocket`` adapter: aiohttp sockets with a provider's knowledge, over real TLS."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from voicepool import ConnectError, LeaseMode, Pool, get_adapter
from voicepool.adapters.aiohttp_websocket import AiohttpWebSocketAdapter, AiohttpWebSocketOptions
from voicepool.adapters.deepgram import DeepgramOptions
from voicepool.testing import FaultProxy, wait_until
from voicepool.testing.asr import DeepgramEmulator
from voicepool.testing.tts import ElevenLabsEmulator

from ._util import API_KEY, IDLE, settings


def deepgram_endpoint(server: DeepgramEmulator, **kw: object) -> dict[str, object]:
    return {
        "url": server.url,
        "api_key": API_KEY,
        "ca_file": server.ca_file,
        "max_idle": IDLE,
        "keepalive_interval": IDLE / 3,
        "close_timeout": 1.0,
        **kw,
    }


def adapter(
    server: DeepgramEmulator, heartbeat: float = 5.0, **kw: object
) -> AiohttpWebSocketAdapter:
    return AiohttpWebSocketAdapter(
        provider="deepgram", endpoint=deepgram_endpoint(server, **kw), heartbeat=heartbeat
    )


async def test_lends_aiohttp_sockets_with_the_provider_knowledge(
    deepgram: DeepgramEmulator,
) -> None:
    assert get_adapter("aiohttp_websocket") is AiohttpWebSocketAdapter
    ad = adapter(deepgram)
    assert ad.lease_mode is LeaseMode.SINGLE_USE
    assert ad.max_idle == IDLE
    async with Pool(ad, settings(min_size=1, max_size=1), name="asr") as pool:
        async with pool.acquire() as lease:
            ws = lease.conn
            assert isinstance(ws, aiohttp.ClientWebSocketResponse)
            await ws.send_bytes(b"over aiohttp")
            msg = await ws.receive()
            result = json.loads(msg.data)
            assert result["channel"]["alternatives"][0]["transcript"] == "over aiohttp"
        await wait_until(lambda: deepgram.close_streams == 1, what="CloseStream goodbye")
        await wait_until(lambda: deepgram.close_codes[1000] == 1, what="a clean close")
        await wait_until(lambda: pool.stats().idle == 1, what="a fresh spare")


async def test_idle_sockets_get_the_keepalive(deepgram: DeepgramEmulator) -> None:
    async with Pool(adapter(deepgram), settings(min_size=2, max_size=2), name="asr") as pool:
        await asyncio.sleep(IDLE * 2.5)  # the thing under test is the passage of time
        assert deepgram.idle_closes == 0
        assert deepgram.keepalives >= 4
        assert pool.stats().closed == {}


async def test_elevenlabs_keepalive_opens_no_context(elevenlabs: ElevenLabsEmulator) -> None:
    endpoint = {
        "url": elevenlabs.url,
        "api_key": API_KEY,
        "ca_file": elevenlabs.ca_file,
        "max_idle": IDLE,
    }
    ad = AiohttpWebSocketAdapter(provider="elevenlabs", endpoint=endpoint)
    async with Pool(ad, settings(min_size=1, max_size=1), name="tts"):
        await wait_until(lambda: elevenlabs.keepalives >= 2, timeout=IDLE * 4, what="keepalives")
        assert elevenlabs.contexts_opened == 0
    await wait_until(lambda: elevenlabs.close_codes[1000] >= 1, what="close_socket goodbye")


async def test_a_silent_peer_is_found_by_the_heartbeat() -> None:
    async with (
        DeepgramEmulator(tls=True, api_key=API_KEY, idle_timeout=None) as server,
        FaultProxy("127.0.0.1", server.port) as proxy,
    ):
        ad = adapter(server, heartbeat=0.3, url=f"wss://127.0.0.1:{proxy.port}")
        ws = await ad.connect()
        try:
            await ad.ping(ws)
            proxy.black_hole()
            await wait_until(lambda: not ad.is_open(ws), timeout=3, what="heartbeat close")
            with pytest.raises(ConnectionError):
                await ad.ping(ws)
        finally:
            proxy.black_hole(False)
            await ad.close(ws)


@pytest.mark.parametrize(("status", "fatal"), [(401, True), (404, True), (429, False)])
async def test_handshake_errors_are_classified(
    deepgram: DeepgramEmulator, status: int, fatal: bool
) -> None:
    deepgram.reject_next(status)
    with pytest.raises(ConnectError) as info:
        await adapter(deepgram).connect()
    assert info.value.status == status
    assert info.value.fatal is fatal
    assert API_KEY not in str(info.value)


async def test_certificate_failure_is_fatal(deepgram: DeepgramEmulator) -> None:
    with pytest.raises(ConnectError, match="certificate") as info:
        await adapter(deepgram, ca_file=None).connect()
    assert info.value.fatal


def test_options_validate_the_endpoint_with_the_provider_model() -> None:
    opts = AiohttpWebSocketOptions.model_validate(
        {"provider": "deepgram", "endpoint": {"api_key": "sk-aio-secret", "model": "nova-2"}}
    )
    assert isinstance(opts.endpoint, DeepgramOptions)
    ad = AiohttpWebSocketAdapter(opts)
    assert "model=nova-2" in ad.url()
    assert "sk-aio-secret" not in repr(ad) + repr(opts)
    with pytest.raises(ValueError, match="no adapter named"):
        AiohttpWebSocketOptions.model_validate({"provider": "nope", "endpoint": {}})
    with pytest.raises(ValueError, match="not a WebSocket adapter"):
        AiohttpWebSocketOptions.model_validate({"provider": "rest", "endpoint": {}})
    with pytest.raises(ValueError, match="endpoint options of 'deepgram': x: Extra inputs"):
        AiohttpWebSocketOptions.model_validate({"provider": "deepgram", "endpoint": {"x": 1}})
    with pytest.raises(ValueError, match="always raw"):
        AiohttpWebSocketOptions.model_validate({"provider": "deepgram", "endpoint": {"raw": True}})

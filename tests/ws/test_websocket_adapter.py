"""The generic WebSocket adapter: handshake errors, TLS, health pings, close notifications."""

from __future__ import annotations

import asyncio
import json

import pytest

from voicepool import ConnectError, Pool
from voicepool.adapters.websocket import StreamClosed, WebSocketAdapter, translate_connect_error
from voicepool.testing import FaultProxy, wait_until
from voicepool.testing.asr import DeepgramEmulator

from ._util import API_KEY, settings

KEEPALIVE = json.dumps({"type": "KeepAlive"})


def adapter(server: DeepgramEmulator, **kw: object) -> WebSocketAdapter:
    opts: dict[str, object] = {
        "url": f"{server.url}/v1/listen?encoding=linear16",
        "api_key": API_KEY,
        "auth_scheme": "Token",
        "ca_file": server.ca_file,
        "keepalive_message": KEEPALIVE,
        "open_timeout": 2.0,
        "close_timeout": 0.5,
    }
    opts.update(kw)
    return WebSocketAdapter(**opts)


async def test_connect_ping_close(deepgram: DeepgramEmulator) -> None:
    ad = adapter(deepgram, headers={"X-Trace": "t1"}, subprotocols=[])
    ws = await ad.connect()
    try:
        assert ad.is_open(ws)
        await ad.ping(ws)
        assert deepgram.keepalives == 1
        [session] = deepgram.sessions.values()
        assert session.headers["X-Trace"] == "t1"
        assert session.headers["User-Agent"] == "voicepool"
    finally:
        await ad.close(ws)
    assert not ad.is_open(ws)
    with pytest.raises(StreamClosed):
        await ad.ping(ws)


async def test_certificate_failure_is_fatal(deepgram: DeepgramEmulator) -> None:
    ad = adapter(deepgram, ca_file=None)  # the system store does not know the test CA
    with pytest.raises(ConnectError, match="certificate verification failed") as info:
        await ad.connect()
    assert info.value.fatal
    assert ad.is_fatal(info.value)
    ws = await adapter(deepgram, ca_file=None, verify=False).connect()  # explicitly insecure
    await ws.close()


@pytest.mark.parametrize(
    ("status", "fatal"), [(401, True), (403, True), (404, True), (429, False), (503, False)]
)
async def test_handshake_status_classification(
    deepgram: DeepgramEmulator, status: int, fatal: bool
) -> None:
    deepgram.reject_next(status)
    with pytest.raises(ConnectError) as info:
        await adapter(deepgram).connect()
    assert info.value.status == status
    assert info.value.fatal is fatal
    assert f"HTTP {status}" in str(info.value)
    assert API_KEY not in str(info.value)


async def test_refused_and_timed_out_opens_are_retryable(deepgram: DeepgramEmulator) -> None:
    async with FaultProxy("127.0.0.1", deepgram.port) as proxy:
        url = f"wss://127.0.0.1:{proxy.port}/v1/listen"
        proxy.refuse()
        with pytest.raises(ConnectError) as info:
            await adapter(deepgram, url=url).connect()
        assert not info.value.fatal
        proxy.refuse(False)
        proxy.black_hole()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(ConnectError, match="timed out") as info:
            await adapter(deepgram, url=url, open_timeout=0.3).connect()
        assert not info.value.fatal
        assert loop.time() - t0 < 2.0
        proxy.black_hole(False)


async def test_ping_times_out_on_a_silent_peer(deepgram: DeepgramEmulator) -> None:
    async with FaultProxy("127.0.0.1", deepgram.port) as proxy:
        ad = adapter(deepgram, url=f"wss://127.0.0.1:{proxy.port}/v1/listen")
        ws = await ad.connect()
        await ad.ping(ws)
        proxy.black_hole()
        assert ad.is_open(ws)  # the state flag cannot see a silent drop...
        with pytest.raises(TimeoutError):  # ...the ping can
            async with asyncio.timeout(0.3):
                await ad.ping(ws)
        proxy.black_hole(False)
        await ad.close(ws)


async def test_server_close_is_reported_to_the_pool_at_once() -> None:
    server = DeepgramEmulator(tls=True, api_key=API_KEY, idle_timeout=None)
    # Pings every 30 s: only the adapter's close notification can explain a fast replacement.
    pool_settings = settings(min_size=2, max_size=2, ping_interval=30)
    async with server, Pool(adapter(server), pool_settings, name="ws") as pool:
        await server.close_all(1001, "going away")
        await wait_until(lambda: pool.stats().closed.get("remote_closed") == 2, timeout=2)
        await wait_until(lambda: pool.stats().idle == 2, what="refill")
        async with pool.acquire() as lease:
            await lease.conn.send(b"hello")
            await lease.conn.send(json.dumps({"type": "Finalize"}))
            async with asyncio.timeout(5):
                assert json.loads(await lease.conn.recv())["type"] == "Results"


def test_error_translation_of_unknown_errors() -> None:
    err = translate_connect_error(RuntimeError("boom"), "wss://h/p")
    assert not err.fatal
    assert "RuntimeError" in str(err)


def test_options_validation_and_description() -> None:
    ad = WebSocketAdapter(url="wss://example.test:8443/path?token=abc", api_key="secret-1")
    assert ad.describe() == "WebSocketAdapter wss://example.test:8443/path"
    assert ("Authorization", "Bearer secret-1") in ad.request_headers()
    assert ad.ssl_context() is not None
    assert WebSocketAdapter(url="ws://127.0.0.1:1/").ssl_context() is None
    with pytest.raises(TypeError, match="either"):
        WebSocketAdapter(ad.options, url="ws://x/")
    assert WebSocketAdapter(ad.options.model_dump()).options == ad.options
    with pytest.raises(ValueError, match="url"):
        WebSocketAdapter(url="ftp://example.test/")


def test_entry_points_and_options_from_settings() -> None:
    from voicepool import get_adapter
    from voicepool.adapters.cartesia import CartesiaAdapter
    from voicepool.adapters.deepgram import DeepgramAdapter, DeepgramOptions
    from voicepool.adapters.elevenlabs import ElevenLabsAdapter

    assert get_adapter("websocket") is WebSocketAdapter
    assert get_adapter("deepgram") is DeepgramAdapter
    assert get_adapter("elevenlabs") is ElevenLabsAdapter
    assert get_adapter("cartesia") is CartesiaAdapter
    built = DeepgramAdapter.from_options(DeepgramOptions(api_key="k", reuse=True))
    assert isinstance(built, DeepgramAdapter)
    assert built.options.reuse


def test_one_options_builder_for_every_adapter() -> None:
    """``Adapter._build_options``: a model, keywords, or a mapping; never a model and keywords."""
    from voicepool.adapters.deepgram import DeepgramAdapter
    from voicepool.adapters.http2 import Http2Adapter
    from voicepool.adapters.rest import RestAdapter

    for cls, kw in [
        (WebSocketAdapter, {"url": "wss://example.test/"}),
        (DeepgramAdapter, {"model": "nova-2"}),
        (Http2Adapter, {"base_url": "https://example.test"}),
        (RestAdapter, {"base_url": "https://example.test"}),
    ]:
        built = cls(**kw)  # type: ignore[arg-type]
        assert cls(built.options).options is built.options  # type: ignore[arg-type]
        assert cls(built.options.model_dump()).options == built.options  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=f"{cls.__name__}, not both"):
            cls(built.options, **kw)  # type: ignore[arg-type]
    from voicepool import Adapter

    with pytest.raises(TypeError, match="takes no options"):
        Adapter._build_options(None, {})

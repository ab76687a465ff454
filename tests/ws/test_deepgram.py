"""Deepgram: the emulator's protocol facts, and pools of DeepgramAdapter over real TLS sockets."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from voicepool import ConnectError, LeaseMode, Pool, PoolState, PoolUnavailable
from voicepool.adapters.deepgram import DeepgramAdapter, DeepgramConnection, Transcript
from voicepool.adapters.websocket import StreamClosed
from voicepool.testing import FaultProxy, test_certificates, wait_until
from voicepool.testing.asr import DeepgramEmulator

from ._util import API_KEY, IDLE, settings


def adapter(server: DeepgramEmulator, **kw: object) -> DeepgramAdapter:
    opts: dict[str, object] = {
        "url": server.url,
        "api_key": API_KEY,
        "ca_file": server.ca_file,
        "max_idle": IDLE,
        "keepalive_interval": IDLE / 3,
        "close_timeout": 1.0,
    }
    opts.update(kw)
    return DeepgramAdapter(**opts)


def raw_url(server: DeepgramEmulator, query: str = "encoding=linear16&sample_rate=16000") -> str:
    return f"{server.url}/v1/listen?{query}"


def raw_headers(key: str = API_KEY) -> dict[str, str]:
    return {"Authorization": f"Token {key}"}


# -- the emulator, spoken to directly ------------------------------------------------------------


async def test_emulator_idle_close_and_what_counts_as_keepalive(deepgram: DeepgramEmulator) -> None:
    ctx = test_certificates().client_context()
    async with connect(raw_url(deepgram), additional_headers=raw_headers(), ssl=ctx) as ws:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        # A KeepAlive sent as a binary frame does not count; WebSocket pings do not either.
        while loop.time() - t0 < IDLE * 0.6:
            await ws.send(json.dumps({"type": "KeepAlive"}).encode())
            await (await ws.ping())
            await asyncio.sleep(IDLE / 5)
        with pytest.raises(ConnectionClosed) as info:
            await ws.recv()
        assert info.value.rcvd is not None
        assert (info.value.rcvd.code, info.value.rcvd.reason) == (1011, "NET-0001")
        assert IDLE * 0.9 <= loop.time() - t0 < IDLE * 3
    assert deepgram.idle_closes == 1
    assert deepgram.binary_keepalives >= 2
    assert deepgram.keepalives == 0

    async with connect(raw_url(deepgram), additional_headers=raw_headers(), ssl=ctx) as ws:
        t0 = loop.time()
        while loop.time() - t0 < IDLE * 2:  # text KeepAlive every third of the window
            await ws.send(json.dumps({"type": "KeepAlive"}))
            await asyncio.sleep(IDLE / 3)
        await ws.send(b"")  # an empty binary frame closes the stream politely
        meta = json.loads(await ws.recv())
        assert meta["type"] == "Metadata"
        with pytest.raises(ConnectionClosed) as info:
            await ws.recv()
        assert info.value.rcvd is not None
        assert info.value.rcvd.code == 1000
    assert deepgram.idle_closes == 1
    assert deepgram.keepalives >= 5


async def test_emulator_handshake_rejections(deepgram: DeepgramEmulator) -> None:
    ctx = test_certificates().client_context()
    cases = [
        (raw_url(deepgram), raw_headers("wrong"), 401),
        (raw_url(deepgram), {}, 401),
        (f"{deepgram.url}/v2/elsewhere", raw_headers(), 404),
        (raw_url(deepgram, "encoding=mp5"), raw_headers(), 400),
    ]
    for url, headers, status in cases:
        with pytest.raises(InvalidStatus) as info:
            async with connect(url, additional_headers=headers, ssl=ctx):
                pass
        assert info.value.response.status_code == status
    assert deepgram.rejected == {401: 2, 404: 1, 400: 1}
    assert deepgram.accepted == 0


async def test_emulator_concurrency_limit_and_malformed_input() -> None:
    async with DeepgramEmulator(api_key=API_KEY, max_concurrency=1) as server:
        async with connect(raw_url(server), additional_headers=raw_headers()) as ws:
            with pytest.raises(InvalidStatus) as info:
                async with connect(raw_url(server), additional_headers=raw_headers()):
                    pass
            assert info.value.response.status_code == 429
            await ws.send("{not json")
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1008
        assert server.malformed_inputs == 1
        await server.wait_sessions(0)
        async with connect(raw_url(server), additional_headers=raw_headers()):
            pass  # the slot is free again


# -- pools ---------------------------------------------------------------------------------------


async def test_pool_warms_at_start_and_transcribes(deepgram: DeepgramEmulator) -> None:
    async with Pool(adapter(deepgram), settings(min_size=2), name="asr") as pool:
        assert pool.lease_mode is LeaseMode.SINGLE_USE
        stats = pool.stats()
        assert (stats.size, stats.idle, stats.connects) == (2, 2, 2)
        assert deepgram.accepted == 2  # warm before the first call
        warm_ports = {s.ws.remote_address[1] for s in deepgram.sessions.values()}
        async with pool.acquire() as lease:
            stream = lease.conn
            assert isinstance(stream, DeepgramConnection)
            assert stream.ws.local_address[1] in warm_ports  # the call got a warm socket
            await stream.send_audio(b"hello")
            await stream.send_audio(b"world")
            first = await stream.recv()
            assert isinstance(first, Transcript)
            assert first.text == "hello"
            assert not first.is_final
            await stream.finalize()
            await stream.close_stream()
            texts = [t async for t in stream.transcripts()]
            assert texts[-1].is_final
            assert texts[-1].from_finalize
            assert texts[-1].text == "hello world"
            assert stream.metadata is not None
        await wait_until(lambda: pool.stats().closed.get("used") == 1, what="used stream closed")
        await wait_until(lambda: pool.stats().idle >= 2, what="spares refilled")
    assert deepgram.close_streams >= 1
    assert deepgram.idle_closes == 0


async def test_idle_pool_survives_idle_close_only_with_keepalive(
    deepgram: DeepgramEmulator,
) -> None:
    # max_size = min_size: the engine may open a third spare while one is being pinged.
    async with Pool(adapter(deepgram), settings(min_size=2, max_size=2), name="asr") as pool:
        await asyncio.sleep(IDLE * 2.5)  # the thing under test is the passage of time
        assert deepgram.idle_closes == 0
        assert deepgram.accepted == 2  # the same two sockets, kept open
        assert deepgram.keepalives >= 4
        assert pool.stats().closed == {}
        async with pool.acquire() as lease:
            await lease.conn.send_audio(b"still")
            assert (await lease.conn.recv()).text == "still"

    # The same pool without the provider keepalive: WebSocket pings alone do not count.
    quiet = adapter(deepgram, keepalive=False)
    async with Pool(quiet, settings(min_size=2, max_size=2), name="asr-quiet") as pool:
        await wait_until(lambda: deepgram.idle_closes >= 2, timeout=IDLE * 4, what="idle closes")
        await wait_until(
            lambda: sum(pool.stats().closed.values()) >= 2, what="pool saw the idle closes"
        )
        await wait_until(lambda: pool.stats().idle == 2, what="refill")


async def test_black_holed_socket_is_replaced_by_the_ping(deepgram: DeepgramEmulator) -> None:
    async with FaultProxy("127.0.0.1", deepgram.port) as proxy:
        url = f"wss://127.0.0.1:{proxy.port}"
        ad = adapter(deepgram, url=url, reuse=True)
        async with Pool(ad, settings(min_size=2, max_size=2), name="asr") as pool:
            async with pool.acquire() as lease:
                old = {id(lease.conn)}
            first_two = proxy.connections
            assert len(first_two) == 2
            proxy.black_hole(new_connections=False)  # the two sockets go silent, nothing closes
            await wait_until(
                lambda: pool.stats().closed.get("ping_failed", 0) >= 2, what="pings to fail"
            )
            await wait_until(lambda: pool.stats().idle == 2, what="replacements")
            async with pool.acquire() as lease:
                assert id(lease.conn) not in old
                await lease.conn.send_audio(b"fresh")
                assert (await lease.conn.recv()).text == "fresh"
            assert proxy.accepted >= 4  # two replacements through the proxy
            proxy.black_hole(False)


async def test_refill_with_backoff_after_reset_all(deepgram: DeepgramEmulator) -> None:
    async with FaultProxy("127.0.0.1", deepgram.port) as proxy:
        ad = adapter(deepgram, url=f"wss://127.0.0.1:{proxy.port}", reuse=True)
        async with Pool(ad, settings(min_size=2, max_size=2), name="asr") as pool:
            proxy.refuse()  # the provider is unreachable for a while
            assert await proxy.reset_all() == 2
            await wait_until(lambda: pool.stats().connect_failures >= 2, what="failed refills")
            # A local, so mypy does not keep pool.state narrowed past the awaits below.
            while_refused = pool.state
            assert while_refused in (PoolState.DEGRADED, PoolState.UNAVAILABLE)
            failures = pool.stats().connect_failures
            assert failures < 40  # backed off, not a hot loop
            proxy.refuse(False)
            await wait_until(lambda: pool.stats().idle == 2, what="refill", timeout=8)
            assert pool.state is PoolState.READY
            async with pool.acquire() as lease:
                await lease.conn.send_audio(b"back")
                assert (await lease.conn.recv()).text == "back"


async def test_429_backs_off_without_opening_the_circuit() -> None:
    emulator = DeepgramEmulator(tls=True, api_key=API_KEY, max_concurrency=1)
    async with (
        emulator as server,
        Pool(adapter(server), settings(min_size=2, max_size=2), name="asr") as pool,
    ):
        await wait_until(lambda: pool.stats().connect_failures >= 2, what="429s")
        assert server.rejected[429] >= 2
        assert pool.state is PoolState.DEGRADED  # not UNAVAILABLE: 429 is not fatal
        err = pool.last_error
        assert isinstance(err, ConnectError)
        assert err.status == 429
        assert not err.fatal
        assert "HTTP 429" in str(err)
        async with pool.acquire() as lease:  # the one socket still serves
            await lease.conn.send_audio(b"ok")


async def test_401_opens_the_circuit_with_a_clear_error(deepgram: DeepgramEmulator) -> None:
    bad = adapter(deepgram, api_key="sk-wrong-secret-123")
    pool = Pool(bad, settings(min_size=2), name="asr")
    with pytest.raises(PoolUnavailable) as info:
        await pool.start()
    cause = info.value.__cause__
    assert isinstance(cause, ConnectError)
    assert cause.fatal
    assert cause.status == 401
    assert "API key was rejected" in str(cause)
    assert "sk-wrong-secret-123" not in str(info.value) + str(cause) + repr(bad)

    pool = Pool(bad, settings(min_size=2), name="asr")
    await pool.start(require_ready=False)
    try:
        assert pool.state is PoolState.UNAVAILABLE
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(PoolUnavailable):
            async with pool.acquire():
                pass
        assert loop.time() - t0 < 0.5  # fails fast, not after acquire_timeout
    finally:
        await pool.aclose()


async def test_malformed_frame_discards_that_socket_only(deepgram: DeepgramEmulator) -> None:
    ad = adapter(deepgram, reuse=True)
    async with Pool(ad, settings(min_size=2, max_size=2), name="asr") as pool:
        victim, survivor = list(deepgram.sessions.values())
        await victim.send_raw('{"type": "Results", "channel": ')  # truncated JSON
        await wait_until(lambda: sum(pool.stats().closed.values()) == 1, what="discard")
        await wait_until(lambda: pool.stats().idle == 2, what="refill")
        assert survivor.id in deepgram.sessions  # untouched
        assert victim.id not in deepgram.sessions
        # The client closed it with 1002 (protocol error).
        await wait_until(lambda: deepgram.close_codes[1002] == 1, what="1002 close")
        for _ in range(2):
            async with pool.acquire() as lease:
                await lease.conn.send_audio(b"fine")
                assert (await lease.conn.recv()).text == "fine"


async def test_reuse_mode_finalizes_and_cleans_between_holders(
    deepgram: DeepgramEmulator,
) -> None:
    ad = adapter(deepgram, reuse=True)
    async with Pool(ad, settings(min_size=1, max_size=1), name="asr") as pool:
        assert pool.lease_mode is LeaseMode.EXCLUSIVE
        async with pool.acquire() as lease:
            await lease.conn.send_audio(b"first caller")  # leaves an unread interim result
        async with pool.acquire() as lease:
            stream = lease.conn
            await stream.send_audio(b"second")
            event = await stream.recv()
            assert isinstance(event, Transcript)
            assert event.text == "second"
            assert deepgram.finalizes == 1  # the reset between the two holders
        assert deepgram.accepted == 1


async def test_held_stream_keeps_itself_alive(deepgram: DeepgramEmulator) -> None:
    async with (
        Pool(adapter(deepgram), settings(min_size=1), name="asr") as pool,
        pool.acquire() as lease,
    ):
        await asyncio.sleep(IDLE * 2)  # a muted caller: no audio for two idle windows
        await lease.conn.send_audio(b"unmuted")
        assert (await lease.conn.recv()).text == "unmuted"
        assert lease.conn.keepalives_sent >= 3
    assert deepgram.idle_closes == 0


async def test_socket_closed_by_server_under_a_holder(deepgram: DeepgramEmulator) -> None:
    ad = adapter(deepgram, reuse=True)
    async with Pool(ad, settings(min_size=1, max_size=1), name="asr") as pool:
        async with pool.acquire() as lease:
            await deepgram.close_all(1011, "server restart")
            with pytest.raises(StreamClosed) as info:
                await lease.conn.recv()
            assert info.value.code == 1011
            with pytest.raises(StreamClosed):
                await lease.conn.send_audio(b"late")
        await wait_until(lambda: pool.stats().idle == 1, what="replacement")


def test_options_url_and_secrets(caplog: pytest.LogCaptureFixture) -> None:
    ad = DeepgramAdapter(
        api_key="sk-live-abc", model="nova-3", endpointing=False, params={"diarize": "true"}
    )
    url = ad.url()
    assert url.startswith("wss://api.deepgram.com/v1/listen?model=nova-3&encoding=linear16")
    assert "endpointing=false" in url
    assert "diarize=true" in url
    assert ad.describe() == "DeepgramAdapter wss://api.deepgram.com/v1/listen"
    assert "sk-live-abc" not in repr(ad.options) + repr(ad) + ad.describe()
    assert ("Authorization", "Token sk-live-abc") in ad.request_headers()
    with pytest.raises(ValueError, match="keepalive_interval"):
        DeepgramAdapter(max_idle=3, keepalive_interval=4)
    with pytest.raises(ValueError, match="url"):
        DeepgramAdapter(url="https://api.deepgram.com")
    with pytest.raises(ValueError, match="credentials"):
        DeepgramAdapter(url="wss://user:pw@api.deepgram.com")
    assert DeepgramAdapter(reuse=True).lease_mode is LeaseMode.EXCLUSIVE
    assert DeepgramAdapter().lease_mode is LeaseMode.SINGLE_USE


async def test_handshake_log_redacts_the_key(
    deepgram: DeepgramEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    ad = adapter(deepgram)
    with caplog.at_level(logging.DEBUG, logger="voicepool.adapters.websocket.wire"):
        conn = await ad.connect()
        await ad.close(conn)
    text = caplog.text
    assert "> Authorization: [redacted]" in text
    assert API_KEY not in text

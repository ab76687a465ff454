"""ElevenLabs: multi-context sockets shared by leases, over real TLS to the emulator."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from voicepool import LeaseMode, Pool, PoolExhausted
from voicepool.adapters._tts import ContextError
from voicepool.adapters.elevenlabs import ElevenLabsAdapter
from voicepool.adapters.websocket import StreamClosed
from voicepool.testing import test_certificates, wait_until
from voicepool.testing.tts import ElevenLabsEmulator, synthesize

from ._util import API_KEY, IDLE, settings

TEXT = "The quick brown fox. "


def adapter(server: ElevenLabsEmulator, **kw: object) -> ElevenLabsAdapter:
    opts: dict[str, object] = {
        "url": server.url,
        "api_key": API_KEY,
        "ca_file": server.ca_file,
        "max_idle": IDLE,
        "close_timeout": 1.0,
    }
    opts.update(kw)
    return ElevenLabsAdapter(**opts)


async def speak(pool: Pool[object], text: str = TEXT) -> bytes:
    async with pool.acquire() as lease:
        ctx = lease.conn.context(lease.stream_id)  # type: ignore[attr-defined]
        return b"".join([chunk async for chunk in ctx.synthesize(text)])


async def test_emulator_closes_a_socket_that_opens_a_sixth_context(
    elevenlabs: ElevenLabsEmulator,
) -> None:
    url = f"{elevenlabs.url}/v1/text-to-speech/v1/multi-stream-input?inactivity_timeout=20"
    ctx = test_certificates().client_context()
    async with connect(url, additional_headers={"xi-api-key": API_KEY}, ssl=ctx) as ws:
        for i in range(6):
            await ws.send(json.dumps({"context_id": f"c{i}", "text": " "}))
        error = json.loads(await ws.recv())
        assert error["error"] == "max_active_conversations"
        with pytest.raises(ConnectionClosed) as info:
            await ws.recv()
        assert info.value.rcvd is not None
        assert info.value.rcvd.code == 1008
        assert "Maximum simultaneous contexts" in info.value.rcvd.reason
    assert elevenlabs.context_limit_closes == 1


async def test_pool_warms_and_contexts_carry_their_own_audio(
    elevenlabs: ElevenLabsEmulator,
) -> None:
    ad = adapter(elevenlabs)
    assert ad.lease_mode is LeaseMode.MULTIPLEXED
    async with Pool(ad, settings(concurrency=8), name="tts") as pool:
        assert pool.max_streams == 5
        assert pool.stats().size == 2  # ceil(8 * 1.25 / 5)
        assert elevenlabs.accepted == 2
        texts = [f"Sentence number {i}. " for i in range(8)]
        audios = await asyncio.gather(*(speak(pool, t) for t in texts))
        for text, audio in zip(texts, audios, strict=True):
            assert audio == synthesize(text, elevenlabs.bytes_per_char)
        assert elevenlabs.accepted == 2
        await wait_until(lambda: elevenlabs.contexts_open == 0, what="contexts closed")
    assert elevenlabs.contexts_opened == 8
    assert elevenlabs.context_limit_closes == 0


async def test_a_sixth_context_is_never_opened_on_a_full_socket(
    elevenlabs: ElevenLabsEmulator,
) -> None:
    elevenlabs.chunk_interval = 0.01  # turns overlap

    async def turn(pool: Pool[object], text: str) -> bytes:
        async with pool.acquire() as lease:
            ctx = lease.conn.context(lease.stream_id)  # type: ignore[attr-defined]
            await ctx.send_text(text)
            await ctx.flush()  # speak while the LLM still streams: the context stays open
            audio = ctx.audio()
            got = await anext(audio)
            await ctx.end()
            return got + b"".join([chunk async for chunk in audio])

    async with Pool(adapter(elevenlabs), settings(min_size=1, max_size=2), name="tts") as pool:
        texts = [f"Turn {i} is a longer sentence. " for i in range(12)]
        audios = await asyncio.gather(*(turn(pool, t) for t in texts))
        for text, audio in zip(texts, audios, strict=True):
            assert audio == synthesize(text, elevenlabs.bytes_per_char)
    assert elevenlabs.max_contexts_per_socket == 5  # full sockets...
    assert elevenlabs.context_limit_closes == 0  # ...and never a sixth context
    assert elevenlabs.close_codes[1008] == 0
    assert elevenlabs.accepted == 2


async def test_barge_in_frees_the_context_at_once(elevenlabs: ElevenLabsEmulator) -> None:
    elevenlabs.chunk_interval = 0.02  # long turns: about 2 s of chunks each
    ad = adapter(elevenlabs)
    async with Pool(ad, settings(min_size=1, max_size=1, acquire_timeout=0.3), name="tts") as pool:
        holders: list[asyncio.Task[bytes]] = []
        started = asyncio.Event()

        async def long_turn() -> bytes:
            async with pool.acquire() as lease:
                ctx = lease.conn.context(lease.stream_id)
                got = b""
                async for chunk in ctx.synthesize("x" * 3000):
                    got += chunk
                    started.set()
                return got

        holders = [asyncio.create_task(long_turn()) for _ in range(5)]
        await started.wait()
        await wait_until(lambda: pool.stats().streams_in_use == 5, what="five streams")
        with pytest.raises(PoolExhausted):  # the socket is full, and max_size is 1
            async with pool.acquire():
                pass
        holders[0].cancel()  # the caller spoke over the agent
        with pytest.raises(asyncio.CancelledError):
            await holders[0]
        assert pool.stats().streams_in_use == 4
        audio = await speak(pool, "Sure, go ahead. ")  # the freed slot, on the same socket
        assert audio == synthesize("Sure, go ahead. ", elevenlabs.bytes_per_char)
        for task in holders[1:]:
            task.cancel()
        await asyncio.gather(*holders, return_exceptions=True)
        await wait_until(lambda: elevenlabs.contexts_open == 0, what="all contexts closed")
    assert elevenlabs.accepted == 1
    assert elevenlabs.context_limit_closes == 0
    # (an idle keepalive may open the adapter's keepalive context too: issue 12 item 7)
    assert elevenlabs.contexts_opened - elevenlabs.keepalive_contexts == 6


async def test_idle_sockets_survive_only_with_keepalive(elevenlabs: ElevenLabsEmulator) -> None:
    async with Pool(adapter(elevenlabs), settings(min_size=2, max_size=2), name="tts") as pool:
        await asyncio.sleep(IDLE * 2.5)  # the thing under test is the passage of time
        assert elevenlabs.idle_closes == 0
        assert elevenlabs.accepted == 2
        assert elevenlabs.keepalives >= 4
        # A keepalive for a context the service does not know is that context's first message:
        # the adapter's idle keepalive opens one context per socket (issue 12 item 7).
        assert elevenlabs.contexts_opened == elevenlabs.keepalive_contexts <= 2
        assert await speak(pool)
    async with Pool(
        adapter(elevenlabs, keepalive=False), settings(min_size=2, max_size=2), name="quiet"
    ) as pool:
        await wait_until(lambda: elevenlabs.idle_closes >= 2, timeout=IDLE * 4, what="closes")
        await wait_until(lambda: elevenlabs.close_codes[1008] >= 2, what="1008 closes")
        await wait_until(lambda: pool.stats().idle == 2, what="refill")


async def test_held_context_keeps_the_socket_alive(elevenlabs: ElevenLabsEmulator) -> None:
    async with (
        Pool(adapter(elevenlabs), settings(min_size=1, max_size=1), name="tts") as pool,
        pool.acquire() as lease,
    ):
        ctx = lease.conn.context(lease.stream_id)
        await ctx.send_text("Let me check that for you. ")
        await asyncio.sleep(IDLE * 2)  # the LLM thinks for two idle windows
        await ctx.send_text("Found it.")
        await ctx.end()
        assert b"".join([c async for c in ctx.audio()])
    assert elevenlabs.idle_closes == 0


async def test_failed_context_keeps_the_socket(elevenlabs: ElevenLabsEmulator) -> None:
    async with Pool(adapter(elevenlabs), settings(min_size=1, max_size=1), name="tts") as pool:
        with pytest.raises(ContextError, match="quota"):
            async with pool.acquire() as lease:
                ctx = lease.conn.context(lease.stream_id)
                await ctx.send_text("Hello ")
                [session] = elevenlabs.sessions.values()
                error = {"message": "quota exceeded", "error": "quota", "contextId": ctx.context_id}
                await session.send_raw(json.dumps(error))
                async for _ in ctx.audio():
                    pass
        assert pool.stats().closed == {}  # the shared socket survived
        assert await speak(pool)
    assert elevenlabs.accepted == 1


async def test_malformed_frame_discards_that_socket_only(elevenlabs: ElevenLabsEmulator) -> None:
    elevenlabs.chunk_interval = 0.01
    async with Pool(adapter(elevenlabs), settings(min_size=2, max_size=2), name="tts") as pool:
        first, second = list(elevenlabs.sessions.values())

        async def turn_on(session_id: int) -> bytes | BaseException:
            try:
                async with pool.acquire() as lease:
                    ctx = lease.conn.context(lease.stream_id)
                    await ctx.send_text("y" * 599 + " ")
                    await ctx.end()
                    return b"".join([c async for c in ctx.audio()])
            except StreamClosed as exc:
                return exc

        turns = [asyncio.create_task(turn_on(i)) for i in range(4)]  # two per socket
        await wait_until(lambda: pool.stats().streams_in_use == 4, what="four streams")
        await first.send_raw('{"audio": "%%% not base64", "contextId": "vp1"}')
        results = await asyncio.gather(*turns)
        failed = [r for r in results if isinstance(r, StreamClosed)]
        assert len(failed) == 2  # the two turns on the broken socket
        assert all(isinstance(r, bytes) and len(r) == 600 * 32 for r in results if r not in failed)
        await wait_until(lambda: pool.stats().idle == 2, what="replacement")
        assert second.id in elevenlabs.sessions
        assert sum(pool.stats().closed.values()) == 1
        assert await speak(pool)


async def test_socket_closed_by_server_fails_its_contexts(elevenlabs: ElevenLabsEmulator) -> None:
    async with Pool(adapter(elevenlabs), settings(min_size=1, max_size=1), name="tts") as pool:
        with pytest.raises(StreamClosed) as info:
            async with pool.acquire() as lease:
                ctx = lease.conn.context(lease.stream_id)
                await ctx.send_text("Hello ")
                await elevenlabs.close_all(1011, "internal error")
                async for _ in ctx.audio():
                    pass
        assert info.value.code == 1011
        await wait_until(lambda: pool.stats().idle == 1, what="replacement")
        assert await speak(pool)


def test_url_options_and_validation() -> None:
    ad = ElevenLabsAdapter(api_key="xi-secret", voice_id="voice/1", inactivity_timeout=60)
    assert ad.url() == (
        "wss://api.elevenlabs.io/v1/text-to-speech/voice%2F1/multi-stream-input"
        "?model_id=eleven_flash_v2_5&output_format=pcm_16000&inactivity_timeout=60"
    )
    assert ad.max_idle == 60
    assert ("xi-api-key", "xi-secret") in ad.request_headers()
    assert "xi-secret" not in repr(ad.options) + ad.describe()
    with pytest.raises(ValueError, match="max_contexts"):
        ElevenLabsAdapter(max_contexts=6)
    with pytest.raises(ValueError, match="inactivity_timeout"):
        ElevenLabsAdapter(inactivity_timeout=181)


async def test_keepalive_takes_no_context_slot(elevenlabs: ElevenLabsEmulator) -> None:
    """A keepalive naming a context opens it at ElevenLabs: five real contexts must still fit
    on a socket that was kept alive while idle."""
    ad = adapter(elevenlabs)
    async with Pool(ad, settings(min_size=1, max_size=1), name="tts") as pool:
        await wait_until(lambda: elevenlabs.keepalives >= 2, timeout=IDLE * 4, what="keepalives")
        assert elevenlabs.contexts_open == 0
        elevenlabs.chunk_interval = 0.01
        async with contextlib.AsyncExitStack() as stack:
            leases = [await stack.enter_async_context(pool.acquire()) for _ in range(5)]
            contexts = [lease.conn.context(lease.stream_id) for lease in leases]
            for n, ctx in enumerate(contexts):
                await ctx.send_text(f"Turn {n}. ")
            for ctx in contexts:
                await ctx.end()
                assert b"".join([c async for c in ctx.audio()])
    assert elevenlabs.context_limit_closes == 0
    assert elevenlabs.contexts_opened == 5
    assert elevenlabs.accepted == 1


async def test_emulator_opens_a_context_for_a_keepalive_that_names_one(
    elevenlabs: ElevenLabsEmulator,
) -> None:
    url = f"{elevenlabs.url}/v1/text-to-speech/v1/multi-stream-input?inactivity_timeout=20"
    ctx = test_certificates().client_context()
    async with connect(url, additional_headers={"xi-api-key": API_KEY}, ssl=ctx) as ws:
        await ws.send(json.dumps({"text": ""}))  # context-less: no slot
        await ws.send(json.dumps({"context_id": "ka", "text": ""}))  # names one: opens it
        await (await ws.ping())
        assert elevenlabs.contexts_open == 1
        assert elevenlabs.keepalives == 2

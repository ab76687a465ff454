"""The official ``deepgram-sdk`` (listen v1 socket) against DeepgramEmulator over TLS: audio in,
interim and final Results, SpeechStarted, UtteranceEnd, Finalize, Configure, CloseStream and
Metadata, each parsed message validated against the SDK's type; bad key, 429, idle close."""

from __future__ import annotations

import asyncio
import warnings
from typing import Any

import pytest
from deepgram import AsyncDeepgramClient
from deepgram.core.api_error import ApiError
from deepgram.environment import DeepgramClientEnvironment
from deepgram.listen.v1.types import (
    ListenV1Configure,
    ListenV1ConfigureSuccess,
    ListenV1Metadata,
    ListenV1Results,
    ListenV1SpeechStarted,
    ListenV1UtteranceEnd,
)
from websockets.exceptions import ConnectionClosed

from voicepool.testing import DeepgramEmulator

from .conftest import BAD_KEY, KEY, strict

# deepgram-sdk imports websockets' legacy client (deprecated in websockets 14+).
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
SILENCE = b"\x00\x01" * 1600  # 100 ms of 16 kHz linear16 that is heard as nothing


def client(server: DeepgramEmulator, key: str = KEY) -> AsyncDeepgramClient:
    env = DeepgramClientEnvironment(
        base=server.url.replace("wss", "https"),
        production=server.url,
        agent=server.url,
        agent_rest=server.url.replace("wss", "https"),
    )
    return AsyncDeepgramClient(api_key=key, environment=env)


async def recv_all(socket: Any) -> list[Any]:
    out = []
    try:
        while True:
            out.append(await socket.recv())
    except ConnectionClosed:
        return out


async def test_streaming_session(ca_env: str) -> None:
    async with DeepgramEmulator(tls=True, api_key=KEY) as server:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            dg = client(server)
        async with dg.listen.v1.connect(
            model="nova-3",
            encoding="linear16",
            sample_rate="16000",
            interim_results="true",
            vad_events="true",
            utterance_end_ms="1000",
        ) as socket:
            await socket.send_media(b"hello world")
            started = await socket.recv()
            interim = await socket.recv()
            await socket.send_configure(ListenV1Configure(keyterms=["voicepool"]))
            configured = await socket.recv()
            await socket.send_media(b"again")
            messages = [await socket.recv() for _ in range(1)]
            for _ in range(11):  # 1.1 s of silence: the utterance ends
                await socket.send_media(SILENCE)
            await socket.send_finalize()
            await socket.send_keep_alive()
            await socket.send_close_stream()
            messages += await recv_all(socket)
    assert isinstance(started, ListenV1SpeechStarted)
    assert started.timestamp == 0
    assert isinstance(interim, ListenV1Results)
    assert interim.is_final is False
    assert interim.channel.alternatives[0].transcript == "hello world"
    assert isinstance(configured, ListenV1ConfigureSuccess)
    assert configured.keyterms == ["voicepool"]
    kinds = [type(m).__name__ for m in messages]
    assert "ListenV1SpeechStarted" not in kinds  # speech continued: no new start
    ends = [m for m in messages if isinstance(m, ListenV1UtteranceEnd)]
    assert len(ends) == 1
    finals = [m for m in messages if isinstance(m, ListenV1Results) and m.is_final]
    assert finals[0].from_finalize is True
    assert finals[0].channel.alternatives[0].transcript == "hello world again"
    assert isinstance(messages[-1], ListenV1Metadata)
    for message in [started, interim, configured, *messages]:
        strict(type(message), message.model_dump(by_alias=True, exclude_unset=True))
    assert server.configures == 1
    assert server.finalizes == 1
    assert server.close_codes[1000] == 1


async def test_speech_started_after_silence(ca_env: str) -> None:
    async with DeepgramEmulator(tls=True, api_key=KEY) as server:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            dg = client(server)
        async with dg.listen.v1.connect(model="nova-3", vad_events="true") as socket:
            await socket.send_media(SILENCE)
            await socket.send_media(b"hi")
            started = await socket.recv()
            await socket.send_close_stream()
            rest = await recv_all(socket)
    assert isinstance(started, ListenV1SpeechStarted)
    assert started.timestamp == pytest.approx(0.1)
    strict(ListenV1SpeechStarted, started.model_dump(exclude_unset=True))
    assert isinstance(rest[-1], ListenV1Metadata)


async def test_endpointing_ends_the_utterance_with_speech_final(ca_env: str) -> None:
    """With endpointing on, the silence after a word ends the utterance: a final Results with
    speech_final (what frameworks' STT-driven turn detection waits for); endpointing=false never
    does."""
    async with DeepgramEmulator(tls=True, api_key=KEY, endpointing=True) as server:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            dg = client(server)
        async with dg.listen.v1.connect(
            model="nova-3", endpointing="150", interim_results="true"
        ) as socket:
            await socket.send_media(b"hello there")
            interim = await socket.recv()
            await socket.send_media(SILENCE)  # 100 ms: not yet
            still = await socket.recv()
            await socket.send_media(SILENCE)  # 200 ms >= 150 ms
            final = await socket.recv()
            await socket.send_media(SILENCE)  # nothing left to end
            after = await socket.recv()
            await socket.send_close_stream()
            await recv_all(socket)
        async with dg.listen.v1.connect(
            model="nova-3", endpointing="false", interim_results="true"
        ) as socket:
            await socket.send_media(b"hi")
            for _ in range(3):
                await socket.send_media(SILENCE)
            off = [await socket.recv() for _ in range(4)]
            await socket.send_close_stream()
            await recv_all(socket)
    assert isinstance(final, ListenV1Results)
    assert (interim.is_final, still.is_final) == (False, False)
    assert final.is_final is True
    assert final.speech_final is True
    assert final.from_finalize is False
    assert final.channel.alternatives[0].transcript == "hello there"
    strict(ListenV1Results, final.model_dump(by_alias=True, exclude_unset=True))
    assert after.is_final is False
    assert after.channel.alternatives[0].transcript == ""
    assert not any(m.is_final for m in off)
    assert server.endpoints == 1


async def test_bad_key_429_and_idle_close(ca_env: str) -> None:
    async with DeepgramEmulator(
        tls=True, api_key=KEY, max_concurrency=1, idle_timeout=0.3
    ) as server:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            bad, good = client(server, BAD_KEY), client(server)
        with pytest.raises(ApiError) as auth:
            async with bad.listen.v1.connect(model="nova-3"):
                pass
        assert auth.value.status_code == 401
        async with good.listen.v1.connect(model="nova-3") as socket:
            with pytest.raises(ApiError) as limited:
                async with good.listen.v1.connect(model="nova-3"):
                    pass
            assert limited.value.status_code == 429
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(socket.recv(), 5)
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1011, "NET-0001")

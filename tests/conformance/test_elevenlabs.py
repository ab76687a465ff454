"""The official ``elevenlabs`` SDK against ElevenLabsEmulator over TLS: single-context
stream-input through ``convert_realtime``; multi-context sockets written with the SDK's message
types and every server message validated against its receive types; bad key, key in the first
message, eleven_v3, the keepalive that opens a context, voice_settings after the first message,
the 5-context limit, idle close."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import pytest
from elevenlabs import ElevenLabs
from elevenlabs.core.api_error import ApiError
from elevenlabs.types import (
    AudioOutput,
    AudioOutputMulti,
    CloseContext,
    FinalOutput,
    FinalOutputMulti,
    InitializeConnectionMulti,
    KeepContextAlive,
    SendTextMulti,
)
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from voicepool.testing import ElevenLabsEmulator, test_certificates
from voicepool.testing.tts import synthesize

from .conftest import BAD_KEY, KEY, strict

VOICE = "21m00Tcm4TlvDq8ikWAM"
# convert_realtime reads ConnectionClosed.code, deprecated in websockets 13.1+.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def wire(message: Any) -> str:
    return json.dumps(message.dict(by_alias=True, exclude_none=True))


def parse_multi(raw: str | bytes) -> AudioOutputMulti | FinalOutputMulti:
    data = json.loads(raw)
    model = FinalOutputMulti if "isFinal" in data else AudioOutputMulti
    parsed = strict(model, data)
    assert isinstance(parsed, AudioOutputMulti | FinalOutputMulti)
    return parsed


async def test_convert_realtime_single_context(ca_env: str) -> None:
    async with ElevenLabsEmulator(tls=True, api_key=KEY) as server:
        el = ElevenLabs(api_key=KEY, base_url=server.url.replace("wss", "https"))
        chunks = await asyncio.to_thread(
            lambda: list(
                el.text_to_speech.convert_realtime(
                    VOICE, text=iter(["Hello ", "there."]), model_id="eleven_flash_v2_5"
                )
            )
        )
        assert b"".join(chunks) == synthesize("Hello there. ", server.bytes_per_char)
        await server.wait_sessions(0)
        assert server.close_codes[1000] == 1
        # What the SDK parsed, validated against its own receive types.
        url = f"{server.url}/v1/text-to-speech/{VOICE}/stream-input"
        async with connect(url, ssl=test_certificates().client_context()) as ws:
            await ws.send(json.dumps({"text": " ", "xi_api_key": KEY}))
            await ws.send(json.dumps({"text": "Hi. "}))
            await ws.send(json.dumps({"text": ""}))
            messages = [json.loads(m) async for m in ws]
        strict(AudioOutput, messages[0])
        strict(FinalOutput, messages[-1])
        assert messages[-1] == {"isFinal": True}


async def test_multi_context_session() -> None:
    async with ElevenLabsEmulator(tls=True, api_key=KEY) as server:
        url = (
            f"{server.url}/v1/text-to-speech/{VOICE}/multi-stream-input?model_id=eleven_flash_v2_5"
        )
        ssl = test_certificates().client_context()
        async with connect(url, ssl=ssl) as ws:  # the key in the first message, not a header
            init = InitializeConnectionMulti(context_id="a", xi_api_key=KEY, voice_settings=None)
            await ws.send(wire(init))
            await ws.send(wire(InitializeConnectionMulti(context_id="b")))
            await ws.send(wire(SendTextMulti(context_id="a", text="One. ", flush=True)))
            await ws.send(wire(SendTextMulti(context_id="b", text="Two. ", flush=True)))
            await ws.send(wire(KeepContextAlive(context_id="a")))
            await ws.send(wire(CloseContext(context_id="a", close_context=True)))
            await ws.send(wire(CloseContext(context_id="b", close_context=True)))
            audio: dict[str, bytes] = {"a": b"", "b": b""}
            finals: set[str] = set()
            while len(finals) < 2:
                msg = parse_multi(await ws.recv())
                assert msg.context_id is not None
                if isinstance(msg, FinalOutputMulti):
                    finals.add(msg.context_id)
                else:
                    audio[msg.context_id] += base64.b64decode(msg.audio)
            await ws.send(json.dumps({"close_socket": True}))
        assert audio["a"] == synthesize("One. ", server.bytes_per_char)
        assert audio["b"] == synthesize("Two. ", server.bytes_per_char)
        await server.wait_sessions(0)
        assert server.close_codes[1000] == 1


async def closed_by(ws: Any) -> tuple[dict[str, Any], int, str]:
    error = json.loads(await ws.recv())
    with pytest.raises(ConnectionClosed) as info:
        await ws.recv()
    assert info.value.rcvd is not None
    return error, info.value.rcvd.code, info.value.rcvd.reason


async def test_documented_errors() -> None:
    async with ElevenLabsEmulator(tls=True, api_key=KEY, idle_timeout=0.3) as server:
        base = f"{server.url}/v1/text-to-speech/{VOICE}/multi-stream-input"
        ssl = test_certificates().client_context()
        with pytest.raises(InvalidStatus) as bad:
            async with connect(base, ssl=ssl, additional_headers={"xi-api-key": BAD_KEY}):
                pass
        assert bad.value.response.status_code == 401
        with pytest.raises(InvalidStatus) as v3:
            async with connect(base + "?model_id=eleven_v3", ssl=ssl):
                pass
        assert v3.value.response.status_code == 403
        hdr = {"xi-api-key": KEY}
        async with connect(base, ssl=ssl) as ws:  # no header, no key in the first message
            await ws.send(wire(InitializeConnectionMulti(context_id="a")))
            assert (await closed_by(ws))[1] == 1008
        # A keepalive for an unknown context is its first message: voice_settings later -> 1008.
        async with connect(base, ssl=ssl, additional_headers=hdr) as ws:
            await ws.send(wire(KeepContextAlive(context_id="k")))
            settings = {"stability": 0.5, "similarity_boost": 0.8}
            await ws.send(json.dumps({"context_id": "k", "text": " ", "voice_settings": settings}))
            _, code, reason = await closed_by(ws)
        assert (code, reason) == (
            1008,
            "voice_settings field must be provided in the first message",
        )
        # Keepalives for five unknown contexts fill the socket: a sixth context closes it.
        async with connect(base, ssl=ssl, additional_headers=hdr) as ws:
            for i in range(5):
                await ws.send(wire(KeepContextAlive(context_id=f"k{i}")))
            await ws.send(wire(InitializeConnectionMulti(context_id="real")))
            error, code, reason = await closed_by(ws)
        assert error["error"] == "max_active_conversations"
        assert code == 1008
        assert "Maximum simultaneous contexts" in reason
        async with connect(base, ssl=ssl, additional_headers=hdr) as ws:
            with pytest.raises(ConnectionClosed) as idle:
                await asyncio.wait_for(ws.recv(), 5)
        assert idle.value.rcvd is not None
        assert (idle.value.rcvd.code, idle.value.rcvd.reason) == (1008, "input_timeout_exceeded")


async def test_sdk_reports_429_over_the_concurrency_limit(ca_env: str) -> None:
    async with ElevenLabsEmulator(tls=True, api_key=KEY, max_concurrency=1) as server:
        hdr = {"xi-api-key": KEY}
        url = f"{server.url}/v1/text-to-speech/{VOICE}/multi-stream-input"
        async with connect(url, ssl=test_certificates().client_context(), additional_headers=hdr):
            el = ElevenLabs(api_key=KEY, base_url=server.url.replace("wss", "https"))
            with pytest.raises(InvalidStatus) as over:
                await asyncio.to_thread(
                    lambda: list(el.text_to_speech.convert_realtime(VOICE, text=iter(["Hi. "])))
                )
    assert over.value.response.status_code == 429


async def test_sdk_reports_a_bad_key(ca_env: str) -> None:
    async with ElevenLabsEmulator(tls=True, api_key=KEY) as server:
        el = ElevenLabs(api_key=BAD_KEY, base_url=server.url.replace("wss", "https"))
        with pytest.raises((ApiError, InvalidStatus)):
            await asyncio.to_thread(
                lambda: list(el.text_to_speech.convert_realtime(VOICE, text=iter(["Hi. "])))
            )

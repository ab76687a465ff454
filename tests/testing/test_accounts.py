"""Account limits in the emulators (issue 15 item 3): ``max_concurrency`` is counted per API key
across every connection the emulator serves, with the provider's 429, and other keys (other
accounts) are not affected."""

from __future__ import annotations

import contextlib
import json

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from voicepool.testing import (
    CartesiaEmulator,
    DeepgramEmulator,
    ElevenLabsEmulator,
    test_certificates,
)

A, B = "account-a", "account-b"


async def opened(
    stack: contextlib.AsyncExitStack, url: str, headers: dict[str, str]
) -> ClientConnection:
    ssl = test_certificates().client_context()
    return await stack.enter_async_context(connect(url, additional_headers=headers, ssl=ssl))


async def test_deepgram_streams_are_limited_per_account() -> None:
    async with (
        DeepgramEmulator(tls=True, api_key=A, extra_keys=(B,), max_concurrency=2) as server,
        contextlib.AsyncExitStack() as stack,
    ):
        url = f"{server.url}/v1/listen"
        for _ in range(2):  # two connections (two "workers") of account A
            await opened(stack, url, {"Authorization": f"Token {A}"})
        with pytest.raises(InvalidStatus) as over:
            await opened(stack, url, {"Authorization": f"Token {A}"})
        assert over.value.response.status_code == 429
        for _ in range(2):  # account B has its own 2
            await opened(stack, url, {"Authorization": f"Token {B}"})
        assert server.rejected[429] == 1
        assert server.active == 4


async def test_elevenlabs_sockets_are_limited_per_account() -> None:
    async with (
        ElevenLabsEmulator(tls=True, api_key=A, extra_keys=(B,), max_concurrency=1) as server,
        contextlib.AsyncExitStack() as stack,
    ):
        url = f"{server.url}/v1/text-to-speech/v/multi-stream-input"
        await opened(stack, url, {"xi-api-key": A})
        with pytest.raises(InvalidStatus) as over:
            await opened(stack, url, {"xi-api-key": A})
        assert over.value.response.status_code == 429
        await opened(stack, url, {"xi-api-key": B})


async def test_cartesia_contexts_are_limited_per_account_across_sockets() -> None:
    async with (
        CartesiaEmulator(tls=True, api_key=A, extra_keys=(B,), max_concurrency=1) as server,
        contextlib.AsyncExitStack() as stack,
    ):
        server.chunk_interval = 0.05  # the first context stays active
        url = f"{server.url}/tts/websocket?cartesia_version=2026-08-14"
        request = {
            "model_id": "sonic-3",
            "voice": {"mode": "id", "id": "v"},
            "output_format": {"container": "raw", "encoding": "pcm_s16le", "sample_rate": 16000},
            "transcript": "x" * 200,
            "continue": False,
        }
        first = await opened(stack, url, {"Authorization": f"Bearer {A}"})
        second = await opened(stack, url, {"Authorization": f"Bearer {A}"})  # another socket
        other = await opened(stack, url, {"Authorization": f"Bearer {B}"})
        await first.send(json.dumps({**request, "context_id": "a1"}))
        assert json.loads(await first.recv())["type"] == "chunk"
        await second.send(json.dumps({**request, "context_id": "a2"}))
        error = json.loads(await second.recv())
        assert (error["type"], error["status_code"]) == ("error", 429)
        await other.send(json.dumps({**request, "context_id": "b1"}))
        assert json.loads(await other.recv())["type"] == "chunk"
        assert server.contexts_active_for(A) == 1

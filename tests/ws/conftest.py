"""Fixtures of the WebSocket pool tests: emulators over real TLS on 127.0.0.1, short timeouts.

Timing: every emulator idle close here is about a second and the pools ping several times inside
it; margins are generous because the machine is shared. Nothing waits on a bare sleep where an
event exists; pool statistics have no event, so ``voicepool.testing.wait_until`` polls them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from voicepool.testing.asr import DeepgramEmulator
from voicepool.testing.tts import CartesiaEmulator, ElevenLabsEmulator

from ._util import API_KEY, IDLE


@pytest.fixture
async def deepgram() -> AsyncIterator[DeepgramEmulator]:
    async with DeepgramEmulator(tls=True, api_key=API_KEY, idle_timeout=IDLE) as server:
        yield server


@pytest.fixture
async def elevenlabs() -> AsyncIterator[ElevenLabsEmulator]:
    async with ElevenLabsEmulator(tls=True, api_key=API_KEY, idle_timeout=IDLE) as server:
        yield server


@pytest.fixture
async def cartesia() -> AsyncIterator[CartesiaEmulator]:
    async with CartesiaEmulator(tls=True, api_key=API_KEY) as server:
        yield server

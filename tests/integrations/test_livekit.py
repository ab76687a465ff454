"""LiveKit Agents on a PooledSession, against the TLS emulators behind a 40 ms round trip: a real
AgentSession (Deepgram STT, OpenAI LLM, ElevenLabs TTS plugins) started without a LiveKit room,
its audio in and out set in-process, under a fake JobContext (examples/livekit_agent.py)."""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
from typing import cast

import aiohttp
import pytest

pytest.importorskip("livekit.agents")

from voicepool import Pool, PoolLoopError, PoolSettings
from voicepool.integrations.livekit import PooledSession, socket_adapter
from voicepool.testing import ElevenLabsEmulator, test_certificates, wait_until

from .conftest import load_example

lk = load_example("livekit_agent")
pytestmark = [pytest.mark.timeout(90), pytest.mark.filterwarnings("ignore::DeprecationWarning")]
KEY = "k"
RATE = 16000


def _el_url(server: ElevenLabsEmulator) -> str:
    return (
        f"{server.url}/v1/text-to-speech/v1/multi-stream-input?model_id=m&output_format=pcm_16000"
    )


def _pool(server: ElevenLabsEmulator, size: int = 1) -> Pool[aiohttp.ClientWebSocketResponse]:
    adapter = socket_adapter(
        "elevenlabs", _el_url(server), {"xi-api-key": KEY}, ca_file=server.ca_file
    )
    return Pool(adapter, PoolSettings(concurrency=size, min_size=size), name="tts")


async def test_agent_session_first_turn_pooled_vs_per_job() -> None:
    """Jobs one after another (LiveKit runs one job per process), each a real AgentSession:
    pooled, every socket opened during the join (no miss, no lease waited for a handshake), the
    first turn costs what later turns cost, and the job's shutdown closes its pools; per job, the
    first turn pays the handshakes."""
    async with lk.emulated_services() as stack:
        await lk.run_job(stack, pooled=True, turns=1)  # process warm-up (imports)
        warm = [await lk.run_job(stack, pooled=True, turns=3, join=stack.rtt) for _ in range(2)]
        cold = [await lk.run_job(stack, pooled=False, turns=3, join=stack.rtt) for _ in range(2)]
    for job in warm + cold:
        assert job.transcripts == ["hello there turn0", "hello there turn1", "hello there turn2"]
    for job in warm:
        assert (job.misses, job.cold_leases, job.pools_closed) == (0, 0, True)
    first_warm = statistics.median(j.turn_ms[0] for j in warm)
    later_warm = statistics.median(t for j in warm for t in j.turn_ms[1:])
    first_cold = statistics.median(j.turn_ms[0] for j in cold)
    assert first_warm < later_warm * 1.5  # room for a stall of a loaded machine (see Pipecat's)
    # At least the LLM's TCP + TLS round trips (the session prewarms the TTS socket at start).
    assert first_cold > first_warm + 2 * stack.rtt * 1e3


async def test_ten_overlapping_agent_sessions_on_pools() -> None:
    """Ten jobs at once in this one process (LiveKit's thread executor runs jobs side by side;
    here they share one loop, the harder case): every job's sockets were opened during its join
    (no miss, no lease waited for a handshake), every turn was heard, every job's pools closed."""
    async with lk.emulated_services() as stack:
        await lk.run_job(stack, pooled=True, turns=1)  # process warm-up (imports)
        jobs = await lk.run_jobs(stack, pooled=True, jobs=10, turns=2)
    for job in jobs:
        assert job.transcripts == ["hello there turn0", "hello there turn1"]
        assert (job.misses, job.cold_leases, job.pools_closed) == (0, 0, True)


async def test_ws_connect_lends_and_close_releases_and_misses_go_to_a_real_session() -> None:
    async with ElevenLabsEmulator(tls=True, api_key=KEY) as server:
        pool = _pool(server)
        session = PooledSession(
            session=aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=test_certificates().client_context())
            )
        )
        session.index.add(pool)
        async with pool:
            ws = await session.ws_connect(_el_url(server), headers={"xi-api-key": KEY})
            assert pool.stats().in_use == 1
            await ws.close()
            assert pool.stats().in_use == 0
            await wait_until(lambda: ws.closed)  # the pool closes it, off the caller's path
            other = _el_url(server).replace("pcm_16000", "pcm_8000")
            fresh = await session.ws_connect(other, headers={"xi-api-key": KEY})
            assert session.index.misses["livekit"] == 1
            await fresh.close()
        await session.session.close()


async def test_next_holder_never_receives_the_previous_holders_audio() -> None:
    """The server keeps streaming a long reply after the holder closes (releases); the next
    lease is another socket, and hears only its own context."""
    async with ElevenLabsEmulator(tls=True, api_key=KEY, chunk_interval=0.02) as server:
        pool = _pool(server, size=2)
        session = PooledSession()
        session.index.add(pool)
        async with pool:
            first = await session.ws_connect(_el_url(server))
            await first.send_str(json.dumps({"text": " ", "context_id": "call-1"}))
            await first.send_str(
                json.dumps({"text": "a long reply " * 20, "context_id": "call-1", "flush": True})
            )
            msg = await first.receive_json()
            assert msg.get("contextId") == "call-1"
            await first.close()  # released while call-1 audio is still streaming
            second = await session.ws_connect(_el_url(server))
            assert second is not first
            await second.send_str(json.dumps({"text": " ", "context_id": "call-2"}))
            await second.send_str(json.dumps({"text": "hi", "context_id": "call-2", "flush": True}))
            seen = set()
            while True:
                msg = await second.receive_json()
                seen.add(msg.get("contextId"))
                if msg.get("isFinal") or msg.get("audio"):
                    break
            assert seen == {"call-2"}
            await second.close()
        await session.close()


async def test_a_pool_started_in_prewarm_raises_in_the_job_loop() -> None:
    """LiveKit's prewarm_fnc runs before the job's event loop exists: a pool started there
    belongs to another loop, and using it in the job raises at once instead of hanging."""
    async with ElevenLabsEmulator(tls=True, api_key=KEY) as server:
        pool = _pool(server)
        started, done = threading.Event(), threading.Event()

        def prewarm() -> None:  # as LiveKit runs prewarm_fnc: its own loop, before the job's
            async def boot() -> None:
                await pool.start()
                started.set()
                await asyncio.to_thread(done.wait, 10)
                await pool.aclose()

            asyncio.run(boot())

        thread = threading.Thread(target=prewarm)
        thread.start()
        try:
            assert await asyncio.to_thread(started.wait, 10)
            session = PooledSession()
            session.index.add(pool)
            with pytest.raises(PoolLoopError, match="'tts'"):
                await asyncio.wait_for(session.ws_connect(_el_url(server)), 1.0)
        finally:
            done.set()
            await asyncio.to_thread(thread.join, 10)


async def test_cartesia_plugin_on_a_pooled_session() -> None:
    from livekit.plugins import cartesia

    from voicepool.integrations.livekit import job_pools

    async with lk.emulated_services() as stack:
        session = PooledSession()
        base = stack.cartesia.replace("wss", "https").rsplit("/tts", 1)[0]
        # The plugin types http_session as aiohttp.ClientSession but only calls what
        # PooledSession (a duck-typed stand-in) provides.
        aiohttp_session = cast(aiohttp.ClientSession, session)
        tts = cartesia.TTS(
            api_key=lk.KEY, base_url=base, http_session=aiohttp_session, sample_rate=RATE
        )
        async with job_pools(None, session, tts) as pools:
            async with tts.stream() as synth:
                synth.push_text("hello there")
                synth.flush()
                synth.end_input()
                frames = [audio async for audio in synth]
            await tts.aclose()
            assert frames
            assert not pools.index.misses
            assert not pools.index.cold
        await session.close()

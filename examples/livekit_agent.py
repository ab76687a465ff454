"""A LiveKit Agents job on voicepool pools, offline: LiveKit's Deepgram STT, OpenAI LLM and
ElevenLabs TTS plugins on a PooledSession, against voicepool's TLS emulators behind a 40 ms
round-trip relay.

No LiveKit server runs here: an AgentSession needs a room, so this drives the plugins directly,
as their own tests do (an STT stream fed simulated audio frames, ``llm.chat()``, a TTS stream),
and a stand-in JobContext whose ``connect()`` takes one round trip like a room join.

    python examples/livekit_agent.py             # 10 concurrent jobs, pooled, then per job
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from livekit import rtc
from livekit.agents import llm as lk_llm
from livekit.agents import stt as lk_stt
from livekit.plugins import deepgram, elevenlabs, openai

sys.path.insert(0, str(Path(__file__).parent))
from pipecat_bot import KEY, Stack, emulated_services

from voicepool.adapters.http2 import Http2Adapter
from voicepool.integrations import openai as pooled_openai
from voicepool.integrations.livekit import PooledSession, job_pools
from voicepool.testing import test_certificates

RATE = 16000


class FakeJobContext:
    """What job_pools needs of a JobContext: ``connect()`` (a room join: one round trip here)."""

    def __init__(self, rtt: float) -> None:
        self.rtt = rtt

    async def connect(self) -> None:
        await asyncio.sleep(self.rtt)


def plugins(stack: Stack, session: Any) -> tuple[Any, Any]:
    stt = deepgram.STT(
        api_key=KEY,
        base_url=stack.deepgram + "/v1/listen",
        http_session=session,
        sample_rate=RATE,
        model="nova-3",
    )
    tts = elevenlabs.TTS(
        api_key=KEY,
        base_url=stack.elevenlabs.replace("wss", "https") + "/v1",
        http_session=session,
        encoding="pcm_16000",
    )
    return stt, tts


@dataclass
class JobResult:
    start_ms: float  # job start until the pools (or nothing, per job) are ready with the join
    turn_ms: list[float]  # end of user audio until the first TTS audio, per turn


async def turn(stt_stream: Any, llm: Any, tts: Any, n: int) -> float:
    """One user turn: audio, Finalize (flush), the final transcript, the LLM, the first audio."""
    for word in (b"hello", b"there", f"turn{n}".encode()):
        data = word + b" " * 27
        stt_stream.push_frame(rtc.AudioFrame(data, RATE, 1, len(data) // 2))
    t0 = time.perf_counter()
    stt_stream.flush()
    async for event in stt_stream:
        if event.type == lk_stt.SpeechEventType.FINAL_TRANSCRIPT:
            text = event.alternatives[0].text
            break
    ctx = lk_llm.ChatContext()
    ctx.add_message(role="user", content=text)
    reply = ""
    async with llm.chat(chat_ctx=ctx) as stream:
        async for chunk in stream:
            if chunk.delta and chunk.delta.content:
                reply += chunk.delta.content
    async with tts.stream() as synth:
        synth.push_text(reply)
        synth.flush()
        synth.end_input()
        async for _audio in synth:
            elapsed = (time.perf_counter() - t0) * 1e3
            break
    return elapsed


async def run_job(stack: Stack, *, pooled: bool, turns: int = 2) -> JobResult:
    """One job: pools started with the room join (pooled) or none (per job), then ``turns``."""
    t0 = time.perf_counter()
    if pooled:
        session: Any = PooledSession()
        stt, tts = plugins(stack, session)
        llm_adapter = Http2Adapter(base_url=stack.llm, api_key=KEY)
        async with job_pools(
            FakeJobContext(stack.rtt),
            session,
            stt,
            tts,
            llm=llm_adapter,
        ) as pools:
            start_ms = (time.perf_counter() - t0) * 1e3
            assert pools.llm is not None
            llm = openai.LLM(client=pooled_openai.client(pools.llm), model="voicepool-emulator")
            result = await _turns(stt, llm, tts, turns, start_ms)
            result_misses = sum(pools.index.misses.values())
        await session.close()
        assert result_misses == 0, f"{result_misses} pool misses"
        return result
    ssl = test_certificates().client_context()  # aiohttp does not read SSL_CERT_FILE
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl)) as http:
        stt, tts = plugins(stack, http)
        await FakeJobContext(stack.rtt).connect()
        start_ms = (time.perf_counter() - t0) * 1e3
        llm = openai.LLM(api_key=KEY, base_url=stack.llm, model="voicepool-emulator")
        return await _turns(stt, llm, tts, turns, start_ms)


async def _turns(stt: Any, llm: Any, tts: Any, turns: int, start_ms: float) -> JobResult:
    stream = stt.stream()
    try:
        times = [await turn(stream, llm, tts, n) for n in range(turns)]
    finally:
        await stream.aclose()
        await tts.aclose()
        await llm.aclose()  # the plugin's SDK client (pooled: leaves the pool open)
    return JobResult(start_ms, times)


async def run_jobs(
    stack: Stack, *, pooled: bool, jobs: int = 10, arrival: float = 0.05, turns: int = 2
) -> list[JobResult]:
    async def job(n: int) -> JobResult:
        await asyncio.sleep(n * arrival)
        return await run_job(stack, pooled=pooled, turns=turns)

    return list(await asyncio.gather(*(job(n) for n in range(jobs))))


async def main() -> None:
    async with emulated_services() as stack:
        stack.rtt = 0.040
        for pooled in (True, False):
            await run_job(stack, pooled=pooled, turns=1)  # process warm-up (imports)
            for i, r in enumerate(await run_jobs(stack, pooled=pooled)):
                label = "pooled" if pooled else "per job"
                turns = ", ".join(f"{t:.0f}" for t in r.turn_ms)
                print(f"{label} job {i}: ready {r.start_ms:.0f} ms, turns {turns} ms")


if __name__ == "__main__":
    asyncio.run(main())

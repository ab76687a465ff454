"""A LiveKit Agents job on voicepool pools, offline: a real ``AgentSession`` with LiveKit's Deepgram
STT, OpenAI LLM and ElevenLabs TTS plugins on a PooledSession, against voicepool's TLS emulators
behind a 40 ms round-trip relay.

No LiveKit server runs here. The session is started without a room (``AgentSession.start(agent=)``
with ``session.input.audio`` / ``session.output.audio`` set to in-process ones, as livekit-agents'
console mode sets its own), inside ``livekit.agents.testing.fake_job_context()`` (a real
JobContext of a fake job). The room join is simulated: ``SimulatedJob.connect()`` takes ``join``
seconds (a real join is a signal WebSocket plus WebRTC: several round trips), and its shutdown
runs the job's shutdown callbacks as LiveKit's job process does. The simulated user speaks 50 ms
audio frames (the Deepgram emulator "hears" printable bytes as words), then silence: Deepgram's
endpointing ends the utterance (``speech_final``), the session's STT turn detection commits the
turn, the LLM answers, the TTS speaks. A turn is timed from the end of the user's audio to the
reply's first audio frame.

    python examples/livekit_agent.py             # 10 jobs one after another, pooled, then per job
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl as stdlib_ssl
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from livekit import rtc
from livekit.agents import Agent, AgentSession
from livekit.agents.testing import fake_job_context
from livekit.agents.voice import io
from livekit.plugins import deepgram, elevenlabs, openai

sys.path.insert(0, str(Path(__file__).parent))
from pipecat_bot import KEY, Stack, emulated_services

from voicepool.adapters.http2 import Http2Adapter
from voicepool.integrations import openai as pooled_openai
from voicepool.integrations.livekit import JobPools, PooledSession, start_job_pools
from voicepool.manager import ManagerState

RATE = 16000
FRAME = RATE // 20 * 2  # 50 ms of 16 kHz linear16: the Deepgram plugin's chunk size
MODEL = "voicepool-emulator"


class SimulatedMic(io.AudioInput):
    """The user's microphone: frames put with :meth:`say` / :meth:`pause`; None ends it."""

    def __init__(self) -> None:
        super().__init__(label="simulated-mic")
        self.frames: asyncio.Queue[rtc.AudioFrame | None] = asyncio.Queue()

    async def __anext__(self) -> rtc.AudioFrame:
        frame = await self.frames.get()
        if frame is None:
            raise StopAsyncIteration
        return frame

    def say(self, words: str) -> None:
        """50 ms of audio the emulator hears as ``words``."""
        self.frames.put_nowait(rtc.AudioFrame(words.encode().ljust(FRAME), RATE, 1, FRAME // 2))

    def pause(self) -> None:
        """50 ms of silence: past Deepgram's endpointing (25 ms for the plugin), the turn ends."""
        self.frames.put_nowait(rtc.AudioFrame(bytes(FRAME), RATE, 1, FRAME // 2))


class FirstAudioSink(io.AudioOutput):
    """The room's speaker: counts frames and notes the first of each reply; plays instantly."""

    def __init__(self) -> None:
        super().__init__(label="first-audio", capabilities=io.AudioOutputCapabilities(pause=False))
        self.first_audio = asyncio.Event()
        self.frames = 0
        self._position = 0.0

    async def capture_frame(self, frame: rtc.AudioFrame) -> None:
        await super().capture_frame(frame)
        if not self._position:
            self.on_playback_started(created_at=time.time())
        self.frames += 1
        self._position += frame.duration
        self.first_audio.set()

    def flush(self) -> None:
        super().flush()
        self._finish(interrupted=False)

    def clear_buffer(self) -> None:
        self._finish(interrupted=True)

    def _finish(self, *, interrupted: bool) -> None:
        position, self._position = self._position, 0.0
        self.on_playback_finished(playback_position=position, interrupted=interrupted)


class SimulatedJob:
    """A fake JobContext (livekit.agents.testing) whose ``connect()`` takes ``join`` seconds like
    a room join, and whose :meth:`shutdown` runs the context's shutdown callbacks concurrently,
    then its cleanup, as LiveKit's job process does (``ipc/job_proc_lazy_main.py``; private
    names: no public API runs them outside a worker)."""

    def __init__(self, ctx: Any, join: float) -> None:
        self.ctx = ctx
        self.join = join
        self.room = None  # no LiveKit room: the session's audio is set directly

    async def connect(self) -> None:
        await asyncio.sleep(self.join)

    def add_shutdown_callback(self, callback: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        self.ctx.add_shutdown_callback(callback)

    async def shutdown(self, reason: str = "job done") -> None:
        callbacks = list(self.ctx._shutdown_callbacks)  # AgentSession registers its close there
        try:
            await asyncio.gather(*(callback(reason) for callback in callbacks))
        finally:
            await self.ctx._on_cleanup()  # the job's temporary directory, its telemetry


@contextlib.asynccontextmanager
async def simulated_job(join: float) -> AsyncIterator[SimulatedJob]:
    """A job's context for one entrypoint run; its shutdown callbacks run on exit."""
    with fake_job_context() as ctx:
        job = SimulatedJob(ctx, join)
        try:
            yield job
        finally:
            await job.shutdown()


def plugins(stack: Stack, http_session: Any) -> tuple[Any, Any]:
    """The job's STT and TTS plugins, as a user builds them (only ``http_session`` is ours)."""
    stt = deepgram.STT(
        api_key=KEY,
        base_url=stack.deepgram + "/v1/listen",
        http_session=http_session,
        sample_rate=RATE,
        model="nova-3",
    )
    tts = elevenlabs.TTS(
        api_key=KEY,
        base_url=stack.elevenlabs.replace("wss", "https") + "/v1",
        http_session=http_session,
        encoding="pcm_16000",
    )
    return stt, tts


@dataclass
class Job:
    """A started job: its AgentSession, the simulated user's mic and speaker."""

    session: AgentSession[None]
    mic: SimulatedMic
    sink: FirstAudioSink
    ready_ms: float  # entrypoint start until the session was started (join and pools included)
    pools: JobPools | None = None
    transcripts: list[str] = field(default_factory=list)


def agent_session(stt: Any, llm: Any, tts: Any) -> AgentSession[None]:
    """The session: STT turn detection (Deepgram's endpointing), no VAD, no interruptions (the
    simulated user never talks over the agent), no extra endpointing delay."""
    return AgentSession(
        stt=stt,
        llm=llm,
        tts=tts,
        vad=None,
        turn_handling={
            "turn_detection": "stt",
            "endpointing": {"min_delay": 0.0, "max_delay": 0.5},
            "interruption": {"enabled": False, "resume_false_interruption": False},
            "preemptive_generation": {"enabled": False},
        },
        user_away_timeout=None,
    )


async def entrypoint(ctx: SimulatedJob, stack: Stack, *, pooled: bool) -> Job:
    """The job's entrypoint. Pooled: the plugins on a PooledSession whose pools start during the
    join and close at shutdown. Per job: LiveKit's own way (a plain aiohttp session, the LLM
    plugin's own client): every connection opens inside the first turn."""
    t0 = time.perf_counter()
    pools: JobPools | None = None
    if pooled:
        http: Any = PooledSession()
        stt, tts = plugins(stack, http)
        llm_pool = Http2Adapter(base_url=stack.llm, api_key=KEY)
        pools = await start_job_pools(ctx, http, stt, tts, llm=llm_pool)
        assert pools.llm is not None
        llm = openai.LLM(client=pooled_openai.client(pools.llm), model=MODEL)
    else:
        # aiohttp does not read SSL_CERT_FILE: trust the emulators' CA explicitly.
        ssl = stdlib_ssl.create_default_context(cafile=stack.ca_file)
        http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl))
        stt, tts = plugins(stack, http)
        llm = openai.LLM(api_key=KEY, base_url=stack.llm, model=MODEL)
        ctx.add_shutdown_callback(tts.aclose)  # its socket, kept for the next turn
        ctx.add_shutdown_callback(http.close)
        await ctx.connect()
    ctx.add_shutdown_callback(llm.aclose)  # the SDK client (pooled: leaves the pool open)
    session = agent_session(stt, llm, tts)
    mic, sink = SimulatedMic(), FirstAudioSink()
    session.input.audio = mic
    session.output.audio = sink
    # The session registers its own close as a shutdown callback of the (fake) job context.
    await session.start(agent=Agent(instructions="Be brief."))
    job = Job(session, mic, sink, (time.perf_counter() - t0) * 1e3, pools)

    @session.on("user_input_transcribed")
    def _heard(ev: Any) -> None:
        if ev.is_final:
            job.transcripts.append(ev.transcript)

    return job


async def turn(job: Job, n: int, timeout: float = 10.0) -> float:
    """The user says three words and pauses; ms from the pause to the reply's first audio.
    Raises TimeoutError when no audio comes back."""
    job.sink.first_audio.clear()
    job.mic.say(f"hello there turn{n}")
    t0 = time.perf_counter()
    job.mic.pause()
    async with asyncio.timeout(timeout):
        await job.sink.first_audio.wait()
        elapsed = (time.perf_counter() - t0) * 1e3
        speech = job.session.current_speech
        if speech is not None:
            await speech.wait_for_playout()  # the whole reply, before the user speaks again
    return elapsed


@dataclass
class JobResult:
    ready_ms: float  # entrypoint start until the session is started
    turn_ms: list[float]  # end of user audio until the first TTS audio, per turn
    misses: int = 0
    cold_leases: int = 0  # leases that found no idle socket (waited for a handshake)
    transcripts: list[str] = field(default_factory=list)
    pools_closed: bool | None = None  # pooled: whether the job's shutdown closed its pools


async def run_job(stack: Stack, *, pooled: bool, turns: int = 2, join: float = 0.0) -> JobResult:
    """One job: the entrypoint (pools started with a ``join``-second room join, or none), then
    ``turns`` user turns, then the job's shutdown."""
    async with simulated_job(join) as ctx:
        job = await entrypoint(ctx, stack, pooled=pooled)
        times = [await turn(job, n) for n in range(turns)]
        result = JobResult(job.ready_ms, times, transcripts=job.transcripts)
        if job.pools is not None:
            result.misses = sum(job.pools.index.misses.values())
            result.cold_leases = sum(job.pools.index.cold.values())
    if job.pools is not None:
        result.pools_closed = job.pools.manager.state is ManagerState.CLOSED
    return result


async def run_jobs(
    stack: Stack, *, pooled: bool, jobs: int = 10, arrival: float = 0.05, turns: int = 2
) -> list[JobResult]:
    """``jobs`` overlapping jobs in this one process (LiveKit itself runs one per process)."""

    async def one(n: int) -> JobResult:
        await asyncio.sleep(n * arrival)
        return await run_job(stack, pooled=pooled, turns=turns, join=stack.rtt)

    return list(await asyncio.gather(*(one(n) for n in range(jobs))))


async def main() -> None:
    async with emulated_services() as stack:
        for pooled in (True, False):
            await run_job(stack, pooled=pooled, turns=1)  # process warm-up (imports)
            label = "pooled" if pooled else "per job"
            for i in range(10):
                r = await run_job(stack, pooled=pooled, turns=3, join=stack.rtt)
                turns = ", ".join(f"{t:.0f}" for t in r.turn_ms)
                print(f"{label} job {i}: ready {r.ready_ms:.0f} ms, turns {turns} ms")


if __name__ == "__main__":
    asyncio.run(main())

"""A Pipecat bot on voicepool pools, offline: audio in -> Deepgram STT -> OpenAI LLM ->
ElevenLabs (or Cartesia) TTS -> audio out, against voicepool's TLS emulators behind a 40 ms
round-trip relay. No Daily or WebRTC transport: the pipeline is fed simulated audio frames (the
Deepgram emulator "hears" printable bytes as words) and a VAD stop ends each user turn.

    python examples/pipecat_bot.py              # 10 concurrent calls, pooled, then per-call

In a real worker the only changes from a plain Pipecat bot are the imports of the services
(``voicepool.integrations.pipecat`` instead of ``pipecat.services...``) and the PipecatPools
started once at boot (see examples/pipecat_runner.py for the FastAPI runner).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from pipecat.frames.frames import (
    EndFrame,
    Frame,
    InputAudioRawFrame,
    LLMContextFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner

from voicepool.demo.services import latency_proxy
from voicepool.integrations import pipecat as pooled
from voicepool.testing import (
    CartesiaEmulator,
    DeepgramEmulator,
    ElevenLabsEmulator,
    LlmEmulator,
    test_certificates,
    wait_until,
)

KEY = "example-key"
IN_RATE, OUT_RATE = 16000, 16000


@dataclass
class Stack:
    """The emulators, each behind its latency relay; URLs as the services take them."""

    deepgram: str
    elevenlabs: str
    cartesia: str
    llm: str
    rtt: float = 0.040
    emulators: dict[str, Any] = field(default_factory=dict)
    relays: dict[str, Any] = field(default_factory=dict)

    def handshakes(self) -> int:
        """TCP connections the relays accepted so far (every socket a worker opened)."""
        return sum(relay.accepted for relay in self.relays.values())


@contextlib.asynccontextmanager
async def emulated_services(rtt: float = 0.040) -> AsyncIterator[Stack]:
    """Start the TLS emulators and their relays on 127.0.0.1; the CA goes in SSL_CERT_FILE
    (the frameworks' default SSL context reads it)."""
    saved = os.environ.get("SSL_CERT_FILE")
    os.environ["SSL_CERT_FILE"] = str(test_certificates().ca_path)
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(_restore_env, "SSL_CERT_FILE", saved)
        emulators: dict[str, Any] = {
            # endpointing: LiveKit's STT turn detection (examples/livekit_agent.py) needs it.
            "deepgram": DeepgramEmulator(tls=True, api_key=KEY, endpointing=True),
            "elevenlabs": ElevenLabsEmulator(tls=True, api_key=KEY),
            "cartesia": CartesiaEmulator(tls=True, api_key=KEY),
            "llm": LlmEmulator(tls=True, api_key=KEY, ttft=0.02, tokens=6, tokens_per_second=600),
        }
        relays = {}
        for name, emulator in emulators.items():
            await stack.enter_async_context(emulator)
            relays[name] = await stack.enter_async_context(latency_proxy(emulator.port, rtt))
        ws = {
            n: f"wss://127.0.0.1:{relays[n].port}" for n in ("deepgram", "elevenlabs", "cartesia")
        }
        yield Stack(
            deepgram=ws["deepgram"],
            elevenlabs=ws["elevenlabs"],
            cartesia=ws["cartesia"] + "/tts/websocket",
            llm=f"https://127.0.0.1:{relays['llm'].port}/v1",
            emulators=emulators,
            relays=relays,
        )


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def make_services(stack: Stack, tts: str = "elevenlabs", module: Any = pooled) -> list[Any]:
    """The bot's services. ``module``: voicepool.integrations.pipecat (pooled) or a namespace of
    Pipecat's own classes (the per-call baseline): the arguments are the same."""
    stt = module.DeepgramSTTService(api_key=KEY, base_url=stack.deepgram)
    llm = module.OpenAILLMService(
        api_key=KEY,
        base_url=stack.llm,
        settings=module.OpenAILLMService.Settings(model="voicepool-emulator"),
    )
    if tts == "cartesia":
        voice: Any = module.CartesiaTTSService.Settings(voice="v1")
        speech = module.CartesiaTTSService(api_key=KEY, url=stack.cartesia, settings=voice)
    else:
        voice = module.ElevenLabsTTSService.Settings(voice="v1")
        speech = module.ElevenLabsTTSService(api_key=KEY, url=stack.elevenlabs, settings=voice)
    return [stt, llm, speech]


class _TranscriptToLLM(FrameProcessor):
    """The user aggregator, reduced to what a test needs: a final transcript is the turn."""

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, TranscriptionFrame) and frame.text.strip():
            context = LLMContext(messages=[{"role": "user", "content": frame.text}])
            await self.push_frame(LLMContextFrame(context), direction)
        else:
            await self.push_frame(frame, direction)


class _AudioOut(FrameProcessor):
    """The output transport's stand-in: notes when each turn's first audio arrives."""

    def __init__(self) -> None:
        super().__init__()
        self.first_audio = asyncio.Event()
        self.audio_bytes = 0
        self.contexts: set[str | None] = set()  # TTS contexts the audio came from

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame):
            self.audio_bytes += len(frame.audio)
            self.contexts.add(frame.context_id)
            self.first_audio.set()
        await self.push_frame(frame, direction)


@dataclass
class CallResult:
    start_ms: float  # runner.run() until the StartFrame went through (services connected)
    turn_ms: list[float]  # VAD stop until the first TTS audio, per turn
    audio_bytes: int
    contexts: set[str | None] = field(default_factory=set)


async def run_call(
    services: list[Any], turns: int = 2, timeout: float = 10.0, out_rate: int = OUT_RATE
) -> CallResult:
    """One call: start the pipeline (``out_rate``: its audio out sample rate), speak ``turns``
    user turns, end it. Raises TimeoutError."""
    stt, llm, tts = services
    out = _AudioOut()
    pipeline = Pipeline([stt, _TranscriptToLLM(), llm, tts, out])
    params = PipelineParams(audio_in_sample_rate=IN_RATE, audio_out_sample_rate=out_rate)
    worker = PipelineWorker(
        pipeline, params=params, cancel_on_idle_timeout=False, enable_rtvi=False
    )
    started = asyncio.Event()

    @worker.event_handler("on_pipeline_started")  # type: ignore[untyped-decorator]
    async def _started(_worker: Any, _frame: Any) -> None:
        started.set()

    runner = WorkerRunner(handle_sigint=False, check_dangling_tasks=False)
    turn_ms: list[float] = []

    async def speak() -> None:
        t0 = time.perf_counter()
        await started.wait()
        start_ms = (time.perf_counter() - t0) * 1e3
        for n in range(turns):
            out.first_audio.clear()
            for word in (b"hello", b"there", f"turn{n}".encode()):
                await worker.queue_frame(InputAudioRawFrame(word + b" " * 27, IN_RATE, 1))
            t_turn = time.perf_counter()
            await worker.queue_frame(VADUserStoppedSpeakingFrame())
            await out.first_audio.wait()
            turn_ms.append((time.perf_counter() - t_turn) * 1e3)
        await worker.queue_frame(EndFrame())
        result.start_ms = start_ms

    result = CallResult(0.0, turn_ms, 0)
    await runner.add_workers(worker)
    try:
        async with asyncio.timeout(timeout):
            await asyncio.gather(runner.run(), speak())
    finally:
        # Pipecat never closes its LLM client (one per service, so per call): close it here,
        # or its HTTP connections outlive the call. The pooled client's close leaves the pool.
        await llm._client.close()
    result.audio_bytes = out.audio_bytes
    result.contexts = out.contexts
    return result


async def run_calls(
    make: Callable[[], list[Any]], calls: int = 10, turns: int = 2, arrival: float = 0.05
) -> list[CallResult]:
    """``calls`` concurrent calls, one arriving every ``arrival`` seconds (all of them overlap),
    each with services from ``make()`` as a runner's bot() builds them."""

    async def call(n: int) -> CallResult:
        await asyncio.sleep(n * arrival)
        return await run_call(make(), turns)

    return list(await asyncio.gather(*(call(n) for n in range(calls))))


class _PipecatOwn:
    """Pipecat's own services (the per-call baseline): the same arguments as the pooled ones."""

    from pipecat.services.cartesia.tts import CartesiaTTSService
    from pipecat.services.deepgram.stt import DeepgramSTTService
    from pipecat.services.elevenlabs.tts import ElevenLabsTTSService
    from pipecat.services.openai.llm import OpenAILLMService


@dataclass
class RunSummary:
    results: list[CallResult]
    misses: int  # connections opened outside a pool (voicepool.pool.miss)
    opened_in_calls: int  # connections a call waited for (pool connects that were not refills)


async def measure(
    stack: Stack, *, pooled_run: bool, calls: int = 10, turns: int = 2, tts: str = "elevenlabs"
) -> RunSummary:
    """``calls`` overlapping calls, on pools or per call, after one unmeasured warm-up call
    (Pipecat and the SDKs import and build things on first use: a process cost, not a call's)."""
    if not pooled_run:
        await run_call(make_services(stack, tts, _PipecatOwn), 1)
        before = stack.handshakes()
        results = await run_calls(lambda: make_services(stack, tts, _PipecatOwn), calls, turns)
        return RunSummary(results, 0, stack.handshakes() - before)
    pools = pooled.PipecatPools(
        concurrency=calls, audio_in_sample_rate=IN_RATE, audio_out_sample_rate=OUT_RATE
    )
    pools.declare(*make_services(stack, tts))
    async with pools:
        await run_call(make_services(stack, tts), 1)
        await pools_full(pools)
        waited_before = _waited_connects(pools)
        results = await run_calls(lambda: make_services(stack, tts), calls, turns)
        return RunSummary(
            results, sum(pools.index.misses.values()), _waited_connects(pools) - waited_before
        )


async def pools_full(pools: pooled.PipecatPools, timeout: float = 10.0) -> None:
    """Wait until every pool is back at its warm floor (the warm-up call's refills done)."""
    stats = pools.manager.stats
    await wait_until(lambda: all(st.idle >= st.min_size for st in stats().values()), timeout)


def _waited_connects(pools: pooled.PipecatPools) -> int:
    """Connects a call waited for: WebSocket leases that found no idle socket, plus connects of
    the HTTP/2 pools (which have no refills: any connect there is a call's)."""
    http2 = sum(
        p.stats().connects
        for p in pools.manager.pools.values()
        if type(p.adapter).__name__ == "Http2Adapter"
    )
    return sum(pools.index.cold.values()) + http2


async def main() -> None:
    from loguru import logger

    logger.remove()  # Pipecat logs every frame at DEBUG: ten calls spend their time printing
    logger.add(sys.stderr, level="WARNING")
    async with emulated_services() as stack:
        for pooled_run in (True, False):
            run = await measure(stack, pooled_run=pooled_run)
            label = "pooled" if pooled_run else "per call"
            for i, r in enumerate(run.results):
                turns = ", ".join(f"{t:.0f}" for t in r.turn_ms)
                print(f"{label} call {i}: start {r.start_ms:.1f} ms, turns {turns} ms")
            print(
                f"{label}: misses {run.misses}, connections opened inside calls"
                f" {run.opened_in_calls}"
            )


if __name__ == "__main__":
    asyncio.run(main())

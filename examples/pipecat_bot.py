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

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
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
_THIS_FILE = os.path.abspath(__file__)  # the child of spawned_services runs it
IN_RATE, OUT_RATE = 16000, 16000


@dataclass
class Stack:
    """The emulators, each behind its latency relay; URLs as the services take them.
    ``emulators`` and ``relays``: the objects themselves when they run in this process
    (:func:`emulated_services`), empty when they run in a child (:func:`spawned_services`)."""

    deepgram: str
    elevenlabs: str
    cartesia: str
    llm: str
    ca_file: str  # the CA that signed the emulators' certificate
    rtt: float = 0.040
    emulators: dict[str, Any] = field(default_factory=dict)
    relays: dict[str, Any] = field(default_factory=dict)
    remote_count: Callable[[], Awaitable[int]] | None = None  # the child's relays' count

    async def handshakes(self) -> int:
        """TCP connections the relays accepted so far (every socket a worker opened)."""
        if self.remote_count is not None:
            return await self.remote_count()
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
            ca_file=os.environ["SSL_CERT_FILE"],
            rtt=rtt,
            emulators=emulators,
            relays=relays,
        )


@contextlib.asynccontextmanager
async def spawned_services(rtt: float = 0.040, timeout: float = 60.0) -> AsyncIterator[Stack]:
    """:func:`emulated_services` in a child process (``python pipecat_bot.py --serve``), as a
    real worker has its providers elsewhere: the emulators' TLS, framing and relays then spend
    the child's CPU, not the event loop the calls run on. The CA goes in SSL_CERT_FILE here too.

    The child reports its endpoints as one JSON line, answers each ``handshakes`` line on its
    stdin with its relays' count, and exits when its stdin closes (then by its PID if it
    lingers). Raises RuntimeError when it reports nothing within ``timeout`` (its stderr passes
    through). Cancellation-safe: the child is stopped.
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        _THIS_FILE,
        "--serve",
        "--rtt",
        repr(rtt),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    saved = os.environ.get("SSL_CERT_FILE")
    try:
        assert proc.stdin is not None
        assert proc.stdout is not None
        stdin, stdout = proc.stdin, proc.stdout
        try:
            async with asyncio.timeout(timeout):
                info = json.loads(await stdout.readline())
        except (TimeoutError, ValueError) as exc:
            raise RuntimeError(
                f"the emulators' child process did not start (exit code {proc.returncode}): {exc}"
            ) from None
        lock = asyncio.Lock()

        async def count() -> int:
            async with lock:
                stdin.write(b"handshakes\n")
                await stdin.drain()
                return int(await stdout.readline())

        os.environ["SSL_CERT_FILE"] = info["ca_file"]
        yield Stack(**info, rtt=rtt, remote_count=count)
    finally:
        _restore_env("SSL_CERT_FILE", saved)
        await asyncio.shield(_stop_child(proc))


async def _stop_child(proc: asyncio.subprocess.Process) -> None:
    if proc.stdin is not None and not proc.stdin.is_closing():
        proc.stdin.close()
    try:
        async with asyncio.timeout(10.0):
            await proc.wait()
    except TimeoutError:
        proc.kill()  # this child only, by its handle
        await proc.wait()


async def _serve(rtt: float) -> None:
    """The child of :func:`spawned_services`: serve until stdin closes."""
    async with emulated_services(rtt) as stack:
        endpoints = ("deepgram", "elevenlabs", "cartesia", "llm", "ca_file")
        print(json.dumps({k: getattr(stack, k) for k in endpoints}), flush=True)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            if line.strip() == b"handshakes":
                print(await stack.handshakes(), flush=True)


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
    # Of start_ms, the time this thread was ready to run but another process had the CPU (the
    # kernel's run-queue wait, /proc/thread-self/schedstat; NaN where there is none): a shared
    # machine's part of the figure, not the worker's.
    start_cpu_wait_ms: float = float("nan")


def _runqueue_wait_ns() -> int | None:
    """This thread's total run-queue wait so far (Linux schedstat), or None."""
    try:
        with open("/proc/thread-self/schedstat", "rb") as f:  # procfs: no disk I/O
            return int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None


async def run_call(
    services: list[Any],
    turns: int = 2,
    timeout: float = 10.0,
    out_rate: int = OUT_RATE,
    until: asyncio.Event | None = None,
    talking: asyncio.Event | None = None,
) -> CallResult:
    """One call: start the pipeline (``out_rate``: its audio out sample rate), speak ``turns``
    user turns (and more, back to back, until ``until`` is set), end it; ``talking`` is set once
    the first turn was answered. Raises TimeoutError.

    ``start_ms`` is the pipeline's start as Pipecat runs it: from the first step of
    ``WorkerRunner.run()`` (its bus set up, the worker's task created) until the StartFrame has
    crossed the pipeline (every service set up: connected, or leased) and the
    ``on_pipeline_started`` handler has woken the caller. The services, the pipeline and the
    worker are built before it (``bot()`` builds them before it runs the pipeline)."""
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
        t0, wait0 = time.perf_counter(), _runqueue_wait_ns()
        await started.wait()
        start_ms = (time.perf_counter() - t0) * 1e3
        wait1 = _runqueue_wait_ns()
        if wait0 is not None and wait1 is not None:
            result.start_cpu_wait_ms = (wait1 - wait0) / 1e6
        n = 0
        while n < turns or (until is not None and not until.is_set()):
            out.first_audio.clear()
            for word in (b"hello", b"there", f"turn{n}".encode()):
                await worker.queue_frame(InputAudioRawFrame(word + b" " * 27, IN_RATE, 1))
            t_turn = time.perf_counter()
            await worker.queue_frame(VADUserStoppedSpeakingFrame())
            await out.first_audio.wait()
            turn_ms.append((time.perf_counter() - t_turn) * 1e3)
            if talking is not None:
                talking.set()
            n += 1
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


async def run_steady(
    make: Callable[[], list[Any]],
    calls: int = 10,
    starts: int = 10,
    turns: int = 2,
    seed: int = 14,
) -> list[CallResult]:
    """A worker at its peak: ``calls - 1`` calls in progress (speaking turns back to back) while
    ``starts`` new calls arrive one at a time, each when the previous newcomer has ended (so
    ``calls`` run at once), after a pseudo-random 0-100 ms pause (the newcomers land at any
    point of the others' turns). Returns the newcomers' results; the calls in progress end
    once the last newcomer has. Raises TimeoutError."""
    done = asyncio.Event()
    rng = random.Random(seed)
    talking = [asyncio.Event() for _ in range(calls - 1)]
    background = [
        asyncio.ensure_future(run_call(make(), turns, timeout=60.0, until=done, talking=t))
        for t in talking
    ]
    try:
        async with asyncio.timeout(10.0):  # every call in progress: past its first turn
            await asyncio.gather(*(t.wait() for t in talking))
        results = []
        for _ in range(starts):
            await asyncio.sleep(rng.uniform(0.0, 0.1))
            results.append(await run_call(make(), turns))
    finally:
        done.set()
        await asyncio.gather(*background, return_exceptions=True)
    for task in background:
        task.result()  # a call in progress that failed fails the run
    return results


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
    stack: Stack,
    *,
    pooled_run: bool,
    calls: int = 10,
    turns: int = 2,
    tts: str = "elevenlabs",
    steady: int = 0,
) -> RunSummary:
    """``calls`` overlapping calls (:func:`run_calls`), on pools or per call, after one
    unmeasured warm-up call (Pipecat and the SDKs import and build things on first use: a
    process cost, not a call's). ``steady``: instead, that many newcomers each arriving while
    ``calls - 1`` calls are in progress (:func:`run_steady`; the newcomers' results)."""
    if not pooled_run:

        def make() -> list[Any]:
            return make_services(stack, tts, _PipecatOwn)

        await run_call(make(), 1)
        before = await stack.handshakes()
        results = await _run(make, calls, turns, steady)
        return RunSummary(results, 0, await stack.handshakes() - before)
    pools = pooled.PipecatPools(
        concurrency=calls, audio_in_sample_rate=IN_RATE, audio_out_sample_rate=OUT_RATE
    )
    pools.declare(*make_services(stack, tts))
    async with pools:
        await run_call(make_services(stack, tts), 1)
        await pools_full(pools)
        waited_before = _waited_connects(pools)
        results = await _run(lambda: make_services(stack, tts), calls, turns, steady)
        return RunSummary(
            results, sum(pools.index.misses.values()), _waited_connects(pools) - waited_before
        )


async def _run(
    make: Callable[[], list[Any]], calls: int, turns: int, steady: int
) -> list[CallResult]:
    if steady:
        return await run_steady(make, calls, steady, turns)
    return await run_calls(make, calls, turns)


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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the child
    parser.add_argument("--rtt", type=float, default=0.040, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        from loguru import logger

        logger.remove()  # (Pipecat's import banner)
        asyncio.run(_serve(args.rtt))
    else:
        asyncio.run(main())

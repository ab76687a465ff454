"""Simulated voice calls, timed per service: what ``voicepool demo`` measures.

A call does what a voice agent does: it takes a SIP registration for the phone leg (the first few
calls only: pjsua2 allows 8 accounts per process), holds one ASR stream for the whole call, and
every turn hears the caller (ASR), looks the caller up (CRM, REST), asks the LLM (HTTP/2 stream) and
speaks the answer (TTS context). It runs in one of two :class:`Mode` s:

* ``PER_CALL``: each call opens its own connections (``adapter.connect()`` inside the call, reused
  for its later turns, closed at hang-up): what a worker without a pool does.
* ``POOLED``: each call leases from the :class:`~voicepool.PoolManager`'s pools, warmed at boot
  (the ASR stream and SIP registration for the whole call, the others per turn).

For every service and turn it records the latency to the first byte of the answer, counting from the
moment the call needs the service (so it includes the connect or the acquire), the connect times
(per call), the acquire waits (pooled), and the turn's response time: from the end of the caller's
speech to the first byte of audio sent back.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace

from voicepool.adapter import Adapter, LeaseMode
from voicepool.manager import PoolManager
from voicepool.pool import PoolStats

__all__ = [
    "HELD",
    "SERVICES",
    "CallSimulation",
    "Mode",
    "RunResult",
    "ServiceSamples",
    "SimulationOptions",
]

SERVICES = ("sip", "asr", "crm", "llm", "tts")
"""The demo's pools, in the order a call uses them."""

HELD = frozenset({"sip", "asr"})
"""Services a call holds for its whole duration (the others are leased per turn)."""

_tracer = trace.get_tracer("voicepool.demo")


class Mode(enum.StrEnum):
    PER_CALL = "per_call"
    POOLED = "pooled"


@dataclass
class ServiceSamples:
    """Seconds, per service and run."""

    connect: list[float] = field(default_factory=list)  # PER_CALL: adapter.connect() times
    first: list[float] = field(default_factory=list)  # first turn: to first byte, setup included
    later: list[float] = field(default_factory=list)  # later turns: to first byte
    acquire: list[float] = field(default_factory=list)  # POOLED: time in pool.acquire()


@dataclass
class RunResult:
    """What one run of calls measured."""

    mode: Mode
    calls: int
    turns: int
    services: dict[str, ServiceSamples]
    response_first: list[float] = field(default_factory=list)  # caller stops -> first audio
    response_later: list[float] = field(default_factory=list)
    completed: int = 0
    failed: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    duration: float = 0.0
    pool_stats: dict[str, tuple[PoolStats, PoolStats]] = field(default_factory=dict)

    @property
    def turns_done(self) -> int:
        return len(self.response_first) + len(self.response_later)


@dataclass(frozen=True)
class SimulationOptions:
    calls: int = 20
    turns: int = 3
    sip_calls: int = 4  # calls that take a SIP registration (8 pjsua2 accounts per process)
    speech: float = 0.05  # the caller speaks this long each turn
    playback: float = 0.05  # the answer's audio plays this long (the TTS context stays open)
    arrival: float = 0.010  # calls arrive this far apart
    model: str = "voicepool-demo"


class CallSimulation:
    """Runs calls against a started :class:`~voicepool.PoolManager`'s services.

    ``services`` names the pools to use (a subset of :data:`SERVICES`; a skipped service is simply
    absent). ``per_call_adapters`` maps each service to the adapter a PER_CALL run connects with
    (the same options as the pool's; REST without its boot warm-up, as a fresh client would be);
    ``lazy`` names those whose ``connect()`` does no I/O (the socket opens inside the first
    request), so no handshake time is recorded for them.
    """

    def __init__(
        self,
        manager: PoolManager,
        services: tuple[str, ...],
        per_call_adapters: Mapping[str, Adapter[Any]],
        options: SimulationOptions,
        *,
        lazy: frozenset[str] = frozenset(),
    ) -> None:
        unknown = set(services) - set(SERVICES)
        if unknown:
            raise ValueError(f"unknown demo services: {sorted(unknown)}")
        self.manager = manager
        self.services = services
        self.adapters = dict(per_call_adapters)
        self.options = options
        self.lazy = lazy  # PER_CALL connects that do no I/O (the socket opens in the request)
        self.result: RunResult | None = None  # the run in progress (read by progress displays)

    async def run(self, mode: Mode) -> RunResult:
        """Run ``options.calls`` calls at once (arriving ``arrival`` apart); return the samples.

        A failing call is counted (``failed``; ``errors`` by exception type and message) and does
        not stop the others. Cancelling the run cancels its calls; their leases are released and
        their own connections closed (hang-up runs on the way out).
        """
        o = self.options
        result = RunResult(mode, o.calls, o.turns, {s: ServiceSamples() for s in self.services})
        self.result = result
        before = self.manager.stats()
        t0 = time.perf_counter()
        async with asyncio.TaskGroup() as group:
            for number in range(o.calls):
                group.create_task(self._guarded(number, mode, result))
                if o.arrival > 0 and number + 1 < o.calls:
                    await asyncio.sleep(o.arrival)
        result.duration = time.perf_counter() - t0
        after = self.manager.stats()
        result.pool_stats = {s: (before[s], after[s]) for s in self.services if s in before}
        return result

    async def _guarded(self, number: int, mode: Mode, result: RunResult) -> None:
        with _tracer.start_as_current_span(
            "voicepool.demo.call", attributes={"demo.call": number, "demo.mode": mode.value}
        ):
            try:
                await self._call(number, mode, result)
            except Exception as exc:
                result.failed += 1
                result.errors[f"{type(exc).__name__}: {exc}"[:200]] += 1
            else:
                result.completed += 1

    async def _call(self, number: int, mode: Mode, result: RunResult) -> None:
        o = self.options
        samples = result.services
        async with AsyncExitStack() as stack:
            call = _Call(self, mode, stack, samples)
            if "sip" in self.services and number < o.sip_calls:
                # The phone leg: a registration must be there before the call can be placed.
                _, _, ready = await call.hold("sip")
                samples["sip"].first.append(ready)
            asr: Any = None
            asr_ready = 0.0
            if "asr" in self.services:
                asr, _sid, asr_ready = await call.hold("asr")
            for turn in range(o.turns):
                await asyncio.sleep(o.speech)  # the caller speaks; the turn starts when they stop
                t_turn = time.perf_counter()
                words = f"caller {number} says hello {turn}"
                if asr is not None:
                    first_byte, words = await hear(asr, words)
                    _record(samples["asr"], turn, (asr_ready if turn == 0 else 0.0) + first_byte)
                prompt = words
                if "crm" in self.services:
                    async with call.lease("crm") as (conn, _sid, ready):
                        first_byte, who = await lookup(conn, f"+1555000{number % 2 + 1}")
                    _record(samples["crm"], turn, ready + first_byte)
                    prompt = f"{who}: {words}"
                reply = f"answer to {prompt}"
                if "llm" in self.services:
                    async with call.lease("llm") as (conn, sid, ready):
                        first_byte, reply = await think(
                            conn, sid, self.adapters["llm"], prompt, o.model
                        )
                    _record(samples["llm"], turn, ready + first_byte)
                if "tts" in self.services:
                    t_tts = time.perf_counter()
                    async with call.lease("tts") as (conn, sid, ready):
                        first_audio = await speak(conn, sid, reply)
                        await asyncio.sleep(o.playback)  # the audio plays; the context stays open
                    _record(samples["tts"], turn, first_audio - t_tts)
                    response = first_audio - t_turn
                else:
                    response = time.perf_counter() - t_turn
                (result.response_first if turn == 0 else result.response_later).append(response)


def _record(samples: ServiceSamples, turn: int, seconds: float) -> None:
    (samples.first if turn == 0 else samples.later).append(seconds)


class _Call:
    """The connections of one call: leased from the pools, or opened by the call itself."""

    def __init__(
        self,
        sim: CallSimulation,
        mode: Mode,
        stack: AsyncExitStack,
        samples: dict[str, ServiceSamples],
    ) -> None:
        self.sim = sim
        self.mode = mode
        self.stack = stack
        self.samples = samples
        self.conns: dict[str, Any] = {}  # PER_CALL: this call's own connections
        self.sids = itertools.count(1)  # PER_CALL: stream ids on this call's own connections

    async def hold(self, service: str) -> tuple[Any, int | None, float]:
        """A connection for the rest of the call: (conn, stream_id, seconds to get it)."""
        t0 = time.perf_counter()
        if self.mode is Mode.POOLED:
            lease = await self.stack.enter_async_context(self.sim.manager.acquire(service))
            ready = time.perf_counter() - t0
            self.samples[service].acquire.append(ready)
            return lease.conn, lease.stream_id, ready
        conn, ready = await self._connect(service)
        sid = next(self.sids) if self._mux(service) else None
        return conn, sid, ready

    @asynccontextmanager
    async def lease(self, service: str) -> AsyncIterator[tuple[Any, int | None, float]]:
        """A connection for one exchange: yields (conn, stream_id, seconds to get it)."""
        if self.mode is Mode.POOLED:
            t0 = time.perf_counter()
            async with self.sim.manager.acquire(service) as lease:
                ready = time.perf_counter() - t0
                self.samples[service].acquire.append(ready)
                yield lease.conn, lease.stream_id, ready
            return
        adapter = self.sim.adapters[service]
        conn = self.conns.get(service)
        ready = 0.0
        if conn is None:
            conn, ready = await self._connect(service)
        sid = next(self.sids) if self._mux(service) else None
        try:
            yield conn, sid, ready
        except BaseException as exc:
            if sid is not None:
                await adapter.release_stream(conn, sid, exc)
            raise
        if sid is not None:
            await adapter.release_stream(conn, sid, None)
        else:
            await adapter.reset(conn)

    def _mux(self, service: str) -> bool:
        return self.sim.adapters[service].lease_mode is LeaseMode.MULTIPLEXED

    async def _connect(self, service: str) -> tuple[Any, float]:
        adapter = self.sim.adapters[service]
        t0 = time.perf_counter()
        conn = await adapter.connect()
        ready = time.perf_counter() - t0
        if service not in self.sim.lazy:
            self.samples[service].connect.append(ready)
        self.conns[service] = conn
        # Hang-up closes it politely (CloseStream, close_socket, GOAWAY, un-REGISTER).
        self.stack.push_async_callback(adapter.close, conn)
        return conn, ready


# -- one exchange per service: seconds to the first byte of the answer ----------------------------


async def hear(stream: Any, words: str) -> tuple[float, str]:
    """ASR: send the caller's audio, ``Finalize``; (seconds to the first result, final text).

    The Deepgram emulator "hears" printable audio as words. Raises StreamClosed if the stream ends.
    """
    from voicepool.adapters.deepgram import Transcript

    t0 = time.perf_counter()
    await stream.send_audio(words.encode())
    await stream.finalize()
    first: float | None = None
    while True:
        event = await stream.recv()
        if not isinstance(event, Transcript):
            continue
        if first is None:
            first = time.perf_counter() - t0
        if event.is_final:
            return first, event.text or words


async def lookup(conn: Any, phone: str) -> tuple[float, str]:
    """REST: look the caller up in the CRM; (seconds to the response head, contact name)."""
    t0 = time.perf_counter()
    async with conn.get("/v1/contacts", params={"phone": phone}) as resp:
        first = time.perf_counter() - t0
        resp.raise_for_status()
        body = await resp.json()
    contacts = body.get("contacts") or [{}]
    return first, str(contacts[0].get("name", "unknown caller"))


async def think(
    conn: Any, stream_id: int | None, adapter: Any, prompt: str, model: str
) -> tuple[float, str]:
    """LLM: stream a chat completion on one HTTP/2 stream; (seconds to the first token, text).

    Uses the connection directly (``start_request`` on the lease's stream slot) so both modes run
    the same code; ``PooledTransport`` wraps exactly this for httpx and the OpenAI SDK.
    Raises RuntimeError on a non-200 answer, the HTTP/2 errors of the adapter otherwise.
    """
    assert stream_id is not None
    body = json.dumps(
        {"model": model, "stream": True, "messages": [{"role": "user", "content": prompt}]}
    ).encode()
    origin = adapter.origin
    headers = [
        (b":method", b"POST"),
        (b":scheme", origin.scheme.encode()),
        (b":authority", origin.authority.encode()),
        (b":path", f"{adapter.path_prefix}/v1/chat/completions".encode()),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *adapter.default_headers,
    ]
    t0 = time.perf_counter()
    stream = conn.start_request(stream_id, headers, end=False)
    await stream.send(body, end=True)
    status, _ = await stream.response()
    if status != 200:
        raise RuntimeError(f"LLM answered HTTP {status}")
    first: float | None = None
    buffer = b""
    while chunk := await stream.read():
        if first is None:
            first = time.perf_counter() - t0
        buffer += chunk
    return (first if first is not None else time.perf_counter() - t0), _sse_text(buffer)


def _sse_text(buffer: bytes) -> str:
    words: list[str] = []
    for line in buffer.decode("utf-8", "replace").splitlines():
        data = line.removeprefix("data: ").strip()
        if not line.startswith("data: ") or data == "[DONE]":
            continue
        for choice in json.loads(data).get("choices", []):
            words.append(choice.get("delta", {}).get("content") or "")
    return "".join(words).strip()


async def speak(conn: Any, stream_id: int | None, text: str) -> float:
    """TTS: synthesize ``text`` on the lease's context; the ``perf_counter`` time of the first
    audio chunk (the rest of the audio is read too). Raises ContextError / StreamClosed."""
    context = conn.context(stream_id)
    first: float | None = None
    async for _chunk in context.synthesize(text or "."):
        if first is None:
            first = time.perf_counter()
    return first if first is not None else time.perf_counter()

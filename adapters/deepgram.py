"""Deepgram live speech recognition (ASR) over a pooled WebSocket.

The URL carries every recognition parameter (model, encoding, sample rate, endpointing...), so a
socket serves one parameter set; the key goes in ``Authorization: Token <key>``.

Lease modes: ``SINGLE_USE`` by default: a lease is one call's stream; releasing it closes the
stream politely (``CloseStream``: final results, ``Metadata``, close) and the pool keeps
``min_size`` spares warm. Deepgram bills for the time a socket is open: keep spares few. With
``reuse=True`` the adapter is ``EXCLUSIVE``: after a lease, ``reset`` sends ``Finalize``, waits
until every ``Finalize`` sent on the socket (the holder's too) has its ``from_finalize`` result,
and drops what the next holder must not see. Deepgram answers a ``Finalize`` when audio is
buffered and may not otherwise: an unanswered one makes the reset time out after
``finalize_timeout`` and the socket is discarded (never handed on unproven), so holders of reused
sockets should finalize only after audio.

Raw mode (``raw = true``, see :mod:`voicepool.adapters.provider`): the lease is the plain
``websockets`` connection, e.g. for deepgram-sdk's ``AsyncV1SocketClient(websocket=...)``; the
pool keeps the URL, the ``KeepAlive`` of idle sockets and the ``CloseStream`` goodbye.

Keepalive: the pool pings idle sockets at least every ``max_idle / 2`` (Deepgram closes after about
10 s without audio or ``KeepAlive``); each ping sends ``{"type":"KeepAlive"}`` as a *text* frame
and a WebSocket ping. A socket held by a call also sends ``KeepAlive`` whenever no frame went out
for ``keepalive_interval`` (a muted caller must not lose the stream).

In a call handler::

    async with asr_pool.acquire() as lease:
        stream = lease.conn
        await stream.send_audio(chunk)
        async for t in stream.transcripts():
            if t.is_final: ...
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal
from urllib.parse import urlencode

from pydantic import BaseModel, Field, model_validator

from voicepool.adapter import LeaseMode

# Relative imports: mypy cannot map the repo folder adapters/ to voicepool.adapters, and
# a relative import resolves to the installed package at run time (hence the noqa).
from .provider import ProviderAdapter, ProviderOptions, encode  # noqa: TID251
from .websocket import MalformedMessage, ManagedSocket, StreamClosed  # noqa: TID251

__all__ = [
    "DeepgramAdapter",
    "DeepgramConnection",
    "DeepgramDialect",
    "DeepgramEvent",
    "DeepgramOptions",
    "Metadata",
    "ServerError",
    "SpeechStarted",
    "Transcript",
    "UnknownEvent",
    "UtteranceEnd",
]


# -- events ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Transcript:
    """A ``Results`` message: the best alternative of channel 0."""

    text: str
    is_final: bool
    speech_final: bool
    from_finalize: bool
    start: float
    duration: float
    confidence: float | None
    raw: dict[str, Any] = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class UtteranceEnd:
    last_word_end: float
    raw: dict[str, Any] = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    timestamp: float
    raw: dict[str, Any] = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Metadata:
    """Sent once, after ``CloseStream``, before the server closes the socket."""

    request_id: str
    duration: float
    raw: dict[str, Any] = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class ServerError:
    """An ``Error`` message (the stream usually closes right after)."""

    description: str
    raw: dict[str, Any] = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class UnknownEvent:
    type: str
    raw: dict[str, Any] = field(repr=False, compare=False)


DeepgramEvent = Transcript | UtteranceEnd | SpeechStarted | Metadata | ServerError | UnknownEvent


class DeepgramDialect:
    """The live streaming wire format: control messages and typed server events (no I/O)."""

    provider = "Deepgram"

    def keepalive_messages(self, open_contexts: list[str]) -> list[dict[str, Any]]:
        return [{"type": "KeepAlive"}]  # a *text* frame: Deepgram ignores a binary one

    def goodbye_messages(self) -> list[dict[str, Any]]:
        # Final results and Metadata follow, then the server closes (1000).
        return [{"type": "CloseStream"}]

    def finalize_message(self) -> dict[str, Any]:
        # Answered by one final result with ``from_finalize``, after those of earlier audio.
        return {"type": "Finalize"}

    def parse(self, message: str | bytes) -> DeepgramEvent:
        return parse_event(message)


def parse_event(message: str | bytes) -> DeepgramEvent:
    """Parse one server message. Raises MalformedMessage (Deepgram sends JSON text only)."""
    if isinstance(message, bytes):
        raise MalformedMessage(f"unexpected binary message ({len(message)} bytes) from Deepgram")
    try:
        msg = json.loads(message)
        kind = msg["type"]
        if kind == "Results":
            alt = msg["channel"]["alternatives"][0]
            return Transcript(
                text=str(alt["transcript"]),
                is_final=bool(msg.get("is_final", False)),
                speech_final=bool(msg.get("speech_final", False)),
                from_finalize=bool(msg.get("from_finalize", False)),
                start=float(msg.get("start", 0.0)),
                duration=float(msg.get("duration", 0.0)),
                confidence=alt.get("confidence"),
                raw=msg,
            )
        if kind == "UtteranceEnd":
            return UtteranceEnd(float(msg.get("last_word_end", 0.0)), msg)
        if kind == "SpeechStarted":
            return SpeechStarted(float(msg.get("timestamp", 0.0)), msg)
        if kind == "Metadata":
            return Metadata(str(msg.get("request_id", "")), float(msg.get("duration", 0.0)), msg)
        if kind == "Error":
            return ServerError(str(msg.get("description") or msg.get("message") or ""), msg)
        return UnknownEvent(str(kind), msg)
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise MalformedMessage(
            f"malformed message from Deepgram: {type(exc).__name__}: {str(message)[:80]!r}"
        ) from exc


# -- options --------------------------------------------------------------------------------------


class DeepgramOptions(ProviderOptions):
    """Typed options; the URL is ``url + path + ?query`` built from them."""

    url: str = "wss://api.deepgram.com"
    path: str = "/v1/listen"
    auth_header: str = "Authorization"
    auth_scheme: str = "Token"
    model: str = "nova-3"
    language: str | None = None
    encoding: Literal["linear16", "linear32", "flac", "mulaw", "alaw", "opus", "speex"] | None = (
        "linear16"
    )
    sample_rate: int | None = Field(default=16000, gt=0)
    channels: int = Field(default=1, ge=1)
    interim_results: bool = True
    endpointing: int | Literal[False] | None = Field(
        default=300, description="ms of silence; False: off"
    )
    utterance_end_ms: int | None = None
    vad_events: bool = False
    smart_format: bool = False
    punctuate: bool | None = None
    params: dict[str, str] = Field(default_factory=dict, description="More query parameters.")
    max_idle: float | None = Field(
        default=10.0, gt=0, description="Deepgram's idle close (about 10 s)."
    )
    keepalive_interval: float = Field(
        default=4.0, gt=0, description="KeepAlive period of held sockets."
    )
    reuse: bool = Field(default=False, description="EXCLUSIVE leases with Finalize as the reset.")
    finalize_timeout: float = Field(
        default=3.0, gt=0, description="reset() waits this for Finalize."
    )

    @model_validator(mode="after")
    def _keepalive_fits(self) -> DeepgramOptions:
        if self.raw and self.reuse:
            raise ValueError(
                "raw and reuse together: a raw socket is read by its holder only, so no reset"
                " can prove it clean (raw leases are single_use)"
            )
        if self.max_idle is not None and self.keepalive_interval >= self.max_idle:
            raise ValueError(
                f"keepalive_interval ({self.keepalive_interval}) must be below max_idle"
                f" ({self.max_idle})"
            )
        return self

    def query(self) -> dict[str, str]:
        q: dict[str, str] = {"model": self.model}
        if self.language:
            q["language"] = self.language
        if self.encoding:
            q["encoding"] = self.encoding
        if self.sample_rate:
            q["sample_rate"] = str(self.sample_rate)
        q["channels"] = str(self.channels)
        q["interim_results"] = _flag(self.interim_results)
        if self.endpointing is not None:
            q["endpointing"] = "false" if self.endpointing is False else str(self.endpointing)
        if self.utterance_end_ms is not None:
            q["utterance_end_ms"] = str(self.utterance_end_ms)
        if self.vad_events:
            q["vad_events"] = "true"
        if self.smart_format:
            q["smart_format"] = "true"
        if self.punctuate is not None:
            q["punctuate"] = _flag(self.punctuate)
        q.update(self.params)
        return q


def _flag(value: bool) -> str:
    return "true" if value else "false"


# -- connection -----------------------------------------------------------------------------------


_END: Any = object()  # queued when the stream ended normally (CloseStream, then close 1000)


class DeepgramConnection(ManagedSocket):
    """One Deepgram stream: send audio and control messages, receive typed events.

    Methods that send raise :class:`StreamClosed` once the socket is gone; the event iterators
    raise it when the stream ends abnormally and stop after a requested close (``CloseStream``).
    All are cancellation-safe (a cancelled receive loses no event).
    """

    def __init__(self, ws: Any, adapter: DeepgramAdapter) -> None:
        o = adapter.options
        dialect = adapter.dialect
        self.dialect = dialect
        [self._keepalive_text] = encode(dialect.keepalive_messages([]))
        [self._finalize_text] = encode([dialect.finalize_message()])
        [self._close_text] = encode(dialect.goodbye_messages())
        super().__init__(
            ws,
            adapter,
            keepalive_interval=o.keepalive_interval if o.keepalive else None,
            close_timeout=o.close_timeout,
        )
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        # Every Finalize is answered by one ``from_finalize`` result, in order: a reset is at a
        # boundary only when all of them (the holder's too) are answered.
        self.finalizes_sent = 0
        self.finalizes_answered = 0
        self._finalized = asyncio.Event()
        self._finalized.set()
        self.closing = False
        self.audio_since_finalize = False
        self.metadata: Metadata | None = None

    # -- sending ----------------------------------------------------------------------------------

    async def send_audio(self, chunk: bytes) -> None:
        """Send one audio chunk (binary frame). Raises ValueError on an empty chunk (an empty frame
        would end the stream: use :meth:`close_stream`)."""
        if not chunk:
            raise ValueError("empty audio chunk: an empty frame closes the stream")
        await self.send(chunk)
        self.audio_since_finalize = True

    async def keep_alive(self) -> None:
        await self.send(self._keepalive_text)
        self.keepalives_sent += 1

    async def finalize(self) -> None:
        """Ask for the results of all audio sent so far (they carry ``from_finalize``)."""
        self.finalizes_sent += 1
        self._finalized.clear()
        try:
            await self.send(self._finalize_text)
        except BaseException:
            self.finalizes_sent -= 1  # (a frame is queued whole or not at all)
            raise
        self.audio_since_finalize = False

    async def close_stream(self) -> None:
        """End the stream: the server sends final results, ``Metadata``, then closes."""
        self.closing = True
        await self.send(self._close_text)

    # -- receiving --------------------------------------------------------------------------------

    async def recv(self) -> DeepgramEvent:
        """The next event. Raises StreamClosed when the stream is over (StopAsyncIteration-like
        end after ``close_stream`` is reported as StreamClosed with code 1000)."""
        item = await self._events.get()
        if item is _END or isinstance(item, StreamClosed):
            self._events.put_nowait(item)  # every later receive sees the end too
            if item is _END:
                raise StreamClosed(f"{self.where}: stream closed", code=1000)
            raise StreamClosed(str(item), code=item.code, reason=item.reason)
        event: DeepgramEvent = item
        return event

    async def events(self) -> AsyncIterator[DeepgramEvent]:
        """Every event until the stream ends. Ends quietly after :meth:`close_stream`; raises
        StreamClosed if the socket closes otherwise."""
        while True:
            try:
                yield await self.recv()
            except StreamClosed as exc:
                if exc.code == 1000 and self.closing:
                    return
                raise

    async def transcripts(self) -> AsyncIterator[Transcript]:
        """Only the ``Results`` events (interim and final), as :class:`Transcript`."""
        async for event in self.events():
            if isinstance(event, Transcript):
                yield event

    def drain(self) -> int:
        """Drop queued events (what a previous holder left); return how many."""
        n = 0
        while not self._events.empty():
            item = self._events.get_nowait()
            if item is _END or isinstance(item, StreamClosed):
                self._events.put_nowait(item)
                break
            n += 1
        return n

    # -- ManagedSocket hooks ----------------------------------------------------------------------

    def on_message(self, message: str | bytes) -> None:
        event = self.dialect.parse(message)
        if isinstance(event, Transcript) and event.from_finalize:
            self.finalizes_answered += 1
            if self.finalizes_answered >= self.finalizes_sent:
                self._finalized.set()
        elif isinstance(event, Metadata):
            self.metadata = event
        self._events.put_nowait(event)

    def on_closed(self, error: StreamClosed) -> None:
        self._finalized.set()
        clean = error.code == 1000 and self.closing and not isinstance(error, MalformedMessage)
        self._events.put_nowait(_END if clean else error)

    def keepalive_messages(self) -> list[str]:
        return [self._keepalive_text]

    def __repr__(self) -> str:
        state = "open" if self.is_open else "closed"
        return f"<DeepgramConnection {self.where} {state}>"


# -- adapter --------------------------------------------------------------------------------------


class DeepgramAdapter(ProviderAdapter[DeepgramConnection]):
    """Pool adapter for Deepgram live ASR (see the module doc). Registered as ``deepgram``."""

    Options: ClassVar[type[BaseModel] | None] = DeepgramOptions
    options: DeepgramOptions
    service: ClassVar[str | None] = "asr"
    dialect: DeepgramDialect
    lease_mode: LeaseMode = LeaseMode.SINGLE_USE
    max_idle: float | None = 10.0
    waits_for_server_close: ClassVar[bool] = True

    def __init__(self, options: DeepgramOptions | None = None, **kwargs: Any) -> None:
        super().__init__(options, **kwargs)
        self.dialect = DeepgramDialect()
        if self.options.reuse:
            self.lease_mode = LeaseMode.EXCLUSIVE

    def url(self) -> str:
        o = self.options
        return f"{o.url.rstrip('/')}{o.path}?{urlencode(o.query())}"

    async def connect(self) -> DeepgramConnection:
        conn = DeepgramConnection(await self.open_socket(), self)
        conn.start()
        return conn

    async def ping(self, conn: DeepgramConnection) -> None:
        """``KeepAlive`` (text) + WebSocket ping/pong. Raises StreamClosed on a closed socket."""
        await conn.ping(self.idle_keepalives())

    def is_open(self, conn: DeepgramConnection) -> bool:
        return conn.is_open

    async def reset(self, conn: DeepgramConnection) -> None:
        """EXCLUSIVE reuse: ``Finalize`` if audio flowed, wait until every Finalize sent on the
        socket (the holder's too) is answered, then drop what the holder left unread.

        Raises StreamClosed (socket gone) or TimeoutError (not all answered within
        ``finalize_timeout``): the pool then discards the socket.
        """
        conn.check_open()
        if conn.closing:
            raise StreamClosed(f"{conn.where}: stream was closed by its holder")
        if conn.audio_since_finalize:
            await conn.finalize()
        async with asyncio.timeout(self.options.finalize_timeout):
            await conn._finalized.wait()
        conn.check_open()
        conn.drain()

    async def close(self, conn: DeepgramConnection) -> None:
        """``CloseStream``, wait for the server's close (bounded by ``close_timeout``), close."""
        goodbye = [] if conn.closing else self.goodbyes()
        conn.closing = True
        await conn.aclose(goodbye, wait_for_server=True)

"""TTS emulators on 127.0.0.1: `ElevenLabsEmulator` (multi-context) and `CartesiaEmulator`.

Faithful to reference/protocols.md where it marks (E); where the providers' docs leave a detail
open, the choice is written here.

ElevenLabs (``/v1/text-to-speech/{voice}/multi-stream-input``, header ``xi-api-key``):

* A context is created by the first message with a ``text`` field (even an empty one) for a new
  ``context_id``, or by the first non-empty text without one (the default context). A 6th open
  context gets an error message and close 1008 "Maximum simultaneous contexts per WebSocket
  connection exceeded" (E). ``{"text": ""}`` is a keepalive; without a ``context_id`` it opens no
  context, with one it opens that context like any other message naming it.
* ``flush`` generates the buffered text; ``close_context`` frees the slot at once, generates what
  is still buffered, then sends ``{"isFinal": true, "contextId": ...}``. ``close_socket``: 1000.
* No text frame for ``inactivity_timeout`` (URL parameter, default 20 s, capped by the emulator's
  ``idle_timeout``) closes 1008 ``input_timeout_exceeded`` (E). WebSocket pings do not count.
* Above ``max_concurrency`` open sockets the handshake gets 429 (E). Invalid JSON: close 1007.

Cartesia (``/tts/websocket``, headers ``X-API-Key`` + ``Cartesia-Version``):

* Requests carry ``context_id``, ``transcript``, ``continue``; ``cancel`` stops a context at once.
  Server: ``chunk`` / ``done`` / ``flush_done`` / ``error`` messages with base64 ``data``.
* ``max_concurrency`` counts active contexts: one more gets an ``error`` with ``status_code`` 429
  for that context (the socket lives on); sockets above ``max_sockets`` (default 10x) get HTTP 429
  at the handshake (E). A done context expires ``context_ttl`` (1 s) after its last audio.
* No request for ``idle_timeout`` (5 min) closes the socket (E); there is no keepalive message.

Audio is deterministic: each character of text becomes ``bytes_per_char`` bytes of PCM, sent in
chunks of ``chunk_bytes``, ``chunk_interval`` seconds apart (0: as fast as the socket goes), the
first after ``first_chunk_delay``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from websockets.datastructures import Headers

from voicepool.testing._wsemulator import EmulatorSession, WebSocketEmulator

__all__ = ["CartesiaEmulator", "ElevenLabsEmulator"]

_EL_PATH = re.compile(r"^/v1/text-to-speech/([^/]+)/multi-stream-input$")
_END: Any = object()


def synthesize(text: str, bytes_per_char: int) -> bytes:
    """Deterministic "speech" for ``text``."""
    return b"".join(bytes([ord(c) & 0xFF]) * bytes_per_char for c in text)


class _TTSEmulator(WebSocketEmulator):
    """Audio pacing shared by both TTS emulators."""

    def __init__(
        self,
        *,
        bytes_per_char: int = 32,
        chunk_bytes: int = 1024,
        chunk_interval: float = 0.0,
        first_chunk_delay: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.bytes_per_char = bytes_per_char
        self.chunk_bytes = chunk_bytes
        self.chunk_interval = chunk_interval
        self.first_chunk_delay = first_chunk_delay
        self.contexts_opened = 0
        self.contexts_closed = 0
        self.max_contexts_per_socket = 0
        self.audio_chunks = 0

    def chunks(self, text: str) -> list[bytes]:
        pcm = synthesize(text, self.bytes_per_char)
        n = self.chunk_bytes
        return [pcm[i : i + n] for i in range(0, len(pcm), n)]

    async def pace(self, index: int) -> None:
        delay = self.first_chunk_delay if index == 0 else self.chunk_interval
        if delay:
            await asyncio.sleep(delay)


# -- ElevenLabs -----------------------------------------------------------------------------------


@dataclass
class _ELContext:
    id: str
    buffer: list[str] = field(default_factory=list)
    jobs: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    worker: asyncio.Task[None] | None = None
    closed: bool = False


class ElevenLabsEmulator(_TTSEmulator):
    """ElevenLabs-like multi-context TTS. Extra counters: ``contexts_open`` (now, all sockets),
    ``contexts_opened``, ``contexts_closed``, ``max_contexts_per_socket``, ``keepalives``,
    ``flushes``, ``context_limit_closes``, ``audio_chunks``."""

    name: ClassVar[str] = "elevenlabs-emulator"
    auth_header: ClassVar[str] = "xi-api-key"
    auth_scheme: ClassVar[str] = ""
    default_idle_timeout: ClassVar[float | None] = 20.0
    idle_close_code: ClassVar[int] = 1008
    idle_close_reason: ClassVar[str] = "input_timeout_exceeded"
    max_contexts: ClassVar[int] = 5

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.keepalives = 0
        self.flushes = 0
        self.context_limit_closes = 0

    @property
    def contexts_open(self) -> int:
        return sum(len(s.state) for s in self.sessions.values() if s.state is not None)

    def route(self, path: str, query: dict[str, str], headers: Headers) -> int | None:
        if not _EL_PATH.match(path):
            return 404
        timeout = query.get("inactivity_timeout", "20")
        if not timeout.isdigit() or not 1 <= int(timeout) <= 180:
            return 400
        return None

    async def serve_session(self, session: EmulatorSession) -> None:
        url_timeout = float(session.query.get("inactivity_timeout", "20"))
        if self.idle_timeout is not None:
            session.idle_timeout = min(url_timeout, self.idle_timeout)
        open_: dict[str, _ELContext] = {}
        session.state = open_
        workers: list[asyncio.Task[None]] = []
        try:
            while True:
                raw = await session.ws.recv()
                session.messages += 1
                msg = _json_object(raw)
                if msg is None:
                    self.malformed_inputs += 1
                    await session.ws.send(json.dumps({"message": "Invalid message", "code": 1007}))
                    await session.close(1007, "invalid message")
                    return
                session.touch()
                if msg.get("close_socket"):
                    await session.close(1000, "")
                    return
                named = msg.get("context_id")
                cid = str(named or "default")
                ctx = open_.get(cid)
                text = msg.get("text")
                if ctx is None and isinstance(text, str) and (text or named):
                    if len(open_) >= self.max_contexts:
                        await self._too_many(session, len(open_))
                        return
                    ctx = open_[cid] = _ELContext(cid)
                    ctx.worker = asyncio.get_running_loop().create_task(self._work(session, ctx))
                    workers.append(ctx.worker)
                    self.contexts_opened += 1
                    self.max_contexts_per_socket = max(self.max_contexts_per_socket, len(open_))
                if text == "":
                    self.keepalives += 1
                elif isinstance(text, str) and ctx is not None and text.strip():
                    ctx.buffer.append(text)
                if ctx is None:
                    continue
                if msg.get("flush"):
                    self.flushes += 1
                    self._flush(ctx)
                if msg.get("close_context"):
                    del open_[cid]  # the slot is free at once
                    self.contexts_closed += 1
                    self._flush(ctx)
                    ctx.jobs.put_nowait(_END)
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    def end_session(self, session: EmulatorSession) -> None:
        if session.state:
            self.contexts_closed += len(session.state)
            session.state.clear()

    def _flush(self, ctx: _ELContext) -> None:
        if ctx.buffer:
            ctx.jobs.put_nowait("".join(ctx.buffer))
            ctx.buffer.clear()

    async def _too_many(self, session: EmulatorSession, count: int) -> None:
        self.context_limit_closes += 1
        reason = "Maximum simultaneous contexts per WebSocket connection exceeded"
        await session.ws.send(
            json.dumps(
                {
                    "message": f"{reason} ({count}). Please close an existing context first.",
                    "error": "max_active_conversations",
                    "code": 1008,
                }
            )
        )
        await session.close(1008, reason)

    async def _work(self, session: EmulatorSession, ctx: _ELContext) -> None:
        while True:
            job = await ctx.jobs.get()
            if job is _END:
                await session.ws.send(json.dumps({"isFinal": True, "contextId": ctx.id}))
                return
            for i, chunk in enumerate(self.chunks(job)):
                await self.pace(i)
                payload = {
                    "audio": base64.b64encode(chunk).decode(),
                    "isFinal": False,
                    "normalizedAlignment": None,
                    "contextId": ctx.id,
                }
                await session.ws.send(json.dumps(payload))
                self.audio_chunks += 1


# -- Cartesia -------------------------------------------------------------------------------------


@dataclass
class _CContext:
    id: str
    jobs: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    worker: asyncio.Task[None] | None = None
    ended: bool = False  # no more input accepted
    finished: bool = False  # audio complete or cancelled: no longer counts as active
    flush_id: int = 0
    expiry: asyncio.TimerHandle | None = None


class CartesiaEmulator(_TTSEmulator):
    """Cartesia-like TTS. Extra counters: ``contexts_active`` (now), ``contexts_opened``,
    ``contexts_closed``, ``cancels``, ``context_errors`` (Counter by status), ``audio_chunks``."""

    name: ClassVar[str] = "cartesia-emulator"
    auth_header: ClassVar[str] = "X-API-Key"
    auth_scheme: ClassVar[str] = ""
    default_idle_timeout: ClassVar[float | None] = 300.0
    idle_close_code: ClassVar[int] = 1000
    idle_close_reason: ClassVar[str] = "idle timeout"
    path: ClassVar[str] = "/tts/websocket"

    def __init__(
        self, *, max_sockets: int | None = None, context_ttl: float = 1.0, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        limit = self.max_concurrency
        self.max_sockets = max_sockets if max_sockets is not None else (limit and 10 * limit)
        self.context_ttl = context_ttl
        self.cancels = 0
        self.context_errors: dict[int, int] = {}

    @property
    def contexts_active(self) -> int:
        return sum(
            1
            for s in self.sessions.values()
            if s.state is not None
            for c in s.state.values()
            if not c.finished
        )

    def handshake_limit(self) -> int | None:
        return self.max_sockets

    def route(self, path: str, query: dict[str, str], headers: Headers) -> int | None:
        if path != self.path:
            return 404
        if not (headers.get("Cartesia-Version") or query.get("cartesia_version")):
            return 400
        return None

    def _check_key(self, headers: Headers, query: dict[str, str]) -> bool:
        if self.api_key is None:
            return True
        return self.api_key in (headers.get(self.auth_header), query.get("api_key"))

    async def serve_session(self, session: EmulatorSession) -> None:
        contexts: dict[str, _CContext] = {}
        session.state = contexts
        try:
            while True:
                raw = await session.ws.recv()
                session.messages += 1
                msg = _json_object(raw)
                if msg is None:
                    self.malformed_inputs += 1
                    await self._error(session, None, 400, "invalid JSON message")
                    continue
                session.touch()
                await self._handle(session, contexts, msg)
        finally:
            for ctx in contexts.values():
                self._drop(ctx)
            await asyncio.gather(
                *(c.worker for c in contexts.values() if c.worker), return_exceptions=True
            )

    async def _handle(
        self, session: EmulatorSession, contexts: dict[str, _CContext], msg: dict[str, Any]
    ) -> None:
        cid = msg.get("context_id")
        if not isinstance(cid, str) or not cid:
            await self._error(session, None, 400, "context_id is required")
            return
        ctx = contexts.get(cid)
        if msg.get("cancel"):
            if ctx is not None and not ctx.finished:
                self.cancels += 1
                self._drop(ctx)
                del contexts[cid]
            return
        if ctx is not None and ctx.ended:
            await self._error(session, cid, 400, "context is done; use a new context_id")
            return
        if ctx is None:
            missing = [k for k in ("model_id", "voice", "output_format") if k not in msg]
            if missing or not isinstance(msg.get("transcript"), str):
                await self._error(session, cid, 400, f"invalid request: missing {missing}")
                return
            limit = self.max_concurrency
            if limit is not None and self.contexts_active >= limit:
                await self._error(session, cid, 429, f"concurrency limit ({limit}) reached")
                return
            ctx = contexts[cid] = _CContext(cid)
            ctx.worker = asyncio.get_running_loop().create_task(self._work(session, contexts, ctx))
            self.contexts_opened += 1
            active = sum(1 for c in contexts.values() if not c.finished)
            self.max_contexts_per_socket = max(self.max_contexts_per_socket, active)
        text = msg.get("transcript")
        if isinstance(text, str) and text:
            ctx.jobs.put_nowait(text)
        if msg.get("flush"):
            ctx.jobs.put_nowait(("flush",))
        if not msg.get("continue", False):
            ctx.ended = True  # no more input; `done` follows the audio
            ctx.jobs.put_nowait(_END)

    def _drop(self, ctx: _CContext) -> None:
        if not ctx.finished:
            ctx.finished = True
            self.contexts_closed += 1
        ctx.ended = True
        if ctx.worker is not None:
            ctx.worker.cancel()
        if ctx.expiry is not None:
            ctx.expiry.cancel()

    async def _error(
        self, session: EmulatorSession, cid: str | None, status: int, text: str
    ) -> None:
        self.context_errors[status] = self.context_errors.get(status, 0) + 1
        msg: dict[str, Any] = {"type": "error", "status_code": status, "done": True, "error": text}
        if cid is not None:
            msg["context_id"] = cid
        await session.ws.send(json.dumps(msg))

    async def _work(
        self, session: EmulatorSession, contexts: dict[str, _CContext], ctx: _CContext
    ) -> None:
        sent = 0
        while True:
            job = await ctx.jobs.get()
            base = {"context_id": ctx.id, "status_code": 206}
            if job is _END:
                await session.ws.send(json.dumps({"type": "done", "done": True, **base}))
                ctx.finished = True
                self.contexts_closed += 1
                # The context lingers briefly after its last audio, then expires.
                ctx.expiry = asyncio.get_running_loop().call_later(
                    self.context_ttl, lambda: contexts.pop(ctx.id, None)
                )
                return
            if isinstance(job, tuple):
                ctx.flush_id += 1
                done = {"type": "flush_done", "flush_done": True, "flush_id": ctx.flush_id}
                await session.ws.send(json.dumps({**done, "done": False, **base}))
                continue
            for chunk in self.chunks(job):
                await self.pace(sent)
                sent += 1
                msg = {
                    "type": "chunk",
                    "data": base64.b64encode(chunk).decode(),
                    "done": False,
                    "step_time": 1.0,
                    "flush_id": ctx.flush_id,
                    **base,
                }
                await session.ws.send(json.dumps(msg))
                self.audio_chunks += 1


def _json_object(raw: str | bytes) -> dict[str, Any] | None:
    if isinstance(raw, bytes):
        return None
    try:
        msg = json.loads(raw)
    except ValueError:
        return None
    return msg if isinstance(msg, dict) else None

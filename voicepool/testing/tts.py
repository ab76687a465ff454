"""TTS emulators on 127.0.0.1: `ElevenLabsEmulator` and `CartesiaEmulator`.

Each behaviour follows docs/providers.md (which names the source of every fact); where the
providers' docs leave a detail open, the choice is written here and marked there.

ElevenLabs (``/v1/text-to-speech/{voice}/stream-input`` and ``.../multi-stream-input``):

* The key travels in the ``xi-api-key`` header (a wrong one: HTTP 401) or, when the header is
  absent, as ``xi_api_key`` / ``authorization: Bearer`` in the first message (a wrong or missing
  one: close 1008). ``model_id=eleven_v3*`` on multi-stream-input gets HTTP 403.
* stream-input (one context): the first message must be ``{"text": " "}`` (with optional
  ``voice_settings``); text is buffered until ``flush`` or the end-of-input ``{"text": ""}``, which
  generates the rest, sends ``{"isFinal": true}`` and closes 1000.
* multi-stream-input: any message naming a new ``context_id`` is that context's first message and
  creates it, ``{"text": "", "context_id": X}`` included (so a keepalive for an unknown context
  takes one of the 5 slots); a bare ``{"text": ""}`` is a context-less keepalive that opens none.
  A 6th open context gets an error message and close 1008 "Maximum simultaneous contexts per
  WebSocket connection exceeded". ``voice_settings`` on any later
  message of a context: close 1008 "voice_settings field must be provided in the first message".
  ``flush`` generates the buffered text; ``close_context`` frees the slot at once, generates what
  is still buffered, then sends ``{"isFinal": true, "contextId": ...}``. ``close_socket``: 1000.
* No text frame for ``inactivity_timeout`` (URL parameter, default 20 s, capped by the emulator's
  ``idle_timeout``) closes 1008 ``input_timeout_exceeded``. WebSocket pings do not count.
* Above ``max_concurrency`` open sockets the handshake gets 429. Invalid JSON: close 1007.

Cartesia (``/tts/websocket``; key in ``Authorization: Bearer`` (SDK 4.x), ``X-API-Key`` or
``?api_key=``; version in ``Cartesia-Version`` or ``?cartesia_version=``, checked against
``versions``):

* Requests carry ``context_id``, ``transcript``, ``continue``; ``cancel`` stops a context at once.
  Server: ``chunk`` / ``done`` / ``flush_done`` / ``error`` messages with base64 ``data``.
* ``max_concurrency`` counts active contexts: one more gets an ``error`` with ``status_code`` 429
  for that context (the socket lives on); sockets above ``max_sockets`` (default 10x) get HTTP 429
  at the handshake. A done context expires ``context_ttl`` (1 s) after its last audio.
* No request for ``idle_timeout`` (5 min) closes the socket; there is no keepalive message.

Audio is deterministic: each character of text becomes ``bytes_per_char`` bytes of PCM, sent in
chunks of ``chunk_bytes``, ``chunk_interval`` seconds apart (0: as fast as the socket goes), the
first after ``first_chunk_delay``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, ClassVar

from websockets.datastructures import Headers

from voicepool.testing._wsemulator import EmulatorSession, WebSocketEmulator

__all__ = ["CARTESIA_VERSIONS", "CartesiaEmulator", "ElevenLabsEmulator"]

CARTESIA_VERSIONS = (
    "2024-06-10",
    "2024-11-13",
    "2025-03-01",
    "2025-04-16",
    "2026-03-01",
    "2026-08-14",
)
"""``Cartesia-Version`` values the emulator serves (docs/providers.md); the last is what the
cartesia 4.x SDK sends and what :class:`~voicepool.adapters.cartesia.CartesiaAdapter` uses."""

_CARTESIA_ERROR_CODES = {400: "invalid_request", 429: "concurrency_limited"}

_EL_PATH = re.compile(r"^/v1/text-to-speech/([^/]+)/(stream-input|multi-stream-input)$")
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


class _ELPolicyClose(Exception):
    """A message the service answers with an error message and close 1008."""

    def __init__(self, reason: str, error: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error


class ElevenLabsEmulator(_TTSEmulator):
    """ElevenLabs-like TTS, single-context ``stream-input`` and ``multi-stream-input``.

    Extra counters: ``contexts_open`` (now, all sockets), ``contexts_opened``,
    ``contexts_closed``, ``max_contexts_per_socket``, ``keepalives``, ``keepalive_contexts``
    (contexts a keepalive opened: they hold a slot like any other), ``flushes``,
    ``context_limit_closes``, ``policy_closes`` (Counter by reason), ``audio_chunks``.
    """

    name: ClassVar[str] = "elevenlabs-emulator"
    auth_header: ClassVar[str] = "xi-api-key"
    auth_scheme: ClassVar[str] = ""
    default_idle_timeout: ClassVar[float | None] = 20.0
    idle_close_code: ClassVar[int] = 1008
    idle_close_reason: ClassVar[str] = "input_timeout_exceeded"
    max_contexts: ClassVar[int] = 5
    multi_context_unsupported: ClassVar[tuple[str, ...]] = ("eleven_v3",)

    def __init__(self, *, key_in_first_message: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # False: a handshake without the xi-api-key header gets HTTP 401 (the service accepts
        # it and expects the key in the first message; tests of handshake-time auth turn it off).
        self.key_in_first_message = key_in_first_message
        self.keepalives = 0
        self.keepalive_contexts = 0  # contexts whose first message was a keepalive ({"text": ""})
        self.flushes = 0
        self.context_limit_closes = 0
        self.policy_closes: Counter[str] = Counter()

    @property
    def contexts_open(self) -> int:
        return sum(len(s.state) for s in self.sessions.values() if s.state is not None)

    def route(self, path: str, query: dict[str, str], headers: Headers) -> int | None:
        match = _EL_PATH.match(path)
        if match is None:
            return 404
        timeout = query.get("inactivity_timeout", "20")
        if not timeout.isdigit() or not 1 <= int(timeout) <= 180:
            return 400
        model = query.get("model_id", "")
        if match[2] == "multi-stream-input" and model.startswith(self.multi_context_unsupported):
            return 403  # multi-context is not available for eleven_v3 (docs/providers.md)
        return None

    def account_of(self, headers: Headers, query: dict[str, str]) -> str | None:
        if headers.get(self.auth_header) is None and self.key_in_first_message:
            return self.api_key  # counted under the main account until its first message
        return super().account_of(headers, query)

    def _check_key(self, headers: Headers, query: dict[str, str]) -> bool:
        # Without the header the key may come in the first message (checked in the session).
        if self.api_key is not None and headers.get(self.auth_header) is None:
            return self.key_in_first_message
        return super()._check_key(headers, query)

    def _first_message_key_ok(self, msg: dict[str, Any]) -> bool:
        offered = {msg.get("xi_api_key"), (msg.get("authorization") or "").removeprefix("Bearer ")}
        return self.api_key is None or bool(offered & self.api_keys)

    async def serve_session(self, session: EmulatorSession) -> None:
        url_timeout = float(session.query.get("inactivity_timeout", "20"))
        if self.idle_timeout is not None:
            session.idle_timeout = min(url_timeout, self.idle_timeout)
        open_: dict[str, _ELContext] = {}
        session.state = open_
        multi = session.path.endswith("/multi-stream-input")
        key_pending = self.api_key is not None and session.headers.get(self.auth_header) is None
        first_messages: set[str] = set()  # contexts whose first message has been seen
        closing: set[str] = set()  # closed contexts whose audio is still being sent
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
                if key_pending:
                    if not self._first_message_key_ok(msg):
                        raise _ELPolicyClose("Invalid API key", "invalid_api_key")
                    key_pending = False
                if multi and msg.get("close_socket"):
                    await session.close(1000, "")
                    return
                text = msg.get("text")
                if multi and not msg.get("context_id") and text == "" and len(msg) == 1:
                    # A context-less keepalive (what Pipecat sends on a socket without an open
                    # context): it keeps the socket and opens no context.
                    self.keepalives += 1
                    continue
                cid = str(msg.get("context_id") or "default") if multi else "default"
                ctx = open_.get(cid)
                first = cid not in first_messages
                if "voice_settings" in msg and not first:
                    raise _ELPolicyClose(
                        "voice_settings field must be provided in the first message",
                        "invalid_request",
                    )
                text = msg.get("text")
                if ctx is None and cid in closing:
                    # Closed but still generating: not a new context (the id is reused only
                    # once its audio is done).
                    self.keepalives += text == ""
                    continue
                if ctx is None and not msg.get("close_context"):
                    if first_messages and not multi:
                        continue  # single context: input after the end is ignored
                    if len(open_) >= self.max_contexts:
                        await self._too_many(session, len(open_))
                        return
                    if not multi and text != " ":
                        raise _ELPolicyClose(
                            'the first message must be {"text": " "}', "invalid_request"
                        )
                    first_messages.add(cid)
                    ctx = open_[cid] = _ELContext(cid)
                    ctx.worker = asyncio.get_running_loop().create_task(
                        self._work(session, ctx, multi, closing)
                    )
                    workers.append(ctx.worker)
                    self.contexts_opened += 1
                    self.keepalive_contexts += text == ""
                    self.max_contexts_per_socket = max(self.max_contexts_per_socket, len(open_))
                    if multi:
                        # The first message of a context: its text (if any) is synthesised.
                        first = False
                if ctx is None:
                    continue
                end = not multi and text == "" and not first
                if text == "" and multi:
                    self.keepalives += 1
                elif isinstance(text, str) and text.strip():
                    ctx.buffer.append(text)
                if msg.get("flush"):
                    self.flushes += 1
                    self._flush(ctx)
                if msg.get("close_context") or end:
                    del open_[cid]  # the slot is free at once
                    closing.add(cid)
                    first_messages.discard(cid)
                    self.contexts_closed += 1
                    self._flush(ctx)
                    ctx.jobs.put_nowait(_END)
        except _ELPolicyClose as exc:
            self.policy_closes[exc.reason] += 1
            error = {"message": exc.reason, "error": exc.error, "code": 1008}
            await session.ws.send(json.dumps(error))
            await session.close(1008, exc.reason)
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

    async def _work(
        self, session: EmulatorSession, ctx: _ELContext, multi: bool, closing: set[str]
    ) -> None:
        # Audio messages carry no `isFinal` (the SDK's AudioOutput / AudioOutputMulti); the
        # context's last message is `{"isFinal": true}` (FinalOutput / FinalOutputMulti).
        tag = {"contextId": ctx.id} if multi else {}
        while True:
            job = await ctx.jobs.get()
            if job is _END:
                await session.ws.send(json.dumps({"isFinal": True, **tag}))
                closing.discard(ctx.id)
                if not multi:
                    await session.close(1000, "")
                return
            for i, chunk in enumerate(self.chunks(job)):
                await self.pace(i)
                payload = {
                    "audio": base64.b64encode(chunk).decode(),
                    "normalizedAlignment": None,
                    "alignment": None,
                    **tag,
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
        self,
        *,
        max_sockets: int | None = None,
        context_ttl: float = 1.0,
        versions: Iterable[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.versions = frozenset(CARTESIA_VERSIONS if versions is None else versions)
        self.versions_seen: Counter[str] = Counter()
        limit = self.max_concurrency
        self.max_sockets = max_sockets if max_sockets is not None else (limit and 10 * limit)
        self.context_ttl = context_ttl
        self.cancels = 0
        self.context_errors: dict[int, int] = {}

    @property
    def contexts_active(self) -> int:
        """Active contexts now, every account."""
        return sum(self._active(s) for s in self.sessions.values())

    def contexts_active_for(self, account: str | None) -> int:
        """Active contexts of one account (API key), across all its sockets."""
        return sum(self._active(s) for s in self.sessions.values() if s.account == account)

    @staticmethod
    def _active(session: EmulatorSession) -> int:
        return sum(1 for c in (session.state or {}).values() if not c.finished)

    def handshake_limit(self) -> int | None:
        return self.max_sockets

    def route(self, path: str, query: dict[str, str], headers: Headers) -> int | None:
        if path != self.path:
            return 404
        version = headers.get("Cartesia-Version") or query.get("cartesia_version")
        if version is None or version not in self.versions:
            return 400  # missing, or a version the emulated API does not serve
        self.versions_seen[version] += 1
        return None

    def offered_keys(self, headers: Headers, query: dict[str, str]) -> list[str]:
        bearer = headers.get("Authorization", "")
        offered = [headers.get(self.auth_header), query.get("api_key")]
        offered.append(bearer.removeprefix("Bearer ") if bearer.startswith("Bearer ") else None)
        return [k for k in offered if k]

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
            if limit is not None and self.contexts_active_for(session.account) >= limit:
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
        # The SDK's `Error` event: title, message, error_code, status_code, done.
        msg: dict[str, Any] = {
            "type": "error",
            "status_code": status,
            "done": True,
            "title": HTTPStatus(status).phrase,
            "message": text,
            "error_code": _CARTESIA_ERROR_CODES.get(status, "invalid_request"),
        }
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

"""What the multiplexed TTS adapters share: one context per lease on a shared WebSocket.

A :class:`TTSConnection` owns one socket and a reader task that demultiplexes server messages by
context id into per-context queues; a :class:`TTSContext` is the handle a call handler gets for
its lease (``lease.conn.context(lease.stream_id)``): send text, iterate its audio chunks only.
Audio that arrives for a context already released (a barge-in) is dropped. A provider error for one
context fails that context only; a socket-level failure (close, malformed message) fails them all.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from voicepool.adapter import LeaseMode
from voicepool.errors import VoicepoolError

# Relative imports: mypy cannot map the repo folder adapters/ to voicepool.adapters, and
# a relative import resolves to the installed package at run time (hence the noqa).
from .provider import ProviderAdapter, encode  # noqa: TID251
from .websocket import EndpointOptions, MalformedMessage, ManagedSocket, StreamClosed  # noqa: TID251

if TYPE_CHECKING:
    from voicepool.adapter import Adapter

__all__ = [
    "ContextError",
    "Dialect",
    "ServerEvent",
    "TTSAdapter",
    "TTSConnection",
    "TTSContext",
    "decode_audio",
]


class ContextError(VoicepoolError, RuntimeError):
    """The provider failed one context (rate limit, bad request); the shared socket lives on."""

    def __init__(self, message: str, *, context_id: str, status: int | None = None) -> None:
        super().__init__(message)
        self.context_id = context_id
        self.status = status


@dataclass(frozen=True, slots=True)
class ServerEvent:
    """One parsed server message. ``kind``: audio | final | flushed | error | other."""

    kind: str
    context_id: str | None
    audio: bytes = b""
    error: str = ""
    status: int | None = None


class _Done:
    """Queue marker: the context's audio is complete."""


_DONE = _Done()


class Dialect(Protocol):
    """The provider-specific wire format (ElevenLabs, Cartesia); a
    :class:`~voicepool.adapters.provider.SocketDialect` with contexts."""

    provider: str

    def init_messages(self, context_id: str) -> list[dict[str, Any]]: ...
    def text_message(self, context_id: str, text: str, flush: bool) -> dict[str, Any]: ...
    def flush_messages(self, context_id: str) -> list[dict[str, Any]]: ...
    def end_messages(self, context_id: str) -> list[dict[str, Any]]: ...
    def cancel_messages(self, context_id: str, ended: bool) -> list[dict[str, Any]]: ...
    def keepalive_messages(self, open_contexts: list[str]) -> list[dict[str, Any]]: ...
    def goodbye_messages(self) -> list[dict[str, Any]]: ...
    def parse(self, message: str | bytes) -> ServerEvent: ...


def decode_audio(data: Any, provider: str) -> bytes:
    """Decode a base64 audio field. Raises MalformedMessage."""
    if data is None:
        return b""
    if not isinstance(data, str):
        raise MalformedMessage(f"{provider}: audio field is {type(data).__name__}, not base64")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MalformedMessage(f"{provider}: audio field is not valid base64") from exc


def load_object(message: str | bytes, provider: str) -> dict[str, Any]:
    """Parse a JSON object from a text frame. Raises MalformedMessage."""
    if isinstance(message, bytes):
        raise MalformedMessage(f"{provider}: unexpected binary message ({len(message)} bytes)")
    try:
        obj = json.loads(message)
    except ValueError as exc:
        raise MalformedMessage(f"{provider}: message is not JSON: {message[:60]!r}") from exc
    if not isinstance(obj, dict):
        raise MalformedMessage(f"{provider}: message is not a JSON object: {message[:60]!r}")
    return obj


class TTSContext:
    """One synthesis context (one lease) on a shared TTS socket.

    Sending methods raise :class:`StreamClosed` when the socket is gone and RuntimeError after
    :meth:`cancel` or release. :meth:`audio` yields this context's chunks until the provider's
    final message; it raises :class:`ContextError` (this context failed) or StreamClosed (the
    socket failed). All methods are cancellation-safe: cancelling a consumer loses no chunk for
    the next read, and releasing the lease (even by cancellation) closes the context.
    """

    def __init__(self, conn: TTSConnection, context_id: str) -> None:
        self.conn = conn
        self.context_id = context_id
        self.started = False  # the provider knows this context
        self.ended = False  # input finished: the provider ends it after its last audio
        self.released = False  # cancelled or its lease released: nothing more may be sent
        self.finished = False  # final message received (or failed)
        self.final_received = False  # the provider ended it normally: nothing left to close
        self._queue: asyncio.Queue[bytes | _Done | BaseException] = asyncio.Queue()

    async def _send(self, messages: list[dict[str, Any]]) -> None:
        for text in encode(messages):
            await self.conn.send(text)

    def _check_usable(self) -> None:
        if self.released:
            raise RuntimeError(f"TTS context {self.context_id} was cancelled or released")

    async def _start(self) -> None:
        if not self.started:
            self.started = True
            await self._send(self.conn.dialect.init_messages(self.context_id))

    async def send_text(self, text: str, *, flush: bool = False) -> None:
        """Add text to this context (opening it at the provider on first use)."""
        self._check_usable()
        if self.ended:
            raise RuntimeError(f"TTS context {self.context_id}: input already ended")
        await self._start()
        await self._send([self.conn.dialect.text_message(self.context_id, text, flush)])

    async def flush(self) -> None:
        """Generate everything sent so far now."""
        self._check_usable()
        await self._start()
        await self._send(self.conn.dialect.flush_messages(self.context_id))

    async def end(self) -> None:
        """No more text: the provider finishes the audio, then sends its final message."""
        self._check_usable()
        if self.ended:
            return
        await self._start()
        self.ended = True
        await self._send(self.conn.dialect.end_messages(self.context_id))

    async def cancel(self) -> None:
        """Barge-in: stop this context now and free its slot at the provider; :meth:`audio` ends.

        Idempotent; does not raise when the socket is already gone.
        """
        if self.released:
            return
        self.released = True
        self.conn.contexts.pop(self.context_id, None)
        self._finish(_DONE)
        if self.started and self.conn.is_open:
            try:
                await self._send(self.conn.dialect.cancel_messages(self.context_id, self.ended))
            except StreamClosed:
                pass

    async def audio(self) -> AsyncIterator[bytes]:
        """This context's audio chunks, in order, until its final message (or :meth:`cancel`)."""
        while True:
            item = await self._queue.get()
            if isinstance(item, bytes):
                yield item
                continue
            self._queue.put_nowait(item)  # later readers see the same end
            if isinstance(item, _Done):
                return
            raise _fresh(item)

    async def synthesize(self, text: str) -> AsyncIterator[bytes]:
        """Send ``text``, end the input, and yield the audio: one turn in one call."""
        await self.send_text(text)
        await self.end()
        async for chunk in self.audio():
            yield chunk

    # -- fed by the reader ------------------------------------------------------------------------

    def _feed(self, event: ServerEvent) -> None:
        if self.finished:
            return
        if event.kind == "audio":
            if event.audio:
                self._queue.put_nowait(event.audio)
        elif event.kind == "final":
            if event.audio:
                self._queue.put_nowait(event.audio)
            self.final_received = True
            self._finish(_DONE)
        elif event.kind == "error":
            self._finish(
                ContextError(
                    f"{self.conn.where}: context {self.context_id} failed: {event.error}",
                    context_id=self.context_id,
                    status=event.status,
                )
            )

    def _finish(self, item: _Done | BaseException) -> None:
        if not self.finished:
            self.finished = True
            self._queue.put_nowait(item)

    def __repr__(self) -> str:
        return f"<TTSContext {self.context_id} finished={self.finished} released={self.released}>"


def _fresh(exc: BaseException) -> BaseException:
    """A new instance to raise (re-raising one instance from many places grows its traceback)."""
    if isinstance(exc, ContextError):
        return ContextError(str(exc), context_id=exc.context_id, status=exc.status)
    if isinstance(exc, StreamClosed):
        return StreamClosed(str(exc), code=exc.code, reason=exc.reason)
    return exc


class TTSConnection(ManagedSocket):
    """A shared TTS socket: contexts by id, a reader that routes server messages to them.

    Context ids are never reused on a socket (``vp1``, ``vp2``, ... in order of first use,
    whatever the leases' stream ids), so audio still arriving for a released context can only be
    dropped, never delivered to a later lease.
    """

    def __init__(
        self,
        ws: Any,
        adapter: Adapter[Any],
        dialect: Dialect,
        options: EndpointOptions,
        *,
        keepalive_interval: float | None,
        capacity: int,
        recycle_after: float | None = None,
        stale_after: float | None = None,
    ) -> None:
        super().__init__(
            ws, adapter, keepalive_interval=keepalive_interval, close_timeout=options.close_timeout
        )
        self.dialect = dialect
        self.capacity = capacity
        self.recycle_after = recycle_after  # idle this long: the next ping recycles the socket
        self.stale_after = stale_after  # idle this long: unusable, the provider may close it
        self.contexts: dict[str, TTSContext] = {}  # by context id: what the reader routes to
        self._by_stream: dict[int, TTSContext] = {}  # by lease stream id
        self._contexts_made = 0
        self.dropped = 0  # messages for contexts already released (barge-in leftovers)
        self.last_error: str | None = None  # a socket-level error message, before a close

    def context(self, stream_id: int | None) -> TTSContext:
        """The context of the lease with ``stream_id`` (created on first use)."""
        if stream_id is None:
            raise ValueError("a TTS context needs a MULTIPLEXED lease's stream_id")
        ctx = self._by_stream.get(stream_id)
        if ctx is None:
            self.check_open()
            self._contexts_made += 1
            cid = f"vp{self._contexts_made}"
            ctx = self._by_stream[stream_id] = self.contexts[cid] = TTSContext(self, cid)
        return ctx

    def idle_for(self, limit: float | None) -> bool:
        """Whether nothing was sent for ``limit`` seconds with no context open."""
        if limit is None or self.contexts:
            return False
        return self.loop.time() - self.last_sent >= limit

    @property
    def stale(self) -> bool:
        return self.idle_for(self.stale_after)

    async def release(self, stream_id: int, error: BaseException | None) -> bool:
        """End the lease's context (cancel it unless it finished); False if the socket is gone."""
        ctx = self._by_stream.pop(stream_id, None)
        if ctx is not None:
            self.contexts.pop(ctx.context_id, None)
        if ctx is not None and not ctx.released:
            if ctx.final_received:
                ctx.released = True  # the provider ended it: nothing to close
            else:
                await ctx.cancel()  # barge-in, failure, or a holder that did not read to the end
        return self.is_open and not isinstance(error, StreamClosed)

    # -- ManagedSocket hooks ----------------------------------------------------------------------

    def on_message(self, message: str | bytes) -> None:
        event = self.dialect.parse(message)
        if event.context_id is None:
            if event.kind == "error":
                self.last_error = event.error  # usually followed by a close frame
            return
        ctx = self.contexts.get(event.context_id)
        if ctx is None:
            self.dropped += 1
            return
        ctx._feed(event)

    def on_closed(self, error: StreamClosed) -> None:
        if self.last_error and error.reason != self.last_error:
            error = StreamClosed(
                f"{error} ({self.last_error})", code=error.code, reason=error.reason
            )
        for ctx in list(self.contexts.values()):
            ctx._finish(error)

    def keepalive_messages(self) -> list[str]:
        # Only contexts the provider holds open: a message naming an ended one (close_context
        # sent) would open it again, and take a slot.
        started = [
            cid
            for cid, ctx in self.contexts.items()
            if ctx.started and not ctx.ended and not ctx.released
        ]
        return encode(self.dialect.keepalive_messages(started))

    def __repr__(self) -> str:
        state = "open" if self.is_open else "closed"
        return f"<{type(self).__name__} {self.where} {state} contexts={len(self.contexts)}>"


class TTSAdapter(ProviderAdapter[TTSConnection]):
    """What the multiplexed TTS adapters share: one :class:`TTSConnection` per socket, one context
    per lease. Subclasses set ``Options``, build ``dialect``, and give :meth:`url`,
    :meth:`keepalive_interval` and the idle limits."""

    lease_mode: LeaseMode = LeaseMode.MULTIPLEXED
    dialect: Dialect

    def keepalive_interval(self) -> float | None:
        """How often a socket with open contexts keeps itself alive (None: never)."""
        return None

    async def connect(self) -> TTSConnection:
        conn = TTSConnection(
            await self.open_socket(),
            self,
            self.dialect,
            self.options,
            keepalive_interval=self.keepalive_interval() if self.options.keepalive else None,
            capacity=self.max_streams,
            recycle_after=self.recycle_after(),
            stale_after=self.stale_after(),
        )
        conn.start()
        return conn

    async def ping(self, conn: TTSConnection) -> None:
        """Keepalive text (unless disabled) + WebSocket ping/pong. Raises StreamClosed when
        closed, or idle for ``recycle_after`` (the pool then replaces the socket before the
        provider's idle close)."""
        if conn.idle_for(conn.recycle_after):
            raise StreamClosed(f"{conn.where}: idle for too long; recycling before the idle close")
        await conn.ping(conn.keepalive_messages() if self.options.keepalive else [])

    def is_open(self, conn: TTSConnection) -> bool:
        return conn.is_open and not conn.stale

    def stream_capacity(self, conn: TTSConnection) -> int:
        return conn.capacity if conn.is_open else 0

    async def release_stream(
        self, conn: TTSConnection, stream_id: int, error: BaseException | None
    ) -> bool:
        """Close or cancel the lease's context unless it already ended; False only when the
        socket itself is broken."""
        return await conn.release(stream_id, error)

    async def close(self, conn: TTSConnection) -> None:
        """The provider's goodbye, then the closing handshake (bounded by ``close_timeout``)."""
        await conn.aclose(self.goodbyes())

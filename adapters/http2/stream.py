"""Per-stream state of an HTTP/2 client connection, the errors streams raise, and :class:`Origin`.

The reader task of :class:`~voicepool.adapters.http2.connection.H2Connection` fills an
:class:`H2Stream` (response head, body chunks, window wake-ups); the request's task reads it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import h2.exceptions
from h2.errors import ErrorCodes

from voicepool.errors import VoicepoolError

if TYPE_CHECKING:
    from .connection import H2Connection  # noqa: TID251

__all__ = [
    "ConnectionClosed",
    "H2Error",
    "H2Stream",
    "Headers",
    "Origin",
    "StreamRefused",
    "StreamReset",
    "error_code",
]

Headers = list[tuple[bytes, bytes]]


class H2Error(VoicepoolError):
    """An HTTP/2 stream or connection failed."""


class ConnectionClosed(H2Error, ConnectionError):
    """The connection is closed (by the server, the network, a protocol error or by us)."""


class StreamReset(H2Error):
    """The stream was reset (RST_STREAM) by the server or by us. ``error_code`` is the h2 code."""

    def __init__(self, message: str, error_code: int = ErrorCodes.CANCEL) -> None:
        super().__init__(message)
        self.error_code = error_code


class StreamRefused(StreamReset):
    """The server never processed this stream (REFUSED_STREAM, or above a GOAWAY's last stream, or
    the connection was draining or full): the request can be retried on another connection."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ErrorCodes.REFUSED_STREAM)


@dataclass(frozen=True, slots=True)
class Origin:
    """Scheme, host and port of the server a connection talks to."""

    scheme: str  # "https" (TLS, ALPN h2) or "http" (cleartext HTTP/2 with prior knowledge)
    host: str
    port: int

    @property
    def authority(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.authority}"


def error_code(code: int) -> ErrorCodes | int:
    try:
        return ErrorCodes(code)
    except ValueError:
        return code


class H2Stream:
    """One request/response exchange on an :class:`H2Connection`.

    Reads raise :class:`StreamReset` (or :class:`StreamRefused`) when the stream is reset and
    :class:`ConnectionClosed` when the connection dies. Waiting methods are cancellation-safe: a
    cancelled read loses no data; releasing the stream (``H2Connection.release_slot``) resets it.
    """

    __slots__ = (
        "_chunks",
        "_conn",
        "_waiter",
        "_window",
        "error",
        "headers",
        "id",
        "local_closed",
        "remote_closed",
        "slot",
        "status",
    )

    def __init__(self, conn: H2Connection, stream_id: int, slot: int) -> None:
        self._conn = conn
        self.id = stream_id
        self.slot = slot
        self.status: int | None = None
        self.headers: Headers = []
        self._chunks: deque[tuple[bytes, int]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._window: asyncio.Future[None] | None = None
        self.local_closed = False
        self.remote_closed = False
        self.error: BaseException | None = None

    @property
    def finished(self) -> bool:
        """Both sides ended, or the stream failed: nothing more will happen on it."""
        return self.error is not None or (self.local_closed and self.remote_closed)

    async def response(self) -> tuple[int, Headers]:
        """Wait for the final response head; returns ``(status, headers)``."""
        while self.status is None:
            if self.error is not None:
                raise self.error
            if self.remote_closed:
                raise StreamReset(
                    "the server ended the stream without a response", ErrorCodes.PROTOCOL_ERROR
                )
            await self._wait()
        return self.status, self.headers

    async def read(self) -> bytes:
        """The next body chunk; ``b""`` once the server ended the stream."""
        while not self._chunks:
            if self.remote_closed:
                return b""  # complete, even if a reset (e.g. NO_ERROR) followed the end
            if self.error is not None:
                raise self.error
            await self._wait()
        data, size = self._chunks.popleft()
        self._conn._ack(self, size)
        return data

    def read_nowait(self) -> bytes | None:
        """A buffered body chunk, ``b""`` at the end, or None when :meth:`read` would wait."""
        if self._chunks:
            data, size = self._chunks.popleft()
            self._conn._ack(self, size)
            return data
        if self.remote_closed:
            return b""
        if self.error is not None:
            raise self.error
        return None

    async def send(self, data: bytes, *, end: bool) -> None:
        """Send body bytes under flow control; ``end`` closes our side after them.

        Waits for WINDOW_UPDATE when the window is empty and for the socket to drain.
        """
        conn = self._conn
        h2c = conn._h2
        view = memoryview(data)
        while True:
            self._check_writable()
            if not view:
                if end:
                    try:
                        h2c.end_stream(self.id)
                    except h2.exceptions.StreamClosedError as exc:
                        raise StreamReset(
                            f"stream {self.id} is closed", ErrorCodes.STREAM_CLOSED
                        ) from exc
                    self.local_closed = True
                    conn._flush()
                return
            try:
                window = h2c.local_flow_control_window(self.id)
            except h2.exceptions.StreamClosedError as exc:
                raise StreamReset(f"stream {self.id} is closed", ErrorCodes.STREAM_CLOSED) from exc
            size = min(window, h2c.max_outbound_frame_size, len(view))
            if size <= 0:
                await self._wait_window()
                continue
            last = size == len(view)
            try:
                h2c.send_data(self.id, view[:size].tobytes(), end_stream=end and last)
            except h2.exceptions.StreamClosedError as exc:
                raise StreamReset(f"stream {self.id} is closed", ErrorCodes.STREAM_CLOSED) from exc
            if end and last:
                self.local_closed = True
            view = view[size:]
            if size >= 16384:
                conn._flush_now()  # bulk data: write now, so drain() applies back-pressure
                await conn._drain()
            else:
                conn._flush()
            if end and last:
                return

    def _check_writable(self) -> None:
        if self.error is not None:
            raise self.error
        if self.local_closed:
            raise StreamReset(f"stream {self.id} already ended", ErrorCodes.STREAM_CLOSED)

    async def _wait(self) -> None:
        fut = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await fut
        finally:
            self._waiter = None

    async def _wait_window(self) -> None:
        fut = self._window = asyncio.get_running_loop().create_future()
        try:
            await fut
        finally:
            self._window = None

    def _wake(self) -> None:
        fut = self._waiter
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _wake_window(self) -> None:
        fut = self._window
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        self._wake()
        self._wake_window()

    def _unconsumed(self) -> int:
        """Drop buffered chunks; return their flow-controlled size (to hand back to the peer)."""
        size = sum(n for _, n in self._chunks)
        self._chunks.clear()
        return size

    def __repr__(self) -> str:
        state = "finished" if self.finished else "open"
        return f"<H2Stream {self.id} slot={self.slot} {state}>"

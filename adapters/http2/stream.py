"""One HTTP/2 request/response exchange, as the request's task sees it: :class:`H2Stream`.

The reader task of :class:`~voicepool.adapters.http2.H2Connection` feeds bytes to the sans-I/O
:class:`~voicepool.adapters.http2.protocol.H2Protocol`, which fills the stream's state (response
head, body chunks, end, error) and wakes it; the request's task waits here. This module knows the
connection only through :class:`StreamLink` (the protocol and three writing hooks), so it does
not import the connection.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from h2.errors import ErrorCodes

from .protocol import H2Protocol, Headers, StreamReset, StreamState  # noqa: TID251

__all__ = ["H2Stream", "StreamLink"]


class StreamLink(Protocol):
    """What a stream needs of its connection: the protocol, and writing its output."""

    @property
    def protocol(self) -> H2Protocol[H2Stream]: ...

    def _flush(self) -> None:
        """Write the protocol's output at the end of this loop iteration."""

    def _flush_now(self) -> None:
        """Write the protocol's output now."""

    async def _drain(self) -> None:
        """Wait until the socket's write buffer drains; raise ConnectionClosed if it is lost."""


class H2Stream(StreamState):
    """One request/response exchange on an :class:`~voicepool.adapters.http2.H2Connection`.

    Reads raise :class:`StreamReset` (or :class:`StreamRefused`) when the stream is reset and
    :class:`ConnectionClosed` when the connection dies. Waiting methods are cancellation-safe: a
    cancelled read loses no data; releasing the stream (``H2Connection.release_slot``) resets it.
    """

    __slots__ = ("_link", "_waiter", "_window")

    def __init__(self, link: StreamLink, stream_id: int, slot: int) -> None:
        super().__init__(stream_id, slot)
        self._link = link
        self._waiter: asyncio.Future[None] | None = None
        self._window: asyncio.Future[None] | None = None

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
        while not self.chunks:
            if self.remote_closed:
                return b""  # complete, even if a reset (e.g. NO_ERROR) followed the end
            if self.error is not None:
                raise self.error
            await self._wait()
        return self._take()

    def read_nowait(self) -> bytes | None:
        """A buffered body chunk, ``b""`` at the end, or None when :meth:`read` would wait."""
        if self.chunks:
            return self._take()
        if self.remote_closed:
            return b""
        if self.error is not None:
            raise self.error
        return None

    def _take(self) -> bytes:
        data, size = self.chunks.popleft()
        if size:
            self._link.protocol.consumed(self, size)
            self._link._flush()
        return data

    async def send(self, data: bytes, *, end: bool) -> None:
        """Send body bytes under flow control; ``end`` closes our side after them.

        Waits for WINDOW_UPDATE when the window is empty and for the socket to drain.
        """
        link = self._link
        protocol = link.protocol
        view = memoryview(data)
        while True:
            self._check_writable()
            if not view:
                if end:
                    protocol.send_data(self, b"", end=True)
                    link._flush()
                return
            size = min(protocol.send_window(self), len(view))
            if size <= 0:
                await self._wait_window()
                continue
            last = size == len(view)
            protocol.send_data(self, view[:size].tobytes(), end=end and last)
            view = view[size:]
            if size >= 16384:
                link._flush_now()  # bulk data: write now, so drain() applies back-pressure
                await link._drain()
            else:
                link._flush()
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

    def __repr__(self) -> str:
        state = "finished" if self.finished else "open"
        return f"<H2Stream {self.id} slot={self.slot} {state}>"

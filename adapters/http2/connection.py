"""One HTTP/2 client connection: the sans-I/O :class:`~.protocol.H2Protocol` over asyncio (TLS).

A single reader task per connection feeds received bytes to the protocol, which updates the
streams' state and wakes their readers; everything that writes (HEADERS, DATA, RST_STREAM, PING)
calls the protocol synchronously on the event loop, so there is no writer task and no lock. The
protocol's output is written once per loop iteration, so a burst of concurrent requests costs one
TLS write per connection rather than one per request (bulk DATA is written at once, under
``drain()`` back-pressure). The protocol decides (GOAWAY, flow control, the slot map); this module
does the I/O, the futures and the notifications to the adapter.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import ssl
import time
from collections.abc import Callable, Iterable

from h2.errors import ErrorCodes

from voicepool.errors import ConnectError

from .protocol import (  # noqa: TID251 - relative: see the package docstring
    ConnectionClosed,
    H2Protocol,
    Origin,
)
from .stream import H2Stream  # noqa: TID251

__all__ = ["H2Connection"]

_READ_SIZE = 65536


class H2Connection:
    """An HTTP/2 client connection, ready once :meth:`open` returns (server SETTINGS received).

    ``on_change(conn)`` is called from the reader task when the stream capacity changes
    (SETTINGS_MAX_CONCURRENT_STREAMS), a GOAWAY arrives or the connection dies.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        origin: Origin,
        *,
        on_change: Callable[[H2Connection], None],
        stream_window: int,
        connection_window: int,
        stall_timeout: float | None = None,
        min_ping_gap: Callable[[], float] | None = None,
    ) -> None:
        self.origin = origin
        self._reader = reader
        self._writer = writer
        self._on_change = on_change
        self._protocol: H2Protocol[H2Stream] = H2Protocol(
            origin,
            lambda stream_id, slot: H2Stream(self, stream_id, slot),
            stream_window=stream_window,
            connection_window=connection_window,
        )
        self._loop = asyncio.get_running_loop()
        self._flush_pending = False
        self._pings: dict[bytes, asyncio.Future[None]] = {}
        self._ping_ids = itertools.count(1)
        self._settings = asyncio.Event()
        self._reader_task: asyncio.Task[None] | None = None
        self.created = time.monotonic()
        self.last_received = self.created  # when bytes last arrived from the server
        self.last_stream_error = 0.0  # when a stream on it last ended in an error (the adapter)
        self.last_ping = self.created  # when the last PING was sent (or the connection opened)
        self.ping_gap: float | None = None  # time between the last two PINGs sent
        self.pings_sent = 0
        self._stall_timeout = stall_timeout
        self._min_ping_gap = min_ping_gap
        self._liveness_sent: float | None = None  # when the outstanding liveness PING went out
        self._liveness_timer: asyncio.TimerHandle | None = None
        self.stalled = False  # a liveness PING went unanswered: no new streams until heard from

    # -- opening ------------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        origin: Origin,
        ssl_context: ssl.SSLContext | None,
        *,
        on_change: Callable[[H2Connection], None],
        stream_window: int = 1 << 20,
        connection_window: int = 1 << 24,
        server_hostname: str | None = None,
        stall_timeout: float | None = None,
        min_ping_gap: Callable[[], float] | None = None,
        sock: socket.socket | None = None,
    ) -> H2Connection:
        """Connect, negotiate HTTP/2 (ALPN over TLS) and wait for the server's SETTINGS.

        Raises :class:`~voicepool.ConnectError` (``fatal=True`` when the server does not speak
        HTTP/2, e.g. it picked ``http/1.1``; retryable when it closed before its SETTINGS),
        ``ssl.SSLError`` (e.g. an untrusted certificate) or OSError. Cancellation-safe: a
        cancelled open leaves no socket behind.

        ``stall_timeout``: see :meth:`start_request`. ``min_ping_gap()``: the least spacing of
        PINGs the server tolerates (after ENHANCE_YOUR_CALM); liveness PINGs respect it.
        """
        # ``sock``: already connected (the shared DNS cache and happy eyeballs chose the address).
        reader, writer = await asyncio.open_connection(
            None if sock is not None else origin.host,
            None if sock is not None else origin.port,
            sock=sock,
            ssl=ssl_context,
            server_hostname=(server_hostname or origin.host) if ssl_context else None,
        )
        try:
            if ssl_context is not None:
                sslobj = writer.get_extra_info("ssl_object")
                alpn = sslobj.selected_alpn_protocol() if sslobj is not None else None
                if alpn != "h2":
                    raise ConnectError(
                        f"{origin} does not speak HTTP/2 (ALPN negotiated {alpn or 'nothing'});"
                        " use an HTTP/1.1 client (the `rest` adapter) for it",
                        fatal=True,
                    )
            conn = cls(
                reader,
                writer,
                origin,
                on_change=on_change,
                stream_window=stream_window,
                connection_window=connection_window,
                stall_timeout=stall_timeout,
                min_ping_gap=min_ping_gap,
            )
            await conn._start()
        except BaseException:
            writer.transport.abort()
            raise
        return conn

    async def _start(self) -> None:
        self._protocol.initiate()
        self._flush_now()
        self._reader_task = asyncio.get_running_loop().create_task(
            self._read_loop(), name=f"voicepool:h2:{self.origin}"
        )
        try:
            await self._settings.wait()  # set by the server's first SETTINGS, or by a failure
            if self._protocol.closed:
                raise ConnectError(
                    f"{self.origin} closed the connection before its HTTP/2 SETTINGS: {self.error}"
                )
        except BaseException:
            self._reader_task.cancel()
            await asyncio.gather(self._reader_task, return_exceptions=True)
            raise

    # -- state ----------------------------------------------------------------------------------

    @property
    def protocol(self) -> H2Protocol[H2Stream]:
        """The sans-I/O protocol state (streams, slots, GOAWAY) of this connection."""
        return self._protocol

    @property
    def is_open(self) -> bool:
        """Not closed or broken (a draining connection is still open)."""
        return not self._protocol.closed

    @property
    def draining(self) -> bool:
        """No new streams: GOAWAY received, closing, or the stream id space is nearly used up."""
        return self._protocol.draining

    @property
    def error(self) -> BaseException | None:
        """Why the connection closed (None while open)."""
        return self._protocol.error

    @property
    def goaway_code(self) -> ErrorCodes | int | None:
        """The error code of the server's GOAWAY (None: no GOAWAY received)."""
        return self._protocol.goaway_code

    @property
    def goaway_last_stream(self) -> int | None:
        """The last stream id the server's GOAWAY said it processed (or may process)."""
        return self._protocol.goaway_last_stream

    @property
    def remote_max_streams(self) -> int:
        """The server's SETTINGS_MAX_CONCURRENT_STREAMS (unlimited until it says otherwise)."""
        return self._protocol.remote_max_streams

    @property
    def open_streams(self) -> int:
        """Streams not yet finished (both sides ended or reset)."""
        return len(self._protocol.streams)

    @property
    def leased_slots(self) -> int:
        """Pool slots holding a started stream (until released)."""
        return len(self._protocol.slots)

    @property
    def streams_started(self) -> int:
        """Streams opened on this connection so far (the warm-up request included)."""
        return self._protocol.streams_started

    # -- streams --------------------------------------------------------------------------------

    def start_request(
        self, slot: int, headers: Iterable[tuple[bytes, bytes]], *, end: bool
    ) -> H2Stream:
        """Open a stream for pool slot ``slot`` and send its HEADERS (synchronous).

        Raises :class:`StreamRefused` when the connection is closed, draining or at the server's
        stream limit (nothing was sent: retry on another connection).

        Liveness: when the server has been quiet for a quarter of ``stall_timeout``, a PING goes
        out with the stream; if nothing at all arrives within ``stall_timeout``, the connection is
        :attr:`stalled` (no new streams, the adapter is told) until the server is heard again.
        So a silently dead connection stops taking streams before its first request times out.
        """
        stream = self._protocol.start_request(slot, headers, end=end)
        if self._stall_timeout is not None and self._liveness_sent is None:
            self._check_liveness(self._stall_timeout)
        self._flush()
        return stream

    def _check_liveness(self, stall_timeout: float) -> None:
        now = time.monotonic()
        if now - self.last_received < stall_timeout / 4 or self.stalled:
            return
        gap = self._min_ping_gap() if self._min_ping_gap is not None else 0.0
        if gap and now - self.last_ping < gap:
            return  # the server asked for fewer PINGs (ENHANCE_YOUR_CALM)
        payload = next(self._ping_ids).to_bytes(8, "big")
        if self.pings_sent:
            self.ping_gap = now - self.last_ping
        self.last_ping = now
        self.pings_sent += 1
        self._liveness_sent = now
        self._protocol.ping(payload)  # the ACK is not awaited: any byte received proves life
        self._liveness_timer = self._loop.call_later(stall_timeout, self._liveness_due)

    def _liveness_due(self) -> None:
        # One more loop iteration: bytes already in the socket reach the read loop first (its
        # task step was queued before this timer ran), so a late-but-present answer counts.
        self._loop.call_soon(self._liveness_verdict)

    def _liveness_verdict(self) -> None:
        sent, self._liveness_sent = self._liveness_sent, None
        self._liveness_timer = None
        if sent is None or not self.is_open or self.last_received >= sent:
            return
        self.stalled = True
        self._on_change(self)

    def release_slot(self, slot: int) -> bool:
        """End the stream of pool slot ``slot``: RST_STREAM(CANCEL) if unfinished (barge-in), and
        hand buffered DATA back to the connection window. Synchronous; returns :attr:`is_open`."""
        self._protocol.release_slot(slot)
        self._flush()
        return self.is_open

    def reset(self, stream: H2Stream, code: ErrorCodes = ErrorCodes.CANCEL) -> None:
        """RST_STREAM ``stream`` unless it already finished; wakes its readers and writers."""
        self._protocol.reset(stream, code)
        self._flush()

    # -- ping, close ----------------------------------------------------------------------------

    async def ping(self) -> float:
        """Send a PING and wait for its ACK; returns the round trip in seconds.

        Raises :class:`ConnectionClosed`. Cancellation-safe (a late ACK is ignored); the caller
        applies the timeout.
        """
        if self._protocol.closed:
            raise ConnectionClosed(f"connection to {self.origin} is closed: {self.error}")
        payload = next(self._ping_ids).to_bytes(8, "big")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pings[payload] = fut
        t0 = time.monotonic()
        if self.pings_sent:
            self.ping_gap = t0 - self.last_ping
        self.last_ping = t0
        self.pings_sent += 1
        try:
            self._protocol.ping(payload)
            self._flush_now()  # a health check: no reason to wait for the loop iteration
            await fut
        finally:
            self._pings.pop(payload, None)
        return time.monotonic() - t0

    async def aclose(self, timeout: float = 2.0) -> None:
        """Send GOAWAY, close the socket politely (TLS close_notify) within ``timeout``, else abort.

        Idempotent; never raises. Cancelling it aborts the socket at once.
        """
        if not self._protocol.closed:
            self._protocol.close()
            self._flush_now()
            self._fail(ConnectionClosed(f"connection to {self.origin} closed by the client"))
        try:
            self._writer.close()
            async with asyncio.timeout(timeout):
                await self._writer.wait_closed()
        except (OSError, TimeoutError):
            pass
        finally:
            self._writer.transport.abort()
            if self._reader_task is not None:
                self._reader_task.cancel()
                await asyncio.gather(self._reader_task, return_exceptions=True)

    # -- internals ------------------------------------------------------------------------------

    def _flush(self) -> None:
        """Write what the protocol has queued at the end of this loop iteration: the frames of
        every request started in one iteration (a burst of concurrent calls) go out in one TLS
        write instead of one syscall each."""
        if not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_pending = False
        if self._writer.transport.is_closing():
            return  # nothing reaches the server now: queued streams stay unsent (refused at fail)
        data = self._protocol.data_to_send()
        if data:
            self._writer.write(data)

    async def _drain(self) -> None:
        try:
            await self._writer.drain()
        except (OSError, RuntimeError) as exc:
            raise ConnectionClosed(f"connection to {self.origin} lost: {exc!r}") from exc

    def _fail(self, error: BaseException) -> None:
        """The connection is over: fail every stream and ping (idempotent)."""
        if not self._protocol.fail(error):
            return
        if self._liveness_timer is not None:
            self._liveness_timer.cancel()
            self._liveness_timer = None
        self._settings.set()  # wakes an open() still waiting for the server's SETTINGS
        for fut in self._pings.values():
            if not fut.done():
                fut.set_exception(error)

    async def _read_loop(self) -> None:
        reader = self._reader
        protocol = self._protocol
        try:
            while True:
                data = await reader.read(_READ_SIZE)
                if not data:
                    raise ConnectionClosed(f"{self.origin} closed the connection")
                self.last_received = time.monotonic()
                if self.stalled:
                    self.stalled = False  # heard from again: it takes streams again
                    self._on_change(self)
                try:
                    changes = protocol.receive_data(data)
                except ConnectionClosed:
                    self._flush_now()  # the protocol queued a GOAWAY for the server
                    raise
                if changes.settings_received:
                    self._settings.set()
                for payload in changes.pings_acked:
                    fut = self._pings.get(payload)
                    if fut is not None and not fut.done():
                        fut.set_result(None)
                self._flush()
                if changes.capacity_changed:
                    self._on_change(self)
        except asyncio.CancelledError:
            self._fail(ConnectionClosed(f"connection to {self.origin} closed"))
            raise
        except Exception as exc:
            if not isinstance(exc, ConnectionClosed):
                wrapped = ConnectionClosed(f"connection to {self.origin} lost: {exc!r}")
                wrapped.__cause__ = exc
                exc = wrapped
            was_open = self.is_open
            self._fail(exc)
            self._writer.transport.abort()
            if was_open:
                self._on_change(self)

    def __repr__(self) -> str:
        state = "closed" if not self.is_open else "draining" if self.draining else "open"
        return f"<H2Connection {self.origin} {state} streams={self.open_streams}>"

"""One HTTP/2 client connection: the ``h2`` state machine driven over an asyncio (TLS) stream.

A single reader task per connection feeds received bytes to ``h2`` and dispatches its events to
per-stream state (response head, a queue of body chunks, a flow-control window waiter). Everything
that writes (HEADERS, DATA, RST_STREAM, PING) calls ``h2`` synchronously on the event loop, so
there is no writer task and no lock; h2's output is written once per loop iteration, so a burst of
concurrent requests costs one TLS write per connection rather than one per request (bulk DATA is
written at once, under ``drain()`` back-pressure).

Flow control: received DATA is acknowledged to ``h2`` only when the application reads it, so a slow
consumer back-pressures the server instead of growing a buffer; DATA still buffered when a stream is
released is acknowledged then, so cancelled streams never shrink the connection window. Sending
waits for WINDOW_UPDATE when either the stream or the connection window is empty.

GOAWAY: ``h2`` moves its connection state machine to CLOSED on a received GOAWAY and then rejects
the DATA of streams the server is still finishing, although RFC 9113 6.8 lets them complete.
:class:`_H2` keeps the state machine open instead; the connection stops opening streams (it is
*draining*), fails the streams the server says it never processed with :class:`StreamRefused`
(safe to retry elsewhere), and lets the others complete.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import ssl
import time
from collections.abc import Callable, Iterable

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from hyperframe.frame import Frame, GoAwayFrame

from voicepool.errors import ConnectError

from .stream import (  # noqa: TID251 - relative: see the package docstring
    ConnectionClosed,
    H2Error,
    H2Stream,
    Headers,
    Origin,
    StreamRefused,
    StreamReset,
    error_code,
)

__all__ = ["H2Connection"]

_READ_SIZE = 65536
_LAST_STREAM_ID = 2**31 - 1
_DEFAULT_WINDOW = 65535  # RFC 9113 initial connection window


class _H2(h2.connection.H2Connection):
    """h2's connection with a draining GOAWAY (see the module docstring)."""

    def _receive_goaway_frame(
        self, frame: GoAwayFrame
    ) -> tuple[list[Frame], list[h2.events.Event]]:
        event = h2.events.ConnectionTerminated()
        event.error_code = error_code(frame.error_code)
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


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
    ) -> None:
        self.origin = origin
        self._reader = reader
        self._writer = writer
        self._on_change = on_change
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self._h2 = _H2(config=config)
        self._h2.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: stream_window,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 65536,
            },
        )
        self._connection_window = connection_window
        self._loop = asyncio.get_running_loop()
        self._flush_pending = False
        self._streams: dict[int, H2Stream] = {}  # h2 stream id -> live (unfinished) stream
        self._slots: dict[int, H2Stream] = {}  # pool lease slot -> its stream, until released
        self._pings: dict[bytes, asyncio.Future[None]] = {}
        self._ping_ids = itertools.count(1)
        self._settings = asyncio.Event()
        self._reader_task: asyncio.Task[None] | None = None
        self._closed = False
        self._closing = False
        self.error: BaseException | None = None
        self.goaway_code: ErrorCodes | int | None = None
        self.goaway_last_stream: int | None = None
        self.created = time.monotonic()
        self.last_ping = self.created  # when the last PING was sent (or the connection opened)
        self.ping_gap: float | None = None  # time between the last two PINGs sent
        self.pings_sent = 0

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
        sock: socket.socket | None = None,
    ) -> H2Connection:
        """Connect, negotiate HTTP/2 (ALPN ``h2`` over TLS) and wait for the server's SETTINGS.

        Raises :class:`~voicepool.ConnectError` (``fatal=True`` when the server does not speak
        HTTP/2; retryable when it closed before its SETTINGS), ``ssl.SSLError`` (e.g. an
        untrusted certificate) or OSError. Cancellation-safe: a cancelled open leaves no socket
        behind.
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
            )
            await conn._start()
        except BaseException:
            writer.transport.abort()
            raise
        return conn

    async def _start(self) -> None:
        h2c = self._h2
        h2c.initiate_connection()
        if self._connection_window > _DEFAULT_WINDOW:
            h2c.increment_flow_control_window(self._connection_window - _DEFAULT_WINDOW)
        self._flush_now()
        self._reader_task = asyncio.get_running_loop().create_task(
            self._read_loop(), name=f"voicepool:h2:{self.origin}"
        )
        try:
            await self._settings.wait()  # set by the server's first SETTINGS, or by a failure
            if self._closed:
                raise ConnectError(
                    f"{self.origin} closed the connection before its HTTP/2 SETTINGS: {self.error}"
                )
        except BaseException:
            self._reader_task.cancel()
            await asyncio.gather(self._reader_task, return_exceptions=True)
            raise

    # -- state ----------------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        """Not closed or broken (a draining connection is still open)."""
        return not self._closed

    @property
    def draining(self) -> bool:
        """No new streams: GOAWAY received, closing, or the stream id space is nearly used up."""
        return (
            self._closed
            or self._closing
            or self.goaway_code is not None
            or self._h2.highest_outbound_stream_id > _LAST_STREAM_ID - 1000
        )

    @property
    def remote_max_streams(self) -> int:
        """The server's SETTINGS_MAX_CONCURRENT_STREAMS (unlimited until it says otherwise)."""
        return int(self._h2.remote_settings.max_concurrent_streams)

    @property
    def open_streams(self) -> int:
        """Streams not yet finished (both sides ended or reset)."""
        return len(self._streams)

    @property
    def leased_slots(self) -> int:
        return len(self._slots)

    # -- streams --------------------------------------------------------------------------------

    def start_request(
        self, slot: int, headers: Iterable[tuple[bytes, bytes]], *, end: bool
    ) -> H2Stream:
        """Open a stream for pool slot ``slot`` and send its HEADERS (synchronous).

        Raises :class:`StreamRefused` when the connection is draining or at the server's stream
        limit (retry on another connection), :class:`ConnectionClosed` when it is closed.
        """
        if self._closed:
            raise ConnectionClosed(f"connection to {self.origin} is closed: {self.error}")
        if self.draining:
            raise StreamRefused(f"connection to {self.origin} is draining (GOAWAY)")
        h2c = self._h2
        try:
            stream_id = h2c.get_next_available_stream_id()
            h2c.send_headers(stream_id, list(headers), end_stream=end)
        except (h2.exceptions.TooManyStreamsError, h2.exceptions.NoAvailableStreamIDError) as exc:
            raise StreamRefused(f"connection to {self.origin} has no free stream: {exc}") from exc
        except h2.exceptions.ProtocolError as exc:
            raise H2Error(f"cannot send this request over HTTP/2: {exc}") from exc
        stream = H2Stream(self, stream_id, slot)
        stream.local_closed = end
        self._streams[stream_id] = stream
        self._slots[slot] = stream
        self._flush()
        return stream

    def release_slot(self, slot: int) -> bool:
        """End the stream of pool slot ``slot``: RST_STREAM(CANCEL) if unfinished (barge-in), and
        hand buffered DATA back to the connection window. Synchronous; returns :attr:`is_open`."""
        stream = self._slots.pop(slot, None)
        if stream is not None:
            self.reset(stream, ErrorCodes.CANCEL)
            unread = stream._unconsumed()
            if unread and not self._closed:
                self._h2.acknowledge_received_data(unread, stream.id)
                self._flush()
        return not self._closed

    def reset(self, stream: H2Stream, code: ErrorCodes = ErrorCodes.CANCEL) -> None:
        """RST_STREAM ``stream`` unless it already finished; wakes its readers and writers."""
        if stream.finished:
            self._streams.pop(stream.id, None)
            return
        stream._fail(StreamReset(f"stream {stream.id} was cancelled", code))
        self._streams.pop(stream.id, None)
        if self._closed:
            return
        try:
            self._h2.reset_stream(stream.id, code)
        except h2.exceptions.StreamClosedError:
            pass  # the server closed it in the meantime
        self._flush()

    # -- ping, close ----------------------------------------------------------------------------

    async def ping(self) -> float:
        """Send a PING and wait for its ACK; returns the round trip in seconds.

        Raises :class:`ConnectionClosed`. Cancellation-safe (a late ACK is ignored); the caller
        applies the timeout.
        """
        if self._closed:
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
            self._h2.ping(payload)
            self._flush()
            await fut
        finally:
            self._pings.pop(payload, None)
        return time.monotonic() - t0

    async def aclose(self, timeout: float = 2.0) -> None:
        """Send GOAWAY, close the socket politely (TLS close_notify) within ``timeout``, else abort.

        Idempotent; never raises. Cancelling it aborts the socket at once.
        """
        if not self._closed:
            self._closing = True
            try:
                self._h2.close_connection()
                self._flush_now()
            except h2.exceptions.ProtocolError:
                pass
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
        """Write what h2 has queued at the end of this loop iteration: the frames of every request
        started in one iteration (a burst of concurrent calls) go out in one TLS write instead of
        one syscall each."""
        if not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_pending = False
        data = self._h2.data_to_send()
        if data and not self._writer.transport.is_closing():
            self._writer.write(data)

    async def _drain(self) -> None:
        try:
            await self._writer.drain()
        except (OSError, RuntimeError) as exc:
            raise ConnectionClosed(f"connection to {self.origin} lost: {exc!r}") from exc

    def _ack(self, stream: H2Stream, size: int) -> None:
        if size and not self._closed:
            self._h2.acknowledge_received_data(size, stream.id)
            self._flush()

    def _fail(self, error: BaseException) -> None:
        """The connection is over: fail every stream and ping (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.error = error
        self._settings.set()  # wakes an open() still waiting for the server's SETTINGS
        streams = list(self._streams.values())
        self._streams.clear()
        for stream in streams:
            stream._fail(error)
        for fut in self._pings.values():
            if not fut.done():
                fut.set_exception(error)

    async def _read_loop(self) -> None:
        reader = self._reader
        h2c = self._h2
        try:
            while True:
                data = await reader.read(_READ_SIZE)
                if not data:
                    raise ConnectionClosed(f"{self.origin} closed the connection")
                try:
                    events = h2c.receive_data(data)
                except h2.exceptions.ProtocolError as exc:
                    self._flush_now()  # h2 queued a GOAWAY for the server
                    raise ConnectionClosed(
                        f"HTTP/2 protocol error from {self.origin}: {exc}"
                    ) from exc
                for event in events:
                    self._dispatch(event)
                self._flush()
        except asyncio.CancelledError:
            self._fail(ConnectionClosed(f"connection to {self.origin} closed"))
            raise
        except Exception as exc:
            if not isinstance(exc, ConnectionClosed):
                wrapped = ConnectionClosed(f"connection to {self.origin} lost: {exc!r}")
                wrapped.__cause__ = exc
                exc = wrapped
            was_open = not self._closed
            self._fail(exc)
            self._writer.transport.abort()
            if was_open:
                self._on_change(self)

    def _dispatch(self, event: h2.events.Event) -> None:
        kind = type(event)
        if kind is h2.events.DataReceived:
            assert isinstance(event, h2.events.DataReceived)
            stream = self._streams.get(event.stream_id)
            size = event.flow_controlled_length or 0
            if stream is None:
                # Released or reset already: give the window back at once.
                if size:
                    self._h2.acknowledge_received_data(size, event.stream_id)
                return
            stream._chunks.append((event.data or b"", size))
            stream._wake()
        elif kind is h2.events.ResponseReceived:
            assert isinstance(event, h2.events.ResponseReceived)
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                headers: Headers = [(bytes(k), bytes(v)) for k, v in event.headers or ()]
                status = next((v for k, v in headers if k == b":status"), b"0")
                stream.status = int(status)
                stream.headers = [(k, v) for k, v in headers if not k.startswith(b":")]
                stream._wake()
        elif kind is h2.events.StreamEnded:
            assert isinstance(event, h2.events.StreamEnded)
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream.remote_closed = True
                if stream.finished:
                    del self._streams[stream.id]
                stream._wake()
        elif kind is h2.events.StreamReset:
            assert isinstance(event, h2.events.StreamReset)
            stream = self._streams.pop(event.stream_id, None)
            if stream is not None:
                code = event.error_code or 0
                if code == ErrorCodes.REFUSED_STREAM:
                    stream._fail(StreamRefused(f"{self.origin} refused stream {stream.id}"))
                else:
                    name = getattr(error_code(code), "name", code)
                    stream._fail(
                        StreamReset(f"{self.origin} reset stream {stream.id}: {name}", code)
                    )
        elif kind is h2.events.WindowUpdated:
            assert isinstance(event, h2.events.WindowUpdated)
            if not event.stream_id:
                for stream in self._streams.values():
                    stream._wake_window()
            elif (stream := self._streams.get(event.stream_id)) is not None:
                stream._wake_window()
        elif kind is h2.events.RemoteSettingsChanged:
            assert isinstance(event, h2.events.RemoteSettingsChanged)
            first = not self._settings.is_set()
            self._settings.set()
            changed = event.changed_settings
            if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in changed:
                for stream in self._streams.values():
                    stream._wake_window()
            if not first and h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS in changed:
                self._on_change(self)
        elif kind is h2.events.PingAckReceived:
            assert isinstance(event, h2.events.PingAckReceived)
            fut = self._pings.get(event.ping_data or b"")
            if fut is not None and not fut.done():
                fut.set_result(None)
        elif kind is h2.events.ConnectionTerminated:
            assert isinstance(event, h2.events.ConnectionTerminated)
            self._on_goaway(event)

    def _on_goaway(self, event: h2.events.ConnectionTerminated) -> None:
        last = event.last_stream_id if event.last_stream_id is not None else _LAST_STREAM_ID
        self.goaway_code = event.error_code if event.error_code is not None else 0
        self.goaway_last_stream = last
        for stream_id in [s for s in self._streams if s > last]:
            stream = self._streams.pop(stream_id)
            stream._fail(StreamRefused(f"{self.origin} sent GOAWAY before processing stream"))
        self._on_change(self)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "draining" if self.draining else "open"
        return f"<H2Connection {self.origin} {state} streams={len(self._streams)}>"

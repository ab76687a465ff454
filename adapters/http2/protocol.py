"""The sans-I/O HTTP/2 client protocol under :class:`~voicepool.adapters.http2.H2Connection`.

:class:`H2Protocol` wraps ``h2``'s state machine with the policy a pooled client needs, and does no
I/O, reads no clock and awaits nothing (the shape of websockets' ``protocol.py``): bytes received go
in through :meth:`~H2Protocol.receive_data`, which updates per-stream state and returns what the
connection must do about the connection as a whole (:class:`Changes`); bytes to write come out of
:meth:`~H2Protocol.data_to_send`. The asyncio connection owns the socket, the reader task, the
futures and the timers.

What lives here:

* the slot map: a pool lease slot owns at most one stream at a time (:meth:`~H2Protocol.
  start_request`, :meth:`~H2Protocol.release_slot`);
* flow control: received DATA is acknowledged to ``h2`` only when the application consumes it
  (:meth:`~H2Protocol.consumed`), so a slow reader back-pressures the server; what a released or
  reset stream never read is acknowledged at once, so cancelled streams never shrink the window;
* GOAWAY: ``h2`` moves its state machine to CLOSED on a received GOAWAY and then rejects the
  DATA of streams the server is still finishing, although RFC 9113 6.8 lets them complete.
  :class:`_H2` keeps the machine open instead; the connection stops opening streams (it is
  *draining*), the streams the server says it never processed fail with :class:`StreamRefused`
  (safe to retry elsewhere) and the others complete;
* the errors streams and connections raise, and :class:`Origin`.

Stream objects are created by the connection (``new_stream``) and subclass :class:`StreamState`;
the protocol calls their ``_wake``/``_wake_window`` hooks (no-ops here) when a reader or a writer
waiting on them can make progress.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from hyperframe.frame import Frame, GoAwayFrame

from voicepool.errors import VoicepoolError

__all__ = [
    "Changes",
    "ConnectionClosed",
    "H2Error",
    "H2Protocol",
    "Headers",
    "Origin",
    "StreamRefused",
    "StreamReset",
    "StreamState",
    "error_code",
]

Headers = list[tuple[bytes, bytes]]

LAST_STREAM_ID = 2**31 - 1
_DEFAULT_WINDOW = 65535  # RFC 9113 initial connection window


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
    """h2's enum member for ``code``, or the int when the code is unknown."""
    try:
        return ErrorCodes(code)
    except ValueError:
        return code


def _code_name(code: int) -> str:
    named = error_code(code)
    return named.name if isinstance(named, ErrorCodes) else str(code)


class StreamState:
    """What is known of one stream: the response head, unread body chunks, which sides ended, and
    the error that ended it. Subclasses add the waiting (``_wake``, ``_wake_window``)."""

    __slots__ = (
        "chunks",
        "error",
        "headers",
        "id",
        "local_closed",
        "remote_closed",
        "slot",
        "status",
    )

    def __init__(self, stream_id: int, slot: int) -> None:
        self.id = stream_id
        self.slot = slot
        self.status: int | None = None
        self.headers: Headers = []
        self.chunks: deque[tuple[bytes, int]] = deque()  # (data, flow-controlled size)
        self.local_closed = False
        self.remote_closed = False
        self.error: BaseException | None = None

    @property
    def finished(self) -> bool:
        """Both sides ended, or the stream failed: nothing more will happen on it."""
        return self.error is not None or (self.local_closed and self.remote_closed)

    def _wake(self) -> None:
        """A reader may progress (head, data, end, error)."""

    def _wake_window(self) -> None:
        """A writer may progress (window opened, error)."""

    def _fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        self._wake()
        self._wake_window()


S = TypeVar("S", bound=StreamState)


@dataclass(slots=True)
class Changes:
    """What one :meth:`H2Protocol.receive_data` means for the connection as a whole."""

    settings_received: bool = False
    """The server's first SETTINGS arrived (the connection is ready)."""
    capacity_changed: bool = False
    """The stream capacity changed (new MAX_CONCURRENT_STREAMS, GOAWAY): tell the pool."""
    pings_acked: list[bytes] = field(default_factory=list)
    """Payloads of the PING ACKs received."""


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


class H2Protocol(Generic[S]):
    """HTTP/2 client state of one connection; streams are made by ``new_stream(id, slot)``.

    Nothing here blocks or raises on the network's behalf except :meth:`receive_data`, which
    raises :class:`ConnectionClosed` for a protocol violation (after queueing h2's GOAWAY).
    """

    def __init__(
        self,
        origin: Origin,
        new_stream: Callable[[int, int], S],
        *,
        stream_window: int,
        connection_window: int,
    ) -> None:
        self.origin = origin
        self._new_stream = new_stream
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.h2 = _H2(config=config)
        self.h2.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: stream_window,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 65536,
            },
        )
        self._connection_window = connection_window
        self.streams: dict[int, S] = {}  # h2 stream id -> live (unfinished) stream
        self.slots: dict[int, S] = {}  # pool lease slot -> its stream, until released
        self.settings_received = False
        self.closing = False  # we sent GOAWAY
        self.closed = False
        self.error: BaseException | None = None
        self.goaway_code: ErrorCodes | int | None = None
        self.goaway_last_stream: int | None = None
        self.goaway_data: bytes | None = None  # the GOAWAY's debug data (a reason, by convention)
        self.violated = False  # the server broke the protocol (we answered GOAWAY)
        # Streams whose HEADERS are still in h2's output buffer (not yet taken by data_to_send):
        # if the connection dies now, the server never saw them, so they are refused, not lost.
        self._unsent: dict[int, S] = {}

    # -- state ----------------------------------------------------------------------------------

    @property
    def draining(self) -> bool:
        """No new streams: GOAWAY received, closing, or the stream id space is nearly used up."""
        return (
            self.closed
            or self.closing
            or self.goaway_code is not None
            or self.h2.highest_outbound_stream_id > LAST_STREAM_ID - 1000
        )

    @property
    def streams_started(self) -> int:
        """How many streams this connection has opened (client stream ids are 1, 3, 5, ...)."""
        return (self.h2.highest_outbound_stream_id + 1) // 2

    @property
    def remote_max_streams(self) -> int:
        """The server's SETTINGS_MAX_CONCURRENT_STREAMS (unlimited until it says otherwise)."""
        return int(self.h2.remote_settings.max_concurrent_streams)

    def ended_by(self) -> BaseException | None:
        """The server's error that ended or drained this connection, if it was one: a protocol
        violation, a GOAWAY with an error code, a lost socket. None for a graceful GOAWAY
        (NO_ERROR), a close we started, or while open."""
        if self.goaway_code not in (None, ErrorCodes.NO_ERROR):
            assert self.goaway_code is not None
            detail = self.goaway_data.decode("utf-8", "replace")[:200] if self.goaway_data else ""
            return ConnectionClosed(
                f"{self.origin} sent GOAWAY {_code_name(self.goaway_code)}"
                + (f": {detail}" if detail else "")
            )
        if self.closed and not self.closing and self.goaway_code is None:
            return self.error
        return None

    def data_to_send(self) -> bytes:
        """The bytes queued for the server since the last call (the caller writes them)."""
        self._unsent.clear()
        return self.h2.data_to_send()

    # -- commands -------------------------------------------------------------------------------

    def initiate(self) -> None:
        """Queue the connection preface, our SETTINGS and the connection window's growth."""
        self.h2.initiate_connection()
        if self._connection_window > _DEFAULT_WINDOW:
            self.h2.increment_flow_control_window(self._connection_window - _DEFAULT_WINDOW)

    def start_request(self, slot: int, headers: Iterable[tuple[bytes, bytes]], *, end: bool) -> S:
        """Open a stream for pool slot ``slot`` and queue its HEADERS.

        Raises :class:`StreamRefused` when the connection is closed, draining or at the server's
        stream limit (nothing was sent: retry on another connection), :class:`H2Error` for
        headers HTTP/2 cannot carry.
        """
        if self.closed:
            # Closed between the pool's grant and this call (a GOAWAY and the close read in one
            # step): the request never left, so it is as retryable as a refused one.
            raise StreamRefused(
                f"connection to {self.origin} closed before the stream was opened: {self.error}"
            ) from self.error
        if self.draining:
            raise StreamRefused(f"connection to {self.origin} is draining (GOAWAY)")
        h2c = self.h2
        try:
            stream_id = h2c.get_next_available_stream_id()
            h2c.send_headers(stream_id, list(headers), end_stream=end)
        except (h2.exceptions.TooManyStreamsError, h2.exceptions.NoAvailableStreamIDError) as exc:
            raise StreamRefused(f"connection to {self.origin} has no free stream: {exc}") from exc
        except h2.exceptions.ProtocolError as exc:
            raise H2Error(f"cannot send this request over HTTP/2: {exc}") from exc
        stream = self._new_stream(stream_id, slot)
        stream.local_closed = end
        self.streams[stream_id] = stream
        self.slots[slot] = stream
        self._unsent[stream_id] = stream
        return stream

    def release_slot(self, slot: int) -> None:
        """End the stream of pool slot ``slot``: RST_STREAM(CANCEL) if unfinished (barge-in), and
        acknowledge its unread DATA so the connection window stays whole."""
        stream = self.slots.pop(slot, None)
        if stream is None:
            return
        self.reset(stream, ErrorCodes.CANCEL)
        unread = sum(size for _, size in stream.chunks)
        stream.chunks.clear()
        if unread and not self.closed:
            self.h2.acknowledge_received_data(unread, stream.id)

    def reset(self, stream: S, code: ErrorCodes = ErrorCodes.CANCEL) -> None:
        """Queue RST_STREAM for ``stream`` unless it already finished; fails it (wakes waiters)."""
        self.streams.pop(stream.id, None)
        if stream.finished:
            return
        stream._fail(StreamReset(f"stream {stream.id} was cancelled", code))
        if self.closed:
            return
        try:
            self.h2.reset_stream(stream.id, code)
        except h2.exceptions.StreamClosedError:
            pass  # the server closed it in the meantime

    def consumed(self, stream: S, size: int) -> None:
        """The application read ``size`` flow-controlled bytes of ``stream``: let the server send
        more (WINDOW_UPDATE)."""
        if size and not self.closed:
            self.h2.acknowledge_received_data(size, stream.id)

    def send_window(self, stream: S) -> int:
        """How many body bytes ``stream`` may send now (0: wait for WINDOW_UPDATE)."""
        try:
            window = self.h2.local_flow_control_window(stream.id)
        except h2.exceptions.StreamClosedError as exc:
            raise StreamReset(f"stream {stream.id} is closed", ErrorCodes.STREAM_CLOSED) from exc
        return min(window, self.h2.max_outbound_frame_size)

    def send_data(self, stream: S, data: bytes, *, end: bool) -> None:
        """Queue DATA (at most :meth:`send_window` bytes; empty with ``end`` just ends the side)."""
        try:
            if data:
                self.h2.send_data(stream.id, data, end_stream=end)
            elif end:
                self.h2.end_stream(stream.id)
        except h2.exceptions.StreamClosedError as exc:
            raise StreamReset(f"stream {stream.id} is closed", ErrorCodes.STREAM_CLOSED) from exc
        if end:
            stream.local_closed = True

    def ping(self, payload: bytes) -> None:
        """Queue a PING with this 8-byte payload; its ACK shows in :attr:`Changes.pings_acked`."""
        self.h2.ping(payload)

    def close(self) -> None:
        """Queue our GOAWAY (no new streams either way)."""
        self.closing = True
        try:
            self.h2.close_connection()
        except h2.exceptions.ProtocolError:
            pass

    def fail(self, error: BaseException) -> bool:
        """The connection is over: fail every stream with ``error``, except those whose HEADERS
        never left (:class:`StreamRefused`: retryable). Returns False if it already was
        (idempotent)."""
        if self.closed:
            return False
        self.closed = True
        self.error = error
        streams = list(self.streams.values())
        unsent, self._unsent = self._unsent, {}
        self.streams.clear()
        for stream in streams:
            if stream.id in unsent:
                refused = StreamRefused(
                    f"connection to {self.origin} closed before stream {stream.id} was sent:"
                    f" {error}"
                )
                refused.__cause__ = error
                stream._fail(refused)
            else:
                stream._fail(error)
        return True

    # -- events ---------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> Changes:
        """Feed bytes from the server; update streams; return the connection-level changes.

        Raises :class:`ConnectionClosed` (with the h2 error chained and GOAWAY queued) when the
        server broke the protocol.
        """
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self.violated = True
            raise ConnectionClosed(f"HTTP/2 protocol error from {self.origin}: {exc}") from exc
        changes = Changes()
        for event in events:
            self._dispatch(event, changes)
        return changes

    def _dispatch(self, event: h2.events.Event, changes: Changes) -> None:
        kind = type(event)
        if kind is h2.events.DataReceived:
            assert isinstance(event, h2.events.DataReceived)
            stream = self.streams.get(event.stream_id)
            size = event.flow_controlled_length or 0
            if stream is None:
                # Released or reset already: give the window back at once.
                if size:
                    self.h2.acknowledge_received_data(size, event.stream_id)
                return
            stream.chunks.append((event.data or b"", size))
            stream._wake()
        elif kind is h2.events.ResponseReceived:
            assert isinstance(event, h2.events.ResponseReceived)
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                headers: Headers = [(bytes(k), bytes(v)) for k, v in event.headers or ()]
                status = next((v for k, v in headers if k == b":status"), b"0")
                stream.status = int(status)
                stream.headers = [(k, v) for k, v in headers if not k.startswith(b":")]
                stream._wake()
        elif kind is h2.events.StreamEnded:
            assert isinstance(event, h2.events.StreamEnded)
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.remote_closed = True
                if stream.finished:
                    del self.streams[stream.id]
                stream._wake()
        elif kind is h2.events.StreamReset:
            assert isinstance(event, h2.events.StreamReset)
            stream = self.streams.pop(event.stream_id, None)
            if stream is not None:
                code = event.error_code or 0
                if code == ErrorCodes.REFUSED_STREAM:
                    stream._fail(StreamRefused(f"{self.origin} refused stream {stream.id}"))
                else:
                    stream._fail(
                        StreamReset(
                            f"{self.origin} reset stream {stream.id}: {_code_name(code)}", code
                        )
                    )
        elif kind is h2.events.WindowUpdated:
            assert isinstance(event, h2.events.WindowUpdated)
            if not event.stream_id:
                for stream in self.streams.values():
                    stream._wake_window()
            elif (stream := self.streams.get(event.stream_id)) is not None:
                stream._wake_window()
        elif kind is h2.events.RemoteSettingsChanged:
            assert isinstance(event, h2.events.RemoteSettingsChanged)
            first = not self.settings_received
            self.settings_received = True
            changes.settings_received |= first
            changed = event.changed_settings
            if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in changed:
                for stream in self.streams.values():
                    stream._wake_window()
            if not first and h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS in changed:
                changes.capacity_changed = True
        elif kind is h2.events.PingAckReceived:
            assert isinstance(event, h2.events.PingAckReceived)
            changes.pings_acked.append(event.ping_data or b"")
        elif kind is h2.events.ConnectionTerminated:
            assert isinstance(event, h2.events.ConnectionTerminated)
            self._on_goaway(event)
            changes.capacity_changed = True

    def _on_goaway(self, event: h2.events.ConnectionTerminated) -> None:
        """Drain (RFC 9113 6.8): streams above ``last_stream_id`` were never processed (refused,
        retryable); the others may complete."""
        last = event.last_stream_id if event.last_stream_id is not None else LAST_STREAM_ID
        self.goaway_code = event.error_code if event.error_code is not None else 0
        self.goaway_last_stream = last
        self.goaway_data = event.additional_data
        for stream_id in [s for s in self.streams if s > last]:
            stream = self.streams.pop(stream_id)
            stream._fail(
                StreamRefused(
                    f"{self.origin} sent GOAWAY ({_code_name(self.goaway_code)}, last stream"
                    f" {last}) before processing stream {stream_id}"
                )
            )

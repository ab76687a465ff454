"""The generic WebSocket adapter (on ``websockets``) and what the provider adapters share.

:class:`WebSocketAdapter` lends plain :class:`websockets.asyncio.client.ClientConnection` objects:
TLS (``ca_file`` / ``verify``), headers, a secret API key header, subprotocols, open and close
handshakes under timeouts. Health is a WebSocket ping answered by a pong within the pool's
``ping_timeout``, because a socket's state stays OPEN when the peer vanishes silently.

Handshake failures become :class:`~voicepool.ConnectError`: HTTP 401/403 (and 400/404: a wrong
URL or parameter) and certificate failures are ``fatal`` (the pool opens its circuit at once), 429
and 5xx are not (the pool backs off). The secret never appears in a message, a repr or a log line:
the ``websockets`` debug log of handshake headers goes through a redacting logger.

:class:`ManagedSocket` is the base of the provider connections (Deepgram, ElevenLabs, Cartesia): a
reader task that parses every server message (a malformed one discards that socket only), a
keepalive timer for sockets held by a call, and a report to the pool the moment the socket closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import (
    ConnectionClosed,
    InvalidHandshake,
    InvalidStatus,
    InvalidURI,
)
from websockets.protocol import State
from websockets.typing import Subprotocol

from voicepool._redact import SECRET_KEY, get_logger
from voicepool.adapter import Adapter, LeaseMode
from voicepool.dns import AddressTracker, default_resolver
from voicepool.errors import ConnectError, VoicepoolError
from voicepool.settings import NO_SECRET, OptionalSecret

__all__ = [
    "FATAL_STATUSES",
    "BaseWebSocketAdapter",
    "EndpointOptions",
    "MalformedMessage",
    "ManagedSocket",
    "StreamClosed",
    "WebSocketAdapter",
    "WebSocketOptions",
    "handshake_status_error",
    "translate_connect_error",
]

log = get_logger("voicepool.adapters.websocket")
_wire_log = get_logger("voicepool.adapters.websocket.wire")

FATAL_STATUSES = frozenset({400, 401, 403, 404})
"""Handshake statuses that retrying cannot cure: bad key, forbidden, wrong URL or parameters."""

_HINTS = {
    400: "bad request: check the URL parameters",
    401: "the API key was rejected",
    403: "forbidden: the key lacks access",
    404: "not found: check the URL and path",
    429: "rate or concurrency limit reached; backing off",
}

C = TypeVar("C")


class StreamClosed(VoicepoolError, ConnectionError):
    """The WebSocket under a stream closed (peer close, network failure, malformed message).

    ``code`` and ``reason`` are the close frame's, when there was one.
    """

    def __init__(self, message: str, *, code: int | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


class MalformedMessage(StreamClosed):
    """The server sent a message that does not parse; that socket is discarded."""


class EndpointOptions(BaseModel):
    """Options of a WebSocket endpoint. ``api_key`` and ``secret_headers`` are never logged."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(description="ws:// or wss:// URL of the endpoint.")
    headers: dict[str, str] = Field(default_factory=dict, description="Extra, non-secret headers.")
    secret_headers: dict[str, SecretStr] = Field(
        default_factory=dict, description="Extra headers whose values are secrets."
    )
    api_key: OptionalSecret = Field(
        default=NO_SECRET, description="Sent as `auth_header: auth_scheme key`."
    )
    auth_header: str = "Authorization"
    auth_scheme: str = Field(
        default="Bearer", description="Prefix of the key ('' for the bare key)."
    )
    subprotocols: list[str] = Field(default_factory=list)
    ca_file: Path | None = Field(
        default=None, description="PEM bundle to trust instead of the system's."
    )
    verify: bool = Field(
        default=True, description="Verify the server certificate (turn off only locally)."
    )
    server_hostname: str | None = Field(
        default=None, description="TLS name to check (default: URL host)."
    )
    open_timeout: float = Field(default=10.0, gt=0, description="TCP + TLS + upgrade, seconds.")
    close_timeout: float = Field(default=2.0, gt=0, description="Closing handshake, seconds.")
    max_message_size: int | None = Field(default=4 * 2**20, description="Largest incoming message.")
    compression: bool = Field(
        default=False, description="permessage-deflate (audio does not compress)."
    )
    max_idle: float | None = Field(
        default=None, gt=0, description="The server's idle close, seconds."
    )

    @field_validator("url")
    @classmethod
    def _ws_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError("url must be ws://host[:port]/... or wss://host[:port]/...")
        if parts.username or parts.password:
            raise ValueError("url must not carry credentials; use api_key")
        return value


class WebSocketOptions(EndpointOptions):
    """Options of the generic adapter: an endpoint, an optional text keepalive, and the boundary
    that makes ``exclusive`` reuse safe.

    Without ``reset_boundary`` the adapter is ``single_use``: a stateful socket handed to a second
    call could carry the first call's data. With it, leases are ``exclusive`` and the reset after
    each one sends ``reset_message`` (if any) and reads until a text message matching
    ``reset_boundary`` arrives, dropping everything before it; a socket that reaches no boundary
    within ``reset_timeout``, or receives anything within ``reset_quiet`` after it, is discarded.
    ``reset_message`` should produce exactly one boundary: a holder that asks for one itself
    reads it before releasing.
    """

    keepalive_message: str | None = Field(
        default=None, description="Text frame sent on each health ping (a provider keepalive)."
    )
    reset_message: str | None = Field(
        default=None,
        description="Text frame sent at reset to ask the server for a boundary (e.g. a flush).",
    )
    reset_boundary: str | None = Field(
        default=None,
        description=(
            "Regular expression matching the server's last message of a finished exchange."
            " Set: leases are exclusive, and a reset drains to it. Unset: single_use."
        ),
    )
    reset_timeout: float = Field(
        default=2.0, gt=0, description="How long a reset waits for the boundary."
    )
    reset_quiet: float = Field(
        default=0.05,
        ge=0,
        description="Silence required after the boundary, seconds (a message within it: discard).",
    )

    @field_validator("reset_boundary")
    @classmethod
    def _boundary_compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"reset_boundary is not a regular expression: {exc}") from exc
        return value


def safe_endpoint(url: str) -> str:
    """``scheme://host:port/path`` without user info or query (which may carry tokens)."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}{parts.path}"


def handshake_status_error(endpoint: str, status: int, retry_after: str | None) -> ConnectError:
    """The :class:`~voicepool.ConnectError` for an upgrade answered with HTTP ``status`` (any
    client library): fatal for :data:`FATAL_STATUSES`, with a hint and ``Retry-After`` on 429."""
    hint = _HINTS.get(status, "server error" if status >= 500 else "unexpected status")
    extra = f" (Retry-After: {retry_after})" if retry_after and status == 429 else ""
    return ConnectError(
        f"{endpoint}: handshake rejected with HTTP {status}: {hint}{extra}",
        fatal=status in FATAL_STATUSES,
        status=status,
    )


def translate_connect_error(exc: BaseException, endpoint: str) -> ConnectError:
    """A :class:`~voicepool.ConnectError` for a failed open (the cause is chained by the caller).

    Fatal: HTTP statuses in :data:`FATAL_STATUSES`, certificate failures, an invalid URI.
    """
    if isinstance(exc, InvalidStatus):
        response = exc.response
        return handshake_status_error(
            endpoint, response.status_code, response.headers.get("Retry-After")
        )
    if isinstance(exc, ssl.SSLCertVerificationError):
        return ConnectError(
            f"{endpoint}: TLS certificate verification failed: {exc.verify_message}", fatal=True
        )
    if isinstance(exc, InvalidURI):
        return ConnectError(f"{endpoint}: invalid URI", fatal=True)
    if isinstance(exc, TimeoutError):
        return ConnectError(f"{endpoint}: opening handshake timed out")
    if isinstance(exc, InvalidHandshake | ssl.SSLError | OSError | EOFError):
        return ConnectError(f"{endpoint}: {type(exc).__name__}: {exc}")
    return ConnectError(f"{endpoint}: unexpected {type(exc).__name__}: {exc}")


class _RedactingLogger(logging.LoggerAdapter[logging.Logger]):
    """Passes ``websockets`` debug lines through, with secret header values replaced: the named
    secret headers, and any header whose name looks like a credential (``Authorization`` given
    in the plain ``headers`` option). The logger's filter scrubs known values besides."""

    def __init__(self, logger: logging.Logger, secret_names: Iterable[str]) -> None:
        super().__init__(logger, {})
        self.secret_names = frozenset(name.lower() for name in secret_names)

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        return msg, kwargs

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if (
            args
            and msg == "> %s: %s"
            and len(args) == 2
            and (str(args[0]).lower() in self.secret_names or SECRET_KEY.search(str(args[0])))
        ):
            args = (args[0], "[redacted]")
        super().log(level, msg, *args, **kwargs)


class BaseWebSocketAdapter(Adapter[C], Generic[C]):
    """What every WebSocket adapter shares: options, TLS, headers, the opening handshake, errors.

    Subclasses set ``Options`` (a subclass of :class:`EndpointOptions`) and implement the
    connection type ``C``. The constructor takes the Options model, or keyword options.
    """

    Options: ClassVar[type[BaseModel] | None] = EndpointOptions
    options: EndpointOptions

    def __init__(self, options: EndpointOptions | None = None, **kwargs: Any) -> None:
        self.options = self._build_options(options, kwargs)
        if self.options.max_idle is not None:
            self.max_idle = self.options.max_idle  # the provider's idle close, per instance
        self._ssl: ssl.SSLContext | None = None
        secret_names = list(self.options.secret_headers)
        if self.options.api_key is not None:
            secret_names.append(self.options.auth_header)
        self._logger = _RedactingLogger(_wire_log, secret_names)
        # Retires connections whose address left DNS (the pool's conn: the socket, or the
        # ManagedSocket wrapping it).
        self.addresses = AddressTracker(self, urlsplit(self.url()).hostname or "")

    # -- what subclasses customise ----------------------------------------------------------------

    def url(self) -> str:
        """The URL to open (providers build it from typed options)."""
        return str(self.options.url)

    def request_headers(self) -> list[tuple[str, str]]:
        """Handshake headers, secrets included (never log this list)."""
        o = self.options
        headers: list[tuple[str, str]] = list(o.headers.items())
        headers += [(k, v.get_secret_value()) for k, v in o.secret_headers.items()]
        if o.api_key is not None:
            key = o.api_key.get_secret_value()
            headers.append((o.auth_header, f"{o.auth_scheme} {key}" if o.auth_scheme else key))
        return headers

    def describe(self) -> str:
        """``<adapter> wss://host:port/path``: no query string, no credentials."""
        return f"{type(self).__name__} {safe_endpoint(self.url())}"

    def ssl_context(self) -> ssl.SSLContext | None:
        """The client TLS context for wss:// URLs (cached), from ``ca_file`` and ``verify``."""
        if urlsplit(self.url()).scheme != "wss":
            return None
        if self._ssl is None:
            o = self.options
            ctx = ssl.create_default_context(cafile=str(o.ca_file) if o.ca_file else None)
            if not o.verify:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            ctx.set_alpn_protocols(["http/1.1"])
            self._ssl = ctx
        return self._ssl

    async def open_socket(self) -> ClientConnection:
        """Open one WebSocket (TCP, TLS, upgrade) under ``open_timeout``.

        Raises ConnectError with the library error chained. Cancellation-safe: a cancelled open
        leaves no socket behind (``websockets`` closes the transport of an unfinished handshake).
        """
        o = self.options
        url = self.url()
        kwargs: dict[str, Any] = {}
        if o.server_hostname is not None:
            kwargs["server_hostname"] = o.server_hostname
        parts = urlsplit(url)
        resolver = default_resolver()
        sock: socket.socket | None = None
        try:
            # The shared DNS cache and happy eyeballs pick the address; websockets gets the socket.
            async with asyncio.timeout(o.open_timeout):
                sock = await resolver.connect(
                    parts.hostname or "", parts.port or (443 if parts.scheme == "wss" else 80)
                )
            peer = sock.getpeername()
            ws = await connect(
                url,
                sock=sock,
                additional_headers=self.request_headers(),
                subprotocols=[Subprotocol(p) for p in o.subprotocols] or None,
                ssl=self.ssl_context(),
                proxy=None,  # never pick a proxy up from the environment: connect where told
                open_timeout=o.open_timeout,
                close_timeout=o.close_timeout,
                ping_interval=None,  # the pool pings, out of band and on its own schedule
                ping_timeout=None,
                max_size=o.max_message_size,
                compression="deflate" if o.compression else None,
                logger=self._logger,
                user_agent_header="voicepool",
                **kwargs,
            )
        except BaseException as exc:
            if sock is not None:
                sock.close()  # a no-op once websockets' transport owns (and closed) it
            if isinstance(exc, InvalidHandshake | OSError | TimeoutError | EOFError | ssl.SSLError):
                raise translate_connect_error(exc, safe_endpoint(url)) from exc
            raise
        self.addresses.add(ws, peer, resolver)
        return ws

    def is_fatal(self, exc: BaseException) -> bool:
        if isinstance(exc, ConnectError):
            return exc.fatal
        return translate_connect_error(exc, "").fatal

    # -- what a pool needs to keep a socket it does not read (raw and aiohttp adapters) -------

    waits_for_server_close: ClassVar[bool] = False
    """The server answers the goodbye with final messages and closes itself (Deepgram)."""

    def idle_keepalives(self) -> list[str]:
        """Text frames that keep an idle socket from the server's idle close."""
        return []

    def goodbyes(self) -> list[str]:
        """Text frames sent before the closing handshake."""
        return []

    def recycle_after(self) -> float | None:
        """Seconds idle after which a ping fails on purpose, so the pool replaces the socket
        before the server's idle close (None: the keepalive keeps it)."""
        return None

    def stale_after(self) -> float | None:
        """Seconds idle after which the socket is reported unusable (None: never)."""
        return None

    def __repr__(self) -> str:
        return f"<{self.describe()}>"


class WebSocketAdapter(BaseWebSocketAdapter[ClientConnection]):
    """Generic WebSocket adapter: ``lease.conn`` is a ``websockets`` ``ClientConnection``.

    ``single_use`` unless ``reset_boundary`` is set (then ``exclusive``: see
    :class:`WebSocketOptions`). ``ping`` sends ``keepalive_message`` (if any), then a WebSocket
    ping, and waits for the pong (the pool bounds it with ``ping_timeout``); it raises
    :class:`StreamClosed` when the socket is closed. ``connect`` raises
    :class:`~voicepool.ConnectError` (see the module doc for fatality).
    """

    Options: ClassVar[type[BaseModel] | None] = WebSocketOptions
    options: WebSocketOptions
    lease_mode: LeaseMode = LeaseMode.SINGLE_USE

    def __init__(self, options: WebSocketOptions | None = None, **kwargs: Any) -> None:
        super().__init__(options, **kwargs)
        boundary = self.options.reset_boundary
        self._boundary = re.compile(boundary) if boundary is not None else None
        if self._boundary is not None:
            self.lease_mode = LeaseMode.EXCLUSIVE  # per instance: a reset can prove it clean

    # -- Adapter ----------------------------------------------------------------------------------

    def idle_keepalives(self) -> list[str]:
        message = self.options.keepalive_message
        return [message] if message is not None else []

    async def connect(self) -> ClientConnection:
        ws = await self.open_socket()
        # Tell the pool the moment the socket goes away, instead of at the next health tick.
        ws.connection_lost_waiter.add_done_callback(lambda _f: self.connection_changed(ws))
        return ws

    async def ping(self, conn: ClientConnection) -> None:
        """Provider keepalive (if configured), then a WebSocket ping; wait for the pong.

        Raises StreamClosed if the socket is closed. Cancelled while waiting for the pong (the
        pool's ``ping_timeout``), it aborts the socket: a silent peer is then reported closed.
        """
        try:
            for message in self.idle_keepalives():
                await conn.send(message)
        except ConnectionClosed as exc:
            raise _closed_error(exc, self.describe()) from exc
        await _await_pong(conn, self.describe())

    def is_open(self, conn: ClientConnection) -> bool:
        return conn.state is State.OPEN and self.addresses.is_listed(conn)

    async def reset(self, conn: ClientConnection) -> None:
        """Prove the socket clean for the next holder, or raise so the pool discards it.

        Sends ``reset_message`` (if any), then reads until a text message matches
        ``reset_boundary`` (within ``reset_timeout``), dropping what came before; a message
        within ``reset_quiet`` after the boundary means the server is still sending: discard.
        Without a boundary nothing can prove the socket clean (an ``exclusive`` override in
        settings), so it always raises. Raises RuntimeError, TimeoutError or StreamClosed; a
        cancelled reset leaves the socket in an unknown state, which the pool discards.
        """
        boundary = self._boundary
        if boundary is None:
            raise RuntimeError(
                f"{self.describe()}: no reset_boundary, so nothing proves the socket clean;"
                " discarding it (set reset_boundary for exclusive reuse)"
            )
        try:
            if self.options.reset_message is not None:
                await conn.send(self.options.reset_message)
            async with asyncio.timeout(self.options.reset_timeout):
                while True:
                    message = await conn.recv()
                    if isinstance(message, str) and boundary.search(message):
                        break
            try:
                # Silence after the boundary is the proof: a server still streaming the last
                # call's data is caught here, not by the next holder (recv is cancellation-safe).
                async with asyncio.timeout(self.options.reset_quiet):
                    await conn.recv()
            except TimeoutError:
                return
        except ConnectionClosed as exc:
            raise _closed_error(exc, self.describe()) from exc
        raise RuntimeError(f"{self.describe()}: the server kept sending after the boundary")

    async def close(self, conn: ClientConnection) -> None:
        """Closing handshake (1000), bounded by ``close_timeout``; never raises on a dead peer."""
        self.addresses.discard(conn)
        with contextlib.suppress(ConnectionClosed, OSError):
            await conn.close()


async def _await_pong(
    ws: ClientConnection, where: str, abandon: Callable[[str], None] | None = None
) -> None:
    """Send a WebSocket ping and wait for its pong. Raises StreamClosed on a closed socket.

    Cancelled while waiting (the pool's ``ping_timeout``): no pong came in time, so the socket is
    abandoned (its transport aborted) before the cancellation propagates: a socket's state stays
    OPEN when its peer vanishes silently, and it must not be reported open after a failed ping.
    """
    try:
        pong = await ws.ping()
    except ConnectionClosed as exc:
        raise _closed_error(exc, where) from exc
    try:
        await pong
    except ConnectionClosed as exc:
        raise _closed_error(exc, where) from exc
    except asyncio.CancelledError:
        if abandon is not None:
            abandon("no pong within the ping timeout")
        else:
            ws.transport.abort()
        raise


def _closed_error(exc: ConnectionClosed, where: str) -> StreamClosed:
    frame = exc.rcvd or exc.sent
    code = frame.code if frame is not None else None
    reason = frame.reason if frame is not None else ""
    why = f"code {code} {reason!r}" if code is not None else "no close frame (connection lost)"
    return StreamClosed(f"{where}: WebSocket closed: {why}", code=code, reason=reason)


class ManagedSocket:
    """A provider WebSocket with a reader task owned by its adapter.

    Subclasses implement :meth:`on_message` (parse and route one server message; raise
    :class:`MalformedMessage` to discard the socket) and :meth:`on_closed` (wake consumers), and
    may override :meth:`keepalive_messages`. The reader calls ``adapter.connection_changed(self)``
    once when the socket ends, so the pool replaces it at once.
    """

    def __init__(
        self,
        ws: ClientConnection,
        adapter: Adapter[Any],
        *,
        keepalive_interval: float | None,
        close_timeout: float,
    ) -> None:
        self.ws = ws
        self.adapter = adapter
        self.where = adapter.describe()
        self.error: StreamClosed | None = None
        self.loop = asyncio.get_running_loop()
        self.last_sent = self.loop.time()
        self.close_timeout = close_timeout
        self.keepalive_interval = keepalive_interval
        self.keepalives_sent = 0
        self._keepalive: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reader: asyncio.Task[None] | None = None
        self._addresses: AddressTracker | None = getattr(adapter, "addresses", None)
        if self._addresses is not None:
            self._addresses.rebind(ws, self)  # the pool holds this object, not the raw socket

    def start(self) -> None:
        """Start the reader and the keepalive timer (call once, right after the handshake)."""
        self._reader = self.loop.create_task(self._read_loop(), name=f"voicepool:{self.where}")
        self._arm_keepalive()

    @property
    def is_open(self) -> bool:
        return (
            self.error is None
            and self.ws.state is State.OPEN
            and (self._addresses is None or self._addresses.is_listed(self))
        )

    def check_open(self) -> None:
        """Raise StreamClosed (a fresh instance) if the socket is gone."""
        if self.error is not None:
            raise StreamClosed(str(self.error), code=self.error.code, reason=self.error.reason)
        if self.ws.state is not State.OPEN:
            raise StreamClosed(f"{self.where}: WebSocket is {self.ws.state.name.lower()}")

    async def send(self, message: str | bytes) -> None:
        """Send one whole message. Raises StreamClosed if the socket is closed.

        Cancellation-safe: a whole frame is queued before the only await (drain).
        """
        self.check_open()
        try:
            await self.ws.send(message)
        except ConnectionClosed as exc:
            raise _closed_error(exc, self.where) from exc
        self.last_sent = self.loop.time()

    async def ping(self, messages: Iterable[str] = ()) -> None:
        """Send ``messages`` (provider keepalives), then a WebSocket ping; wait for the pong.

        Raises StreamClosed if the socket is closed. The caller bounds the wait (the pool's
        ``ping_timeout``): a ping cancelled while it waits for the pong abandons the socket (see
        :meth:`abandon`), so a silent peer is reported dead the moment its ping fails.
        """
        for message in messages:
            await self.send(message)
            self.keepalives_sent += 1
        self.check_open()
        await _await_pong(self.ws, self.where, self.abandon)

    def abandon(self, why: str) -> None:
        """The peer is unreachable: fail every consumer now, drop the TCP connection, and let
        the reader report the close to the pool (``is_open`` is False from here on)."""
        self._fail(StreamClosed(f"{self.where}: {why}"))
        self.ws.transport.abort()

    # -- subclass hooks ---------------------------------------------------------------------------

    def on_message(self, message: str | bytes) -> None:
        raise NotImplementedError

    def on_closed(self, error: StreamClosed) -> None:
        """The socket is gone: fail every consumer with ``error``."""

    def keepalive_messages(self) -> list[str]:
        """Messages that keep the provider from closing a socket held by a call ([] = none)."""
        return []

    # -- reader and keepalive ---------------------------------------------------------------------

    async def _read_loop(self) -> None:
        error: StreamClosed
        try:
            while True:
                self.on_message(await self.ws.recv())
        except ConnectionClosed as exc:
            error = _closed_error(exc, self.where)
        except MalformedMessage as exc:
            error = exc
            log.warning("%s: %s; discarding the socket", self.where, exc)
            self._fail(error)
            with contextlib.suppress(ConnectionClosed, OSError):
                await self.ws.close(1002, "malformed message")
        except Exception as exc:  # a bug in a parser must not leave the socket half-alive
            error = MalformedMessage(f"{self.where}: cannot handle a message: {exc!r}")
            log.exception("%s: reader failed; discarding the socket", self.where)
            self._fail(error)
            with contextlib.suppress(ConnectionClosed, OSError):
                await self.ws.close(1011, "client error")
        finally:
            if self._keepalive is not None:
                self._keepalive.cancel()
                self._keepalive = None
        self._fail(error)
        self.adapter.connection_changed(self)

    def _fail(self, error: StreamClosed) -> None:
        if self.error is None:
            self.error = error
            self.on_closed(error)

    def _arm_keepalive(self) -> None:
        if self.keepalive_interval is None or self.error is not None:
            return
        due = max(self.last_sent, self.loop.time() - self.keepalive_interval * 0.5)
        self._keepalive = self.loop.call_at(due + self.keepalive_interval, self._keepalive_due)

    def _keepalive_due(self) -> None:
        self._keepalive = None
        interval = self.keepalive_interval
        if interval is None or not self.is_open:
            return
        if self.loop.time() - self.last_sent >= interval * 0.95:
            messages = self.keepalive_messages()
            if messages:
                self.spawn(self._send_keepalives(messages))
        self._arm_keepalive()

    async def _send_keepalives(self, messages: list[str]) -> None:
        with contextlib.suppress(StreamClosed):  # the reader reports a dead socket
            for message in messages:
                await self.send(message)
                self.keepalives_sent += 1

    def spawn(self, coro: Any) -> None:
        """Run ``coro`` as a task this socket owns (cancelled by :meth:`aclose`)."""
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self, goodbye: Iterable[str] = (), *, wait_for_server: bool = False) -> None:
        """Send ``goodbye`` messages (CloseStream, close_socket) if open, optionally wait for the
        server to close, then the closing handshake, and stop the reader.

        The whole close takes at most about ``close_timeout``; past it (or if cancelled) the TCP
        connection is aborted, so nothing is left open. Never raises on a dead peer; idempotent.
        """
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        if self._addresses is not None:
            self._addresses.discard(self)
        reader = self._reader

        async def server_closed() -> None:
            if reader is not None:
                await asyncio.shield(reader)

        try:
            await close_politely(
                self.ws,
                goodbye if self.is_open else (),
                timeout=self.close_timeout,
                until_closed=server_closed if wait_for_server else None,
            )
        finally:
            for task in list(self._tasks):
                task.cancel()
            if reader is not None and not reader.done():
                reader.cancel()
        if reader is not None:
            await asyncio.wait([reader, *self._tasks], timeout=self.close_timeout)


async def close_politely(
    ws: ClientConnection,
    goodbye: Iterable[str],
    *,
    timeout: float,
    until_closed: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Send ``goodbye`` (if the socket is open), await ``until_closed`` (the server's own close,
    for providers that answer a goodbye with final results), then the closing handshake.

    The whole close takes at most ``timeout``; past it, or if cancelled, the TCP connection is
    aborted, so nothing is left open. Never raises on a dead peer.
    """
    try:
        async with asyncio.timeout(timeout):
            if ws.state is State.OPEN:
                with contextlib.suppress(ConnectionClosed):
                    for message in goodbye:
                        await ws.send(message)
                if until_closed is not None:
                    await until_closed()
            with contextlib.suppress(ConnectionClosed, OSError):
                await ws.close()
    except TimeoutError:
        pass
    finally:
        # Past the deadline, or cancelled: drop the TCP connection rather than leak it.
        if ws.state is not State.CLOSED:
            ws.transport.abort()

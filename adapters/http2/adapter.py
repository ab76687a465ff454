"""`Http2Adapter`: pooled HTTP/2 connections to one LLM endpoint, each lease one stream.

The pool (``LeaseMode.MULTIPLEXED``) puts a lease on the least-loaded connection with a free stream
slot; this adapter tells it how many slots a connection has now (the smaller of ``max_streams`` and
the server's SETTINGS_MAX_CONCURRENT_STREAMS, 0 while draining after GOAWAY) and notifies it at once
when that changes or the connection dies. Health is an HTTP/2 PING (no billable request).
"""

from __future__ import annotations

import ssl
import time
import weakref
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

from h2.errors import ErrorCodes
from pydantic import BaseModel, ConfigDict, Field, field_validator

from voicepool._redact import describe_error, get_logger, silence_header_dumps
from voicepool.adapter import Adapter, LeaseMode
from voicepool.dns import AddressTracker, default_resolver
from voicepool.errors import ConnectError
from voicepool.settings import NO_SECRET, OptionalSecret

from .._http import check_base_url, header_name  # noqa: TID251, TID252
from .connection import H2Connection  # noqa: TID251
from .protocol import ConnectionClosed, H2Error, Origin  # noqa: TID251

__all__ = ["Http2Adapter", "Http2Options"]

log = get_logger("voicepool.adapters.http2")
silence_header_dumps("hpack.hpack")  # its DEBUG lines are our request headers, key included

_RETRYABLE_STATUS = frozenset({408, 425, 429})


class Http2Options(BaseModel):
    """Options of :class:`Http2Adapter` (validated at boot; secrets are ``SecretStr``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str = Field(
        description="https://host[:port][/prefix] (TLS, ALPN h2), or http:// for cleartext HTTP/2"
        " with prior knowledge. Requests through PooledTransport must target this origin."
    )
    headers: dict[str, str] = Field(
        default_factory=dict,
        description="Headers added to every request that does not set them (not for secrets).",
    )
    api_key: OptionalSecret = Field(
        default=NO_SECRET, description="Credential sent in `api_key_header`."
    )
    api_key_header: str = Field(
        default="authorization",
        description="`authorization` sends `Bearer <api_key>`; any other name (x-api-key) the key.",
    )
    max_streams: int = Field(default=100, ge=1, le=2**31 - 1, description="Streams per connection.")
    warmup_path: str | None = Field(
        default=None,
        description="Request sent on each new connection, e.g. /v1/models (None: no warm-up).",
    )
    warmup_method: Literal["GET", "HEAD", "OPTIONS"] = "GET"
    ca_file: str | None = Field(
        default=None, description="PEM CA bundle to trust instead of the system's."
    )
    verify: bool = Field(
        default=True, description="Verify the server certificate (never off in production)."
    )
    server_hostname: str | None = Field(
        default=None, description="TLS SNI / certificate name override."
    )
    stream_window: int = Field(
        default=1 << 20, ge=65535, le=2**31 - 1, description="Receive window/stream."
    )
    connection_window: int = Field(
        default=1 << 24, ge=65535, le=2**31 - 1, description="Receive window."
    )
    stall_timeout: float | None = Field(
        default=0.5,
        gt=0,
        description="A stream started on a connection quiet for a quarter of this carries a PING;"
        " no answer within it and the connection takes no new streams (a black hole shows"
        " before any request times out). None: off.",
    )
    ping_backoff: float = Field(
        default=2.0,
        ge=1.0,
        description="Growth of the minimum ping spacing on GOAWAY ENHANCE_YOUR_CALM.",
    )

    @field_validator("base_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return check_base_url(value)

    @field_validator("headers")
    @classmethod
    def _check_headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, val in value.items():
            if not name or name != name.strip() or any(c in name for c in ":\r\n "):
                raise ValueError(f"invalid header name {name!r}")
            if "\r" in val or "\n" in val:
                raise ValueError(f"header {name!r} has a line break")
        return {k.lower(): v for k, v in value.items()}

    @field_validator("api_key_header")
    @classmethod
    def _lower(cls, value: str) -> str:
        return header_name(value)


class Http2Adapter(Adapter[H2Connection]):
    """HTTP/2 connections on ``h2`` over asyncio TLS; MULTIPLEXED leases are streams.

    Build with options or keywords: ``Http2Adapter(base_url="https://...", api_key="...")``.
    Use it through :class:`~voicepool.adapters.http2.PooledTransport` (an httpx transport), or
    directly: ``lease.conn.start_request(lease.stream_id, headers, end=...)``.
    """

    service: ClassVar[str | None] = "llm"
    lease_mode = LeaseMode.MULTIPLEXED
    max_streams = 100
    Options: ClassVar[type[Http2Options]] = Http2Options

    def __init__(self, options: Http2Options | None = None, **kwargs: Any) -> None:
        options = self._build_options(options, kwargs)
        self.options = options
        # Per-instance capacity: PoolSettings.resolve() reads it for sizing.
        self.max_streams = options.max_streams
        parts = urlsplit(options.base_url)
        scheme = parts.scheme
        host = parts.hostname or ""
        self.origin = Origin(scheme, host, parts.port or (443 if scheme == "https" else 80))
        self.path_prefix = parts.path.rstrip("/")
        self._ssl = self._ssl_context() if scheme == "https" else None
        headers = [(k.encode(), v.encode()) for k, v in options.headers.items()]
        if options.api_key is not None:
            key = options.api_key.get_secret_value()
            value = f"Bearer {key}" if options.api_key_header == "authorization" else key
            headers.append((options.api_key_header.encode(), value.encode()))
        self.default_headers: list[tuple[bytes, bytes]] = headers
        self._ping_gap = 0.0  # minimum seconds between PINGs; grows on ENHANCE_YOUR_CALM
        self._calmed: set[int] = set()  # ids of connections whose calm GOAWAY was counted
        self.calm_goaways = 0
        self.addresses = AddressTracker(self, host)  # retires connections whose address left DNS
        self._live: weakref.WeakSet[H2Connection] = weakref.WeakSet()  # for credentials_rejected
        self._rejected: dict[int, ConnectError] = {}  # id(conn) -> the 401/403 that drained it
        # After a 401/403, new connections take one stream until a request on them is accepted,
        # so the reconnect that closes the pool's circuit lets one request retest the key, not all.
        self._last_rejection: ConnectError | None = None
        self._probation: set[int] = set()
        # A server's request budget per connection (nginx keepalive_requests), learnt from its
        # GOAWAYs: streams beyond it would only be refused, so connections are not given them.
        self._budget: int | None = None
        self._budget_seen: int | None = None  # what the last budget GOAWAY showed
        self._goaways: set[int] = set()  # ids of connections whose GOAWAY was looked at

    def _ssl_context(self) -> ssl.SSLContext:
        opts = self.options
        ctx = ssl.create_default_context(cafile=opts.ca_file)
        if not opts.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        # Offer HTTP/1.1 too: a server without HTTP/2 then completes the handshake and picks it,
        # and connect() refuses it with a clear "does not speak HTTP/2" instead of a TLS alert.
        ctx.set_alpn_protocols(["h2", "http/1.1"])
        return ctx

    @property
    def on_probation(self) -> bool:
        """Connections opened after a 401/403 take one stream until a request is accepted."""
        return bool(self._probation)

    @property
    def request_budget(self) -> int | None:
        """Requests the server serves on one connection before its GOAWAY, as learnt from two
        GOAWAYs that refused streams with the same count (None: none learnt). Connections take
        no more streams than that; forgotten when a connection serves it all without GOAWAY."""
        return self._budget

    @property
    def ping_gap(self) -> float:
        """The minimum spacing of PINGs, grown after GOAWAY ENHANCE_YOUR_CALM (0: none)."""
        return self._ping_gap

    # -- Adapter --------------------------------------------------------------------------------

    async def connect(self) -> H2Connection:
        """Open one connection (TCP, TLS + ALPN h2, SETTINGS exchange, optional warm-up request).

        Raises ConnectError, ``fatal=True`` for an untrusted certificate, a server without HTTP/2,
        or a warm-up answered 4xx (401/403: bad credentials). Cancellation-safe.
        """
        resolver = default_resolver()
        try:
            sock = await resolver.connect(self.origin.host, self.origin.port)
            try:
                conn = await H2Connection.open(
                    self.origin,
                    self._ssl,
                    on_change=self._on_change,
                    stream_window=self.options.stream_window,
                    connection_window=self.options.connection_window,
                    stall_timeout=self.options.stall_timeout,
                    min_ping_gap=lambda: self._ping_gap,
                    server_hostname=self.options.server_hostname,
                    sock=sock,
                )
            except BaseException:
                sock.close()  # a no-op once the transport owns (and closed) it
                raise
            self.addresses.add(conn, sock.getpeername(), resolver)
        except ConnectError:
            raise
        except ssl.SSLCertVerificationError as exc:
            raise ConnectError(
                f"TLS certificate of {self.origin} rejected: {exc.verify_message}", fatal=True
            ) from exc
        except (OSError, H2Error) as exc:
            raise ConnectError(f"connect to {self.origin} failed: {describe_error(exc)}") from exc
        if self.options.warmup_path is not None:
            try:
                await self._warmup(conn)
            except BaseException:
                await conn.aclose(0)
                raise
        self._live.add(conn)
        if self._last_rejection is not None:
            self._probation.add(id(conn))
        return conn

    async def _warmup(self, conn: H2Connection) -> None:
        path = self.warmup_target()
        method = self.options.warmup_method
        headers = [
            (b":method", method.encode()),
            (b":scheme", self.origin.scheme.encode()),
            (b":authority", self.origin.authority.encode()),
            (b":path", path.encode()),
            *self.default_headers,
        ]
        try:
            stream = conn.start_request(0, headers, end=True)
            try:
                status, _ = await stream.response()
                while await stream.read():
                    pass
            finally:
                conn.release_slot(0)
        except H2Error as exc:
            raise ConnectError(f"warm-up {method} {path} on {self.origin} failed: {exc}") from exc
        if status >= 400:
            fatal = status < 500 and status not in _RETRYABLE_STATUS
            hint = ": check the credentials" if status in (401, 403) else ""
            raise ConnectError(
                f"warm-up {method} {path} on {self.origin} answered HTTP {status}{hint}",
                fatal=fatal,
                status=status,
            )

    def warmup_target(self) -> str:
        """The warm-up request's path: absolute as given, or relative to base_url's path."""
        path = self.options.warmup_path or "/"
        return path if path.startswith("/") else f"{self.path_prefix}/{path}"

    async def ping(self, conn: H2Connection) -> None:
        """HTTP/2 PING, answered by the server's ACK (the pool applies ``ping_timeout``).

        After a GOAWAY ENHANCE_YOUR_CALM, a ping that comes sooner than :attr:`ping_gap` after the
        last one on this connection is skipped, which lengthens the effective interval, but only
        while the skip tells the truth: the server was heard from within that gap and after the
        last stream that ended in an error. A connection in doubt (the pool pings it at once
        after a failed stream) is always pinged, so a black hole shows within ``ping_timeout``.
        Raises ConnectionClosed when the connection is gone.
        """
        if not conn.is_open:
            raise ConnectionClosed(f"connection to {self.origin} is closed")
        gap = self._ping_gap
        if gap:
            now = time.monotonic()
            heard = conn.last_received
            if now - conn.last_ping < gap and now - heard < gap and heard > conn.last_stream_error:
                return
        await conn.ping()

    def is_open(self, conn: H2Connection) -> bool:
        return conn.is_open and self.addresses.is_listed(conn)

    async def close(self, conn: H2Connection) -> None:
        """GOAWAY, then a polite TLS close (bounded); never raises."""
        self._calmed.discard(id(conn))
        self._goaways.discard(id(conn))
        self.addresses.discard(conn)
        self._live.discard(conn)
        self._rejected.pop(id(conn), None)
        self._probation.discard(id(conn))
        await conn.aclose()

    def is_fatal(self, exc: BaseException) -> bool:
        if isinstance(exc, ssl.SSLCertVerificationError):
            return True
        return super().is_fatal(exc)

    def stream_capacity(self, conn: H2Connection) -> int:
        """min(max_streams, the server's SETTINGS_MAX_CONCURRENT_STREAMS, what is left of its
        request budget); 0 while draining, while stalled (its liveness PING unanswered: back when
        the server is heard again), or after a 401/403; 1 on probation after a 401/403."""
        if conn.draining or conn.stalled or id(conn) in self._rejected:
            return 0
        if id(conn) in self._probation:
            return 1
        cap = min(self.options.max_streams, conn.remote_max_streams)
        if self._budget is not None:
            cap = min(cap, self._budget_left(conn, self._budget))
        return cap

    @staticmethod
    def _budget_left(conn: H2Connection, budget: int) -> int:
        """Leases ``conn`` may hold under a request budget: those holding a stream, plus the
        streams it may still open (a lease opens one; the pool compares this to its leases)."""
        return max(0, budget - conn.streams_started + conn.leased_slots)

    def _learn_budget(self, conn: H2Connection) -> None:
        """A graceful GOAWAY refused streams we had opened: the server ends connections after a
        number of requests (nginx ``keepalive_requests``), below its stream limit. The same count
        twice running becomes the budget; streams beyond it would only be refused, then retried,
        and under a burst a retried request can be refused on every connection it lands on."""
        last = conn.goaway_last_stream
        if conn.goaway_code != ErrorCodes.NO_ERROR or last is None:
            return
        if conn.streams_started <= (last + 1) // 2:
            return  # nothing refused: an idle timeout or shutdown, not a budget
        processed = (last + 1) // 2
        seen, self._budget_seen = self._budget_seen, processed
        if processed < 2 or seen != processed or self._budget == processed:
            return  # < 2: a warm-up would leave a new connection no stream
        self._budget = processed
        log.info(
            "%s serves %d requests a connection; streams capped at that", self.origin, processed
        )
        for live in list(self._live):
            if live is not conn and live.is_open:
                self.connection_changed(live)

    def _spend_budget(self, conn: H2Connection) -> None:
        """A stream of ``conn`` was released under a learnt budget: one fewer may open on it. If
        it used the whole budget, all its streams ended and no GOAWAY came, the server takes more
        than learnt (a budget seen during a restart): forget it."""
        budget = self._budget
        if budget is None or conn.draining or not conn.is_open:
            return
        if conn.leased_slots == 0 and conn.streams_started >= budget:
            self._budget = None
            log.info("%s served more than %d requests a connection; uncapped", self.origin, budget)
            for live in list(self._live):
                if live.is_open:
                    self.connection_changed(live)
        elif self._budget_left(conn, budget) < min(
            self.options.max_streams, conn.remote_max_streams
        ):
            self.connection_changed(conn)

    def close_reason(self, conn: H2Connection) -> str | None:
        """``"rejected"`` after a 401/403 drained it, ``"stalled"`` when its liveness PING went
        unanswered, ``"goaway"`` after the server's GOAWAY, ``"protocol_error"`` after the server
        broke HTTP/2; else None (the pool names it)."""
        if id(conn) in self._rejected:
            return "rejected"
        if conn.stalled:
            return "stalled"
        if conn.goaway_code is not None:
            return "goaway"
        if conn.protocol.violated:
            return "protocol_error"
        return None

    def connection_error(self, conn: H2Connection) -> BaseException | None:
        """The 401/403 :class:`ConnectError` (fatal) that drained ``conn``, or the server's error
        that ended it (protocol violation, GOAWAY with an error code, lost socket)."""
        rejected = self._rejected.get(id(conn))
        if rejected is not None:
            return rejected
        return conn.protocol.ended_by()

    def credentials_accepted(self, conn: H2Connection) -> None:
        """A request on ``conn`` was answered with neither 401 nor 403: after a rejection, the
        key works again, and a connection on probation (one stream) gets its full capacity."""
        if id(conn) in self._probation:
            self._probation.discard(id(conn))
            self._last_rejection = None
            self._probation.clear()  # the others too: the key is the adapter's
            for live in list(self._live):
                self.connection_changed(live)

    def credentials_rejected(self, conn: H2Connection, status: int, target: str) -> None:
        """A request on ``conn`` was answered 401/403 (``target``: method and path, no query).

        The credentials are the adapter's, so every connection stops taking streams (in-flight
        ones finish) and reports a fatal :class:`ConnectError` naming the status: the pool opens
        its circuit once, and later acquires fail at once with ``PoolUnavailable``. Calls for a
        connection already drained this way are ignored (no per-request storm). Never raises.
        """
        if id(conn) in self._rejected:
            return
        hint = "check the credentials" if status == 401 else "the credentials lack access"
        err = ConnectError(
            f"{self.origin} answered HTTP {status} to {target}: {hint}", fatal=True, status=status
        )
        log.warning(
            "%s answered HTTP %d to %s; draining its connections", self.origin, status, target
        )
        self._last_rejection = err
        self._probation.discard(id(conn))
        for live in [conn, *(c for c in self._live if c is not conn)]:
            if live.is_open and id(live) not in self._rejected:
                self._rejected[id(live)] = err
                self.connection_changed(live)

    async def release_stream(
        self, conn: H2Connection, stream_id: int, error: BaseException | None
    ) -> bool:
        """RST_STREAM(CANCEL) the lease's stream if it is unfinished (barge-in). Never suspends,
        so it completes even in a cancelled task. False only when the connection is broken.

        A stream that ended in an error puts the connection in doubt until the server is heard
        from again (see :meth:`ping`)."""
        if error is not None:
            conn.last_stream_error = time.monotonic()
        is_open = conn.release_slot(stream_id)
        if self._budget is not None:
            self._spend_budget(conn)
        return is_open

    def describe(self) -> str:
        return f"http2 {self.origin}{self.path_prefix}"

    # -- notifications ----------------------------------------------------------------------------

    def _on_change(self, conn: H2Connection) -> None:
        if conn.goaway_code is not None and id(conn) not in self._goaways:
            self._goaways.add(id(conn))
            self._learn_budget(conn)
        if conn.goaway_code == ErrorCodes.ENHANCE_YOUR_CALM and id(conn) not in self._calmed:
            self._calmed.add(id(conn))
            self.calm_goaways += 1
            observed = conn.ping_gap if conn.ping_gap is not None else conn.last_ping - conn.created
            backoff = self.options.ping_backoff
            self._ping_gap = max(self._ping_gap * backoff, observed * backoff)
            log.warning(
                "%s answered GOAWAY ENHANCE_YOUR_CALM; pings now at least %.2fs apart",
                self.origin,
                self._ping_gap,
            )
        self.connection_changed(conn)

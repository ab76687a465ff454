"""`Http2Adapter`: pooled HTTP/2 connections to one LLM endpoint, each lease one stream.

The pool (``LeaseMode.MULTIPLEXED``) puts a lease on the least-loaded connection with a free stream
slot; this adapter tells it how many slots a connection has now (the smaller of ``max_streams`` and
the server's SETTINGS_MAX_CONCURRENT_STREAMS, 0 while draining after GOAWAY) and notifies it at once
when that changes or the connection dies. Health is an HTTP/2 PING (no billable request).
"""

from __future__ import annotations

import logging
import ssl
import time
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

from h2.errors import ErrorCodes
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from voicepool.adapter import Adapter, LeaseMode
from voicepool.errors import ConnectError

from .._http import check_base_url, header_name  # noqa: TID251, TID252
from .connection import H2Connection  # noqa: TID251
from .stream import ConnectionClosed, H2Error, Origin  # noqa: TID251

__all__ = ["Http2Adapter", "Http2Options"]

log = logging.getLogger("voicepool.adapters.http2")

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
    api_key: SecretStr | None = Field(None, description="Credential sent in `api_key_header`.")
    api_key_header: str = Field(
        "authorization",
        description="`authorization` sends `Bearer <api_key>`; any other name (x-api-key) the key.",
    )
    max_streams: int = Field(100, ge=1, le=2**31 - 1, description="Streams per connection.")
    warmup_path: str | None = Field(
        None, description="Request sent on each new connection, e.g. /v1/models (None: no warm-up)."
    )
    warmup_method: Literal["GET", "HEAD", "OPTIONS"] = "GET"
    ca_file: str | None = Field(None, description="PEM CA bundle to trust instead of the system's.")
    verify: bool = Field(
        True, description="Verify the server certificate (never off in production)."
    )
    server_hostname: str | None = Field(None, description="TLS SNI / certificate name override.")
    stream_window: int = Field(
        1 << 20, ge=65535, le=2**31 - 1, description="Receive window/stream."
    )
    connection_window: int = Field(1 << 24, ge=65535, le=2**31 - 1, description="Receive window.")
    ping_backoff: float = Field(
        2.0, ge=1.0, description="Growth of the minimum ping spacing on GOAWAY ENHANCE_YOUR_CALM."
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

    def _ssl_context(self) -> ssl.SSLContext:
        opts = self.options
        ctx = ssl.create_default_context(cafile=opts.ca_file)
        if not opts.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(["h2"])
        return ctx

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
        try:
            conn = await H2Connection.open(
                self.origin,
                self._ssl,
                on_change=self._on_change,
                stream_window=self.options.stream_window,
                connection_window=self.options.connection_window,
                server_hostname=self.options.server_hostname,
            )
        except ConnectError:
            raise
        except ssl.SSLCertVerificationError as exc:
            raise ConnectError(
                f"TLS certificate of {self.origin} rejected: {exc.verify_message}", fatal=True
            ) from exc
        except (OSError, H2Error) as exc:
            raise ConnectError(f"connect to {self.origin} failed: {exc!r}") from exc
        if self.options.warmup_path is not None:
            try:
                await self._warmup(conn)
            except BaseException:
                await conn.aclose(0)
                raise
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
        last one on this connection is skipped, which lengthens the effective interval.
        Raises ConnectionClosed when the connection is gone.
        """
        if not conn.is_open:
            raise ConnectionClosed(f"connection to {self.origin} is closed")
        if self._ping_gap and time.monotonic() - conn.last_ping < self._ping_gap:
            return
        await conn.ping()

    def is_open(self, conn: H2Connection) -> bool:
        return conn.is_open

    async def close(self, conn: H2Connection) -> None:
        """GOAWAY, then a polite TLS close (bounded); never raises."""
        self._calmed.discard(id(conn))
        await conn.aclose()

    def is_fatal(self, exc: BaseException) -> bool:
        if isinstance(exc, ssl.SSLCertVerificationError):
            return True
        return super().is_fatal(exc)

    def stream_capacity(self, conn: H2Connection) -> int:
        """min(max_streams, the server's SETTINGS_MAX_CONCURRENT_STREAMS); 0 while draining."""
        if conn.draining:
            return 0
        return min(self.options.max_streams, conn.remote_max_streams)

    async def release_stream(
        self, conn: H2Connection, stream_id: int, error: BaseException | None
    ) -> bool:
        """RST_STREAM(CANCEL) the lease's stream if it is unfinished (barge-in). Never suspends,
        so it completes even in a cancelled task. False only when the connection is broken."""
        return conn.release_slot(stream_id)

    def describe(self) -> str:
        return f"http2 {self.origin}{self.path_prefix}"

    # -- notifications ----------------------------------------------------------------------------

    def _on_change(self, conn: H2Connection) -> None:
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

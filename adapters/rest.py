"""`RestAdapter`: a pool of warm HTTP/1.1 keep-alive connections (aiohttp) for tool APIs.

CRM, calendar and tool APIs usually speak HTTP/1.1 only, and aiohttp has no HTTP/2 client: one
request at a time per connection, so leases are EXCLUSIVE. Each pooled :class:`RestConnection` is
an ``aiohttp.ClientSession`` whose connector holds exactly one socket, opened at boot by a warm-up
request and kept warm by the health request, so a call never pays DNS + TCP + TLS::

    pool = Pool(RestAdapter(base_url="https://crm.example/api", api_key=key,
                            health_path="/health"), PoolSettings(concurrency=8), name="crm")
    async with pool, pool.acquire() as lease:
        async with lease.conn.get("/v1/contacts", params={"phone": caller}) as resp:
            contacts = await resp.json()

DNS answers come from the event loop's shared cache (:mod:`voicepool.dns`: TTLs, background
refresh, happy eyeballs); a connection whose address left DNS is retired at its next idle moment.
When the server closes a keep-alive socket, the pool hears of it at once and opens a replacement.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.client_reqrep import ClientRequest
from aiohttp.connector import Connection
from aiohttp.tracing import Trace
from pydantic import BaseModel, ConfigDict, Field, field_validator

from voicepool._redact import describe_error
from voicepool.adapter import Adapter, LeaseMode
from voicepool.dns import AddressTracker, default_resolver
from voicepool.errors import ConnectError
from voicepool.settings import NO_SECRET, OptionalSecret

from ._http import check_base_url, header_name  # noqa: TID251

__all__ = ["RestAdapter", "RestConnection", "RestOptions"]

_RETRYABLE_STATUS = frozenset({408, 425, 429})


class RestOptions(BaseModel):
    """Options of :class:`RestAdapter` (secrets are ``SecretStr``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str = Field(description="http(s)://host[:port][/prefix]; request paths append to it.")
    headers: dict[str, str] = Field(
        default_factory=dict, description="Headers sent with every request (not for secrets)."
    )
    api_key: OptionalSecret = Field(
        default=NO_SECRET, description="Credential sent in `api_key_header`."
    )
    api_key_header: str = Field(
        default="authorization",
        description="`authorization` sends `Bearer <api_key>`; any other name sends the key as is.",
    )
    warmup_path: str | None = Field(
        default="/", description="Request that opens each connection at boot (None: open lazily)."
    )
    warmup_method: Literal["GET", "HEAD", "OPTIONS"] = "HEAD"
    health_path: str | None = Field(
        default=None,
        description="Cheap request used as the health ping (default: the warm-up request).",
    )
    health_method: Literal["GET", "HEAD", "OPTIONS"] = "GET"
    request_timeout: float = Field(
        default=30.0, gt=0, description="Default total timeout per request."
    )
    dns_ttl: float = Field(
        default=300.0,
        ge=0,
        description="Longest a DNS answer is reused (the record's TTL, when shorter, wins).",
    )
    ca_file: str | None = Field(
        default=None, description="PEM CA bundle to trust instead of the system's."
    )
    verify: bool = Field(default=True, description="Verify the server certificate.")

    @field_validator("base_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return check_base_url(value).rstrip("/")

    @field_validator("api_key_header")
    @classmethod
    def _lower(cls, value: str) -> str:
        return header_name(value)


class _SharedResolver(AbstractResolver):
    """aiohttp's resolver interface over the event loop's shared :mod:`voicepool.dns` cache
    (TTLs, background refresh); aiohttp then runs happy eyeballs across the answers."""

    def __init__(self, max_age: float) -> None:
        self._max_age = max_age

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        answers = await default_resolver().resolve(host, max_age=self._max_age)
        return [
            ResolveResult(
                hostname=host,
                host=a.address,
                port=port,
                family=a.family,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for a in answers
            if family in (socket.AF_UNSPEC, a.family)
        ]

    async def close(self) -> None:
        pass  # the shared cache outlives any one session


class _Connector(aiohttp.TCPConnector):
    """A connector that reports the protocol (socket) each request runs on, so the pool can see
    when the server closes it; aiohttp's trace hooks do not expose it for bodiless responses."""

    on_protocol: Any = None

    async def connect(
        self, req: ClientRequest, traces: list[Trace], timeout: aiohttp.ClientTimeout
    ) -> Connection:
        conn = await super().connect(req, traces, timeout)
        if self.on_protocol is not None and conn.protocol is not None:
            self.on_protocol(conn.protocol)
        return conn


class RestConnection:
    """One warm HTTP/1.1 keep-alive connection; an aiohttp-style request API.

    ``conn.request(method, path, **kwargs)`` (and ``get``/``post``/``put``/``patch``/``delete``)
    take aiohttp's ``ClientSession.request`` keyword arguments and return its context manager:
    ``async with conn.get("/v1/x") as resp: await resp.json()``. ``path`` is appended to the
    adapter's ``base_url``. Release each response inside the lease (``async with``); the socket
    is shared by the lease's next holder.
    """

    def __init__(self, adapter: RestAdapter) -> None:
        self._adapter = adapter
        trace = aiohttp.TraceConfig()
        trace.on_connection_create_end.append(self._on_connect)
        connector = _Connector(
            limit=1,
            ssl=adapter.ssl_context if adapter.ssl_context is not None else False,
            resolver=adapter.resolver,
            use_dns_cache=False,  # the shared resolver caches
            happy_eyeballs_delay=0.25,
            interleave=1,
            keepalive_timeout=None,  # the pool decides when an idle socket goes, not aiohttp
        )
        connector.on_protocol = self._on_protocol
        self.session = aiohttp.ClientSession(
            connector=connector,
            headers=adapter.default_headers,
            timeout=aiohttp.ClientTimeout(total=adapter.options.request_timeout),
            trace_configs=[trace],
            raise_for_status=False,
        )
        self._protocol: Any = None  # aiohttp's ResponseHandler of the current socket
        self.handshakes = 0  # sockets this connection opened (1 while the server keeps it)
        self.requests = 0

    @property
    def is_open(self) -> bool:
        """The session is open and its socket (once opened) still connected. No I/O."""
        if self.session.closed or not self._adapter.addresses.is_listed(self):
            return False
        proto = self._protocol
        return proto is None or bool(proto.is_connected())

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """``session.request(method, base_url + path, **kwargs)``: an async context manager."""
        return self.session.request(method, self._adapter.url(path), **kwargs)

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs)

    def put(self, path: str, **kwargs: Any) -> Any:
        return self.request("PUT", path, **kwargs)

    def patch(self, path: str, **kwargs: Any) -> Any:
        return self.request("PATCH", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> Any:
        return self.request("DELETE", path, **kwargs)

    async def json(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send, raise ``aiohttp.ClientResponseError`` on 4xx/5xx, return the JSON body."""
        async with self.request(method, path, **kwargs) as resp:
            resp.raise_for_status()
            return await resp.json()

    async def aclose(self) -> None:
        self._adapter.addresses.discard(self)
        await self.session.close()

    async def _on_connect(self, session: Any, ctx: Any, params: Any) -> None:
        self.handshakes += 1

    def _on_protocol(self, proto: Any) -> None:
        self.requests += 1
        if proto is self._protocol:
            return
        self._protocol = proto
        transport = proto.transport
        if transport is not None:
            peer = transport.get_extra_info("peername")
            self._adapter.addresses.add(self, peer, default_resolver())
        closed = proto.closed
        if closed is not None:
            closed.add_done_callback(lambda fut: self._on_socket_closed(fut, proto))

    def _on_socket_closed(self, fut: asyncio.Future[None], proto: Any) -> None:
        if not fut.cancelled():
            fut.exception()  # mark retrieved; the error itself does not matter here
        if proto is self._protocol and not self.session.closed:
            self._adapter.connection_changed(self)  # the server closed it: replace now

    def __repr__(self) -> str:
        return f"<RestConnection {self._adapter.describe()} open={self.is_open}>"


class RestAdapter(Adapter[RestConnection]):
    """HTTP/1.1 keep-alive connections on aiohttp; EXCLUSIVE leases (see the module docstring).

    Build with options or keywords: ``RestAdapter(base_url="https://...", health_path="/health")``.
    """

    service: ClassVar[str | None] = "rest"
    lease_mode = LeaseMode.EXCLUSIVE
    Options: ClassVar[type[RestOptions]] = RestOptions

    def __init__(self, options: RestOptions | None = None, **kwargs: Any) -> None:
        options = self._build_options(options, kwargs)
        self.options = options
        parts = urlsplit(options.base_url)
        self._origin = f"{parts.scheme}://{parts.netloc}"
        self.ssl_context: ssl.SSLContext | None = None
        if parts.scheme == "https":
            ctx = ssl.create_default_context(cafile=options.ca_file)
            if not options.verify:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            ctx.set_alpn_protocols(["http/1.1"])
            self.ssl_context = ctx
        headers = dict(options.headers)
        if options.api_key is not None:
            key = options.api_key.get_secret_value()
            name = options.api_key_header
            headers[name] = f"Bearer {key}" if name == "authorization" else key
        self.default_headers = headers
        self.resolver = _SharedResolver(options.dns_ttl)
        self.addresses = AddressTracker(self, parts.hostname or "")
        self._host = parts.hostname or ""

    @property
    def dns_lookups(self) -> int:
        """DNS queries made for this adapter's host on the running loop's shared cache."""
        return default_resolver().lookups_by_host.get(self._host, 0)

    def url(self, path: str) -> str:
        """``base_url + path``; absolute URLs are refused so credentials stay on this origin."""
        if "://" in path:
            raise ValueError(f"{path!r}: pass a path; this connection serves {self._origin} only")
        return self.options.base_url + (path if path.startswith("/") else "/" + path)

    async def connect(self) -> RestConnection:
        """Open a session and its socket with the warm-up request.

        Raises ConnectError (``fatal`` for an untrusted certificate or a warm-up answered 401/403).
        Cancellation-safe: a cancelled connect closes the session.
        """
        conn = RestConnection(self)
        try:
            if self.options.warmup_path is not None:
                await self._probe(conn, self.options.warmup_method, self.options.warmup_path)
        except BaseException:
            await asyncio.shield(conn.aclose())
            raise
        return conn

    async def _probe(self, conn: RestConnection, method: str, path: str) -> None:
        try:
            async with conn.request(method, path) as resp:
                await resp.read()
                status = resp.status
        except aiohttp.ClientConnectorCertificateError as exc:
            raise ConnectError(f"TLS certificate of {self._origin} rejected", fatal=True) from exc
        except (aiohttp.ClientError, OSError) as exc:
            # Never the repr: aiohttp's request info in it carries the Authorization header.
            raise ConnectError(
                f"{method} {path} on {self._origin} failed: {describe_error(exc)}"
            ) from exc
        if status in (401, 403):
            raise ConnectError(
                f"{method} {path} on {self._origin} answered HTTP {status}: check the credentials",
                fatal=True,
                status=status,
            )
        if status >= 500 or status in _RETRYABLE_STATUS:
            raise ConnectError(f"{method} {path} on {self._origin} answered HTTP {status}")

    async def ping(self, conn: RestConnection) -> None:
        """The health request (``health_path``, else the warm-up request) on this connection;
        keeps the keep-alive socket warm. Raises ConnectError on 5xx, 401/403 or a broken socket."""
        path = self.options.health_path
        method = self.options.health_method
        if path is None:
            path, method = self.options.warmup_path, self.options.warmup_method
        if path is None:
            if not conn.is_open:
                raise ConnectError(f"connection to {self._origin} is closed")
            return
        await self._probe(conn, method, path)
        if not conn.is_open:
            raise ConnectError(f"{self._origin} closed the connection after the health request")

    def is_open(self, conn: RestConnection) -> bool:
        return conn.is_open

    async def close(self, conn: RestConnection) -> None:
        await conn.aclose()

    def is_fatal(self, exc: BaseException) -> bool:
        if isinstance(exc, aiohttp.ClientConnectorCertificateError | ssl.SSLCertVerificationError):
            return True
        return super().is_fatal(exc)

    def describe(self) -> str:
        return f"rest {self._origin}"

"""Pools of aiohttp WebSockets (``aiohttp.ClientWebSocketResponse``), for LiveKit's plugins.

LiveKit's plugins open their sockets with ``http_session.ws_connect(...)``; this adapter keeps such
sockets warm with the same provider knowledge as the ``websockets`` adapters: ``provider`` names a
registered WebSocket adapter (``websocket``, ``deepgram``, ``elevenlabs``, ``cartesia``) and
``endpoint`` holds that adapter's options, which build the URL, the headers and the TLS context and
give the keepalive of idle sockets, the idle limits and the goodbye. Leases are ``single_use``: the
holder reads the socket, so no reset could prove it clean for another call.

Each socket has its own ``ClientSession`` (one connection, closed with the socket), so nothing
outlives a connection the pool retires. Health: aiohttp hands pongs only to ``receive()``, which
nothing calls on an idle pooled socket, so the socket runs aiohttp's ``heartbeat``: a WebSocket
ping after ``heartbeat`` seconds without incoming data, and the socket is closed when no pong
comes within half of that. The pool's ping sends the provider keepalive and fails once the socket
is closed (or idle past ``recycle_after``). Handshake errors become
:class:`~voicepool.ConnectError`, classified as for the ``websockets`` adapters.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import weakref
from typing import TYPE_CHECKING, Any, ClassVar

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from voicepool.adapter import Adapter, LeaseMode, get_adapter
from voicepool.errors import ConnectError

if TYPE_CHECKING:
    from aiohttp.client_proto import ResponseHandler

# Relative imports: mypy cannot map the repo folder adapters/ to voicepool.adapters, and
# a relative import resolves to the installed package at run time (hence the noqa).
from .websocket import (  # noqa: TID251
    BaseWebSocketAdapter,
    EndpointOptions,
    StreamClosed,
    handshake_status_error,
    safe_endpoint,
)

__all__ = ["AiohttpWebSocketAdapter", "AiohttpWebSocketOptions"]


class AiohttpWebSocketOptions(BaseModel):
    """Options: which provider's knowledge to use, and that provider adapter's options."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: str = Field(
        default="websocket",
        description="Registered WebSocket adapter whose endpoint knowledge to use"
        " (websocket, deepgram, elevenlabs, cartesia).",
    )
    endpoint: EndpointOptions = Field(description="That adapter's options (url, api_key, ...).")
    heartbeat: float = Field(
        default=5.0,
        gt=0,
        description="Ping after this many seconds without incoming data; no pong"
        " within half of it closes the socket.",
    )

    @model_validator(mode="before")
    @classmethod
    def _endpoint_of_provider(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        name = data.get("provider", "websocket")
        try:
            provider = get_adapter(str(name))
        except LookupError as exc:
            raise ValueError(str(exc)) from exc
        model = provider.Options
        if not (issubclass(provider, BaseWebSocketAdapter) and model is not None):
            raise ValueError(f"provider {name!r} is not a WebSocket adapter")
        endpoint = data.get("endpoint", {})
        if isinstance(endpoint, BaseModel) and not isinstance(endpoint, model):
            endpoint = endpoint.model_dump()
        if not isinstance(endpoint, model):
            try:
                endpoint = model.model_validate(endpoint)
            except ValidationError as exc:
                # Paths and reasons only: an input may be a misplaced secret.
                problems = "; ".join(
                    f"{'.'.join(str(p) for p in err['loc']) or 'endpoint'}: {err['msg']}"
                    for err in exc.errors(include_url=False)
                )
                raise ValueError(f"endpoint options of {name!r}: {problems}") from None
        if getattr(endpoint, "raw", False):
            raise ValueError("endpoint.raw: aiohttp sockets are always raw; leave it unset")
        if getattr(endpoint, "reset_boundary", None) is not None:
            raise ValueError(
                "endpoint.reset_boundary: aiohttp sockets are single_use (their holder reads"
                " them, so no reset can prove one clean); leave it unset"
            )
        return {**data, "endpoint": endpoint}


class AiohttpWebSocketAdapter(Adapter[aiohttp.ClientWebSocketResponse]):
    """Lends ``aiohttp.ClientWebSocketResponse`` objects (see the module doc).

    Build with options or keywords:
    ``AiohttpWebSocketAdapter(provider="deepgram", endpoint={"api_key": "..."})``.
    Registered as ``aiohttp_websocket``.
    """

    Options: ClassVar[type[BaseModel] | None] = AiohttpWebSocketOptions
    options: AiohttpWebSocketOptions
    lease_mode: LeaseMode = LeaseMode.SINGLE_USE

    def __init__(self, options: AiohttpWebSocketOptions | None = None, **kwargs: Any) -> None:
        self.options = self._build_options(options, kwargs)
        provider = get_adapter(self.options.provider)
        assert issubclass(provider, BaseWebSocketAdapter)  # checked by the options validator
        self.endpoint: BaseWebSocketAdapter[Any] = provider(self.options.endpoint)
        self.max_idle = self.endpoint.max_idle
        self._sessions: weakref.WeakKeyDictionary[
            aiohttp.ClientWebSocketResponse, aiohttp.ClientSession
        ] = weakref.WeakKeyDictionary()
        self._opened: weakref.WeakKeyDictionary[aiohttp.ClientWebSocketResponse, float] = (
            weakref.WeakKeyDictionary()
        )

    def url(self) -> str:
        return self.endpoint.url()

    async def connect(self) -> aiohttp.ClientWebSocketResponse:
        """Open one socket (own session) under the endpoint's ``open_timeout``.

        Raises ConnectError (fatal for 400/401/403/404 and certificate failures). Cancellation-
        safe: the session of an unfinished open is closed before the cancellation propagates.
        """
        o = self.endpoint.options
        url = self.endpoint.url()
        where = safe_endpoint(url)
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1, force_close=True),
            trust_env=False,  # never pick a proxy up from the environment: connect where told
            headers={"User-Agent": "voicepool"},
        )
        try:
            async with asyncio.timeout(o.open_timeout):
                ws = await session.ws_connect(
                    url,
                    headers=self.endpoint.request_headers(),
                    protocols=tuple(o.subprotocols),
                    ssl=self.endpoint.ssl_context() or False,
                    server_hostname=o.server_hostname,
                    max_msg_size=o.max_message_size or 0,
                    compress=15 if o.compression else 0,
                    heartbeat=self.options.heartbeat,
                    autoping=True,
                    timeout=aiohttp.ClientWSTimeout(ws_close=o.close_timeout),
                )
        except BaseException as exc:
            await asyncio.shield(session.close())
            if isinstance(exc, aiohttp.WSServerHandshakeError):
                retry = exc.headers.get("Retry-After") if exc.headers else None
                raise handshake_status_error(where, exc.status, retry) from exc
            if isinstance(exc, aiohttp.ClientConnectorCertificateError):
                raise ConnectError(
                    f"{where}: TLS certificate verification failed: {exc.certificate_error}",
                    fatal=True,
                ) from exc
            if isinstance(exc, TimeoutError):
                raise ConnectError(f"{where}: opening handshake timed out") from exc
            if isinstance(exc, aiohttp.ClientError | OSError | ssl.SSLError):
                raise ConnectError(f"{where}: {type(exc).__name__}: {exc}") from exc
            raise
        self._sessions[ws] = session
        self._opened[ws] = asyncio.get_running_loop().time()
        return ws

    def _idle_for(self, ws: aiohttp.ClientWebSocketResponse, limit: float | None) -> bool:
        opened = self._opened.get(ws)
        if limit is None or opened is None:
            return False
        return asyncio.get_running_loop().time() - opened >= limit

    async def ping(self, conn: aiohttp.ClientWebSocketResponse) -> None:
        """The provider keepalive; raises StreamClosed once the socket is closed (the heartbeat
        closes a silent one) or idle for ``recycle_after``."""
        where = self.describe()
        if self._idle_for(conn, self.endpoint.recycle_after()):
            raise StreamClosed(f"{where}: idle for too long; recycling before the idle close")
        if conn.closed:
            raise StreamClosed(f"{where}: WebSocket closed (code {conn.close_code})")
        try:
            for message in self.endpoint.idle_keepalives():
                await conn.send_str(message)
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise StreamClosed(f"{where}: WebSocket closed: {type(exc).__name__}") from exc

    def is_open(self, conn: aiohttp.ClientWebSocketResponse) -> bool:
        return not conn.closed and not self._idle_for(conn, self.endpoint.stale_after())

    async def reset(self, conn: aiohttp.ClientWebSocketResponse) -> None:
        """Always raises: the holder read the socket, nothing proves it clean for another."""
        raise RuntimeError(f"{self.describe()}: a raw socket cannot be proven clean; discarding")

    async def close(self, conn: aiohttp.ClientWebSocketResponse) -> None:
        """The provider's goodbye (if open), its own close when it sends one, the closing
        handshake, then the socket's session; bounded by ``close_timeout``. Never raises."""
        session = self._sessions.pop(conn, None)
        # Taken before the close releases the connection (and with it the protocol).
        connection = conn._response.connection
        proto = connection.protocol if connection is not None else None
        try:
            async with asyncio.timeout(self.endpoint.options.close_timeout):
                if not conn.closed:
                    with contextlib.suppress(aiohttp.ClientError, ConnectionError):
                        for message in self.endpoint.goodbyes():
                            await conn.send_str(message)
                    if self.endpoint.waits_for_server_close:
                        # Read to the server's close (final results first); a holder still
                        # reading raises RuntimeError: then a plain close.
                        with contextlib.suppress(RuntimeError):
                            while not conn.closed:
                                msg = await conn.receive()
                                if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                                    break
                with contextlib.suppress(aiohttp.ClientError, ConnectionError):
                    await conn.close()
        except TimeoutError:
            pass
        finally:
            if session is not None:
                await asyncio.shield(session.close())
            if proto is not None:
                await _until_lost(proto, self.endpoint.options.close_timeout)

    def is_fatal(self, exc: BaseException) -> bool:
        return self.endpoint.is_fatal(exc)

    def describe(self) -> str:
        return f"{type(self).__name__} {safe_endpoint(self.endpoint.url())}"

    def __repr__(self) -> str:
        return f"<{self.describe()}>"


async def _until_lost(proto: ResponseHandler, timeout: float) -> None:
    """Wait until the TCP connection under ``proto`` is gone; abort it after ``timeout`` or when
    cancelled. aiohttp returns from a WebSocket's close (and its session's) while a TLS transport
    still exchanges close_notify with the server: a loop closed meanwhile (a test's, a worker's at
    exit) keeps that socket open until a garbage collection finds it (a ResourceWarning)."""
    closed = proto.closed
    if closed is None or closed.done():
        return
    try:
        async with asyncio.timeout(timeout):
            await asyncio.shield(closed)
    except TimeoutError:
        proto.abort()
    except BaseException:  # cancelled: nothing is left open either
        proto.abort()
        raise

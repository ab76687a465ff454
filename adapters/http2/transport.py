"""`PooledTransport`: an ``httpx.AsyncBaseTransport`` whose requests run on pooled HTTP/2 streams.

Each request takes one lease (a stream slot on the least-loaded warm connection) and keeps it until
the response is closed (``response.aclose()``, which httpx and the OpenAI/Anthropic SDKs call when a
stream ends or its ``async with`` exits). So a streaming SSE response holds its stream while it is
read; cancelling the reading task, or closing the response early, resets the stream (RST_STREAM)
and frees the slot at once.

    pool = Pool(Http2Adapter(base_url="https://llm.example", api_key=key), settings, name="llm")
    async with pool:
        client = openai.AsyncOpenAI(
            base_url="https://llm.example/v1", api_key=key,
            http_client=httpx.AsyncClient(transport=PooledTransport(pool)),
        )
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, ClassVar, Literal

import httpx
from h2.errors import ErrorCodes

from voicepool.errors import PoolError, PoolExhausted, VoicepoolError
from voicepool.lease import Lease
from voicepool.pool import Pool

from .adapter import Http2Adapter  # noqa: TID251
from .connection import H2Connection  # noqa: TID251
from .protocol import ConnectionClosed, H2Error, StreamRefused, StreamReset  # noqa: TID251
from .stream import H2Stream  # noqa: TID251

__all__ = ["PooledTransport", "ResponseStreamBase", "TransportCore"]

# Connection-specific headers are forbidden in HTTP/2 (RFC 9113 8.2.2); Host becomes :authority.
_DROP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)


# A credential the server refuses: no retry cures it, the pool must hear it (circuit open).
_AUTH_REJECTED = frozenset({401, 403})


def _error_name(exc: Exception, phase: Literal["read", "write"]) -> str | None:
    """The httpx exception class a pool or HTTP/2 error becomes (None: leave it as is)."""
    if isinstance(exc, PoolExhausted):
        return "PoolTimeout"
    if isinstance(exc, PoolError):
        return "ConnectError"
    if isinstance(exc, TimeoutError) and not isinstance(exc, VoicepoolError):
        return "WriteTimeout" if phase == "write" else "ReadTimeout"
    if isinstance(exc, StreamReset):
        return "RemoteProtocolError"
    if isinstance(exc, ConnectionClosed | OSError):
        return "WriteError" if phase == "write" else "ReadError"
    if isinstance(exc, H2Error):
        return "LocalProtocolError"
    return None


def _translate(
    http: Any, exc: BaseException, request: Any, phase: Literal["read", "write"]
) -> BaseException:
    """Map a pool or HTTP/2 error to the httpx exception SDKs handle (and retry); others as is."""
    if isinstance(exc, http.HTTPError) or not isinstance(exc, Exception):
        return exc  # CancelledError, GeneratorExit, KeyboardInterrupt: untouched
    name = _error_name(exc, phase)
    if name is None:
        return exc
    msg = str(exc) or type(exc).__name__
    if name.endswith("Timeout") and name != "PoolTimeout":
        msg = f"{phase} timed out: {msg}"
    err: BaseException = getattr(http, name)(msg, request=request)
    return err


async def _release(lease: Lease[H2Connection], exc: BaseException | None) -> None:
    """Return the lease; with ``exc`` an unfinished stream is reset. Completes when cancelled:
    the pool's release path and ``release_stream`` never suspend."""
    if exc is None:
        await lease.__aexit__(None, None, None)
    else:
        await lease.__aexit__(type(exc), exc, exc.__traceback__)


class ResponseStreamBase:
    """The body of one response; owns the lease until closed or read to the end.

    Mixed with the ``AsyncByteStream`` of the httpx flavour in use (httpx or httpx2).
    """

    _http: ClassVar[Any]

    def __init__(
        self, lease: Lease[H2Connection], stream: H2Stream, request: Any, read_timeout: float | None
    ) -> None:
        self._lease = lease
        self._stream = stream
        self._request = request
        self._timeout = read_timeout
        self._released = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        stream = self._stream
        timeout = self._timeout
        try:
            while True:
                chunk = stream.read_nowait()  # most SSE chunks are already here: no timer
                if chunk is None:
                    if timeout is None:
                        chunk = await stream.read()
                    else:
                        async with asyncio.timeout(timeout):
                            chunk = await stream.read()
                if not chunk:
                    break
                yield chunk
        except BaseException as exc:
            # Cancelled task (barge-in), abandoned iteration, reset or lost connection: free the
            # stream now (RST_STREAM if unfinished), then report in httpx terms.
            await self._release(exc)
            mapped = _translate(self._http, exc, self._request, "read")
            if mapped is exc:
                raise
            raise mapped from exc
        await self._release(None)

    async def aclose(self) -> None:
        """Release the stream (reset first if the body was not read to the end). Idempotent."""
        await self._release(None)

    async def _release(self, exc: BaseException | None) -> None:
        if self._released:
            return
        self._released = True
        await _release(self._lease, exc)


class _ResponseStream(ResponseStreamBase, httpx.AsyncByteStream):
    _http: ClassVar[Any] = httpx


class TransportCore:
    """The request logic of :class:`PooledTransport`, independent of the httpx flavour.

    Subclasses set ``_http`` (the ``httpx`` or ``httpx2`` module) and ``_stream_cls``.
    """

    _http: ClassVar[Any]
    _stream_cls: ClassVar[type[ResponseStreamBase]]

    def __init__(
        self, pool: Pool[H2Connection], *, max_refused: int = 8, close_pool: bool = False
    ) -> None:
        if not isinstance(pool.adapter, Http2Adapter):
            raise TypeError(f"PooledTransport needs a pool of Http2Adapter, got {pool.adapter!r}")
        self._pool = pool
        self._adapter: Http2Adapter = pool.adapter
        self._max_refused = max(0, max_refused)
        self._close_pool = close_pool
        origin = self._adapter.origin
        self._origin = (origin.scheme, origin.host.lower(), origin.port)

    @property
    def pool(self) -> Pool[H2Connection]:
        return self._pool

    async def _handle(self, request: Any) -> Any:
        http = self._http
        url = request.url
        port = url.port or (443 if url.scheme == "https" else 80)
        if (url.scheme, url.host.lower(), port) != self._origin:
            raise http.UnsupportedProtocol(
                f"this transport serves {self._adapter.origin} only, not {url.scheme}://{url.host}",
                request=request,
            )
        timeouts = request.extensions.get("timeout") or {}
        acquire_timeout = self._pool.settings.acquire_timeout
        pool_timeout = timeouts.get("pool")
        if pool_timeout is not None:
            acquire_timeout = min(acquire_timeout, pool_timeout)
        read_timeout: float | None = timeouts.get("read")
        write_timeout: float | None = timeouts.get("write")
        headers = self._headers(request)
        body: bytes | None = None
        if isinstance(request.stream, http.ByteStream):
            body = request.content  # in memory: can be re-sent after a refused stream
        # A refused stream (REFUSED_STREAM, above a GOAWAY's last-stream-id, or a connection that
        # drained while we took it) was never processed (RFC 9113 8.7, 6.8): it is re-sent on
        # another connection, outside any retry budget (the SDKs' own retries stay theirs), up to
        # ``max_refused`` times so a server that refuses everything still gets an answer.
        refusals = 0
        while True:
            lease = self._pool.acquire(timeout=acquire_timeout)
            try:
                await lease.__aenter__()
            except Exception as exc:
                raise _translate(http, exc, request, "read") from exc
            try:
                stream = await self._send(lease, request, headers, body, write_timeout)
                if read_timeout is None:
                    status, resp_headers = await stream.response()
                else:
                    async with asyncio.timeout(read_timeout):
                        status, resp_headers = await stream.response()
            except StreamRefused as exc:
                await _release(lease, None)
                refusals += 1
                if body is not None and refusals <= self._max_refused:
                    continue
                raise http.ConnectError(
                    f"stream refused {refusals} times: {exc}", request=request
                ) from exc
            except BaseException as exc:
                await _release(lease, exc)
                mapped = _translate(http, exc, request, "read")
                if mapped is exc:
                    raise
                raise mapped from exc
            if status in _AUTH_REJECTED:
                target = f"{request.method} {url.path}"  # no query: it may carry a key
                self._adapter.credentials_rejected(lease.conn, status, target)
            elif self._adapter.on_probation:
                self._adapter.credentials_accepted(lease.conn)
            return http.Response(
                status,
                headers=resp_headers,
                stream=self._stream_cls(lease, stream, request, read_timeout),
                extensions={"http_version": b"HTTP/2", "stream_id": stream.id},
            )

    async def _send(
        self,
        lease: Lease[H2Connection],
        request: Any,
        headers: list[tuple[bytes, bytes]],
        body: bytes | None,
        write_timeout: float | None,
    ) -> H2Stream:
        conn = lease.conn
        assert lease.stream_id is not None
        stream = conn.start_request(lease.stream_id, headers, end=body == b"")
        try:
            if body is not None:
                if body:
                    async with asyncio.timeout(write_timeout):
                        await stream.send(body, end=True)
                return stream
            async for chunk in request.stream:
                if chunk:
                    async with asyncio.timeout(write_timeout):
                        await stream.send(chunk, end=False)
            await stream.send(b"", end=True)
        except StreamReset as exc:
            # RFC 9113 8.1: a server may answer before the whole body arrived, then reset the
            # stream with NO_ERROR; the response stands.
            if exc.error_code == ErrorCodes.NO_ERROR and stream.status is not None:
                return stream
            raise
        except (TimeoutError, ConnectionClosed, OSError) as exc:
            raise _translate(self._http, exc, request, "write") from exc
        return stream

    def _headers(self, request: Any) -> list[tuple[bytes, bytes]]:
        url = request.url
        authority = request.headers.get("host") or self._adapter.origin.authority
        out = [
            (b":method", request.method.encode()),
            (b":scheme", url.scheme.encode()),
            (b":authority", authority.encode()),
            (b":path", url.raw_path),
        ]
        seen: set[bytes] = set()
        for name, value in request.headers.raw:
            key = name.lower()
            if key in _DROP or key == b"host" or (key == b"te" and value.lower() != b"trailers"):
                continue
            seen.add(key)
            out.append((key, value))
        out.extend((k, v) for k, v in self._adapter.default_headers if k not in seen)
        return out

    async def aclose(self) -> None:
        """Close the pool only when built with ``close_pool=True`` (pools are usually shared)."""
        if self._close_pool:
            await self._pool.aclose()


class PooledTransport(TransportCore, httpx.AsyncBaseTransport):
    """httpx transport over a started ``Pool`` of :class:`Http2Adapter` connections.

    * Requests must target the adapter's origin (``base_url``); others raise
      ``httpx.UnsupportedProtocol`` so a credential never goes to a host it was not meant for.
    * The adapter's default headers (``api_key``, ``headers``) are added where the request has none.
    * Acquire waits at most the pool's ``acquire_timeout`` (or httpx's smaller ``pool`` timeout):
      an exhausted pool raises ``httpx.PoolTimeout`` rather than queueing a voice turn for minutes.
    * A stream the server refused without processing it (REFUSED_STREAM, above a GOAWAY's last
      stream id) is re-sent on another connection when the body is in memory, transparently and
      outside any retry budget (RFC 9113 8.7), at most ``max_refused`` times (default 8: a burst
      at a server's request budget, bounded for a server that refuses everything); other
      failures become httpx errors (ReadError, RemoteProtocolError, ...).
    * A 401/403 answer is returned as is and tells the pool (``credentials_rejected``): its
      circuit opens once and later acquires fail at once with ``PoolUnavailable``.
    * ``aclose()`` leaves the pool alone (it is shared) unless ``close_pool=True``.

    Cancellation-safe: a cancelled request or body read resets its stream and frees the lease.
    For SDKs built on ``httpx2`` (anthropic 2.x), use ``PooledTransport2``.
    """

    _http: ClassVar[Any] = httpx
    _stream_cls: ClassVar[type[ResponseStreamBase]] = _ResponseStream

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` on a pooled stream; the response body streams from it.

        Raises httpx errors: PoolTimeout, ConnectError (pool unavailable or closed, stream refused),
        ReadTimeout, WriteTimeout, ReadError, WriteError, RemoteProtocolError, UnsupportedProtocol.
        """
        response: httpx.Response = await self._handle(request)
        return response

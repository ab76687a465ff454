"""A direct Redis connection for the fleet quota's urgent asks (``voicepool.quota``).

An acquire that waits for quota waits for one script call; through redis-py's client that call
also pays its connection-pool checkout, per-command timeout contexts and observability hooks,
which on loopback cost as much as the round trip itself and add to its tail. This connection is
the least a round trip can cost: an :class:`asyncio.Protocol` that writes a command at once (no
task, no lock) and hands each reply, parsed by hiredis's C reader, to the future that waits for
it. Replies arrive in the order the commands were sent (RESP2), so several asks can be in flight
on it and a caller that stops waiting leaves the stream intact.

It does nothing else: no retries, no reconnect, no timeouts (the caller's), no TLS. FleetQuota
opens one in the background and uses it while it is open; everything else, and every ask while
it is not, goes through redis-py.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Mapping
from typing import Any, cast

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, ResponseError

__all__ = ["DirectConnection", "open_direct"]


class DirectConnection(asyncio.Protocol):
    """One Redis connection; :meth:`send` writes a command and returns its reply's future."""

    def __init__(self) -> None:
        self._reader = hiredis.Reader(protocolError=InvalidResponse, replyError=ResponseError)
        self._pending: deque[asyncio.Future[Any]] = deque()
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()

    @property
    def is_open(self) -> bool:
        return self._transport is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio's classes: no isinstance here)
        self._transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        pending = self._pending
        while True:
            try:
                reply = reader.gets()
            except InvalidResponse as err:
                self._abort(err)
                return
            if reply is False:
                return
            if not pending:  # a reply nobody asked for: the stream is not what we think
                self._abort(InvalidResponse("a reply with no command waiting for it"))
                return
            fut = pending.popleft()
            if not fut.done():  # (its caller stopped waiting: the reply is dropped)
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._fail(
            RedisConnectionError(f"connection to Redis lost: {exc or 'closed by the server'}")
        )

    def send(self, *args: bytes | str | int) -> asyncio.Future[Any]:
        """Write one command now; the future gets its reply (an error reply is a
        :class:`redis.exceptions.ResponseError` *result*, not an exception), or
        redis-py's ``ConnectionError`` when the connection ends before it. Raises that
        ConnectionError at once when the connection is closed already."""
        transport = self._transport
        if transport is None:
            raise RedisConnectionError("connection to Redis closed")
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._pending.append(fut)
        transport.write(hiredis.pack_command(args))  # type: ignore[arg-type]  # (stub: a 1-tuple)
        return fut

    def close(self) -> None:
        """Close now; replies still due fail with ConnectionError. Idempotent."""
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()
        self._fail(RedisConnectionError("connection to Redis closed"))

    def _abort(self, err: BaseException) -> None:
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.abort()
        self._fail(err)

    def _fail(self, err: BaseException) -> None:
        pending = self._pending
        while pending:
            fut = pending.popleft()
            if not fut.done():
                fut.set_exception(err)


async def open_direct(kwargs: Mapping[str, Any]) -> DirectConnection:
    """Connect with redis-py's connection settings ``kwargs`` (``host``/``port`` or ``path``,
    ``username``, ``password``, ``db``) and authenticate. Raises OSError (refused,
    unreachable), redis-py's ResponseError (AUTH or SELECT refused) or ConnectionError; the
    caller bounds the time. Cancellation-safe: a cancelled open closes what it opened."""
    loop = asyncio.get_running_loop()
    if kwargs.get("path"):
        transport, conn = await loop.create_unix_connection(DirectConnection, kwargs["path"])
    else:
        transport, conn = await loop.create_connection(
            DirectConnection, kwargs.get("host", "localhost"), int(kwargs.get("port", 6379))
        )
    if not conn.is_open:  # (closed already, or connection_made failed: never leak the socket)
        transport.close()
        raise RedisConnectionError("connection to Redis closed at once")
    try:
        hello: list[asyncio.Future[Any]] = []
        password, username = kwargs.get("password"), kwargs.get("username")
        if password is not None:
            auth = ("AUTH", username, password) if username else ("AUTH", password)
            hello.append(conn.send(*auth))
        if int(kwargs.get("db") or 0):
            hello.append(conn.send("SELECT", int(kwargs["db"])))
        for fut in hello:
            reply = await fut
            if isinstance(reply, ResponseError):
                raise reply
    except BaseException:
        conn.close()
        raise
    return conn

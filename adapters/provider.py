"""What the provider adapters (Deepgram, ElevenLabs, Cartesia) share, and their raw mode.

A provider adapter knows its sockets: the URL it builds from typed options, the keepalive text
that stops the provider's idle close, the idle limits, and the goodbye that closes a socket
politely. :class:`ProviderAdapter` holds that knowledge, with the provider's wire format in a pure
:class:`SocketDialect` (no I/O), and lends managed connections (a reader task per socket, typed
events) built by each provider module.

Raw mode (``raw = true`` in a pool's options) is for frameworks and SDKs that drive the protocol
themselves (Pipecat, deepgram-sdk): :class:`RawWebSocketAdapter` lends the plain ``websockets``
connection, with no voicepool reader, while the pool keeps the provider's knowledge: it opens the
provider's URL, sends the keepalive to idle sockets, recycles them before the idle close, and says
goodbye before closing one. Raw leases are ``single_use``: nothing that does not read the socket
can prove the next holder would not receive the previous holder's data.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import weakref
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from pydantic import BaseModel, Field
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from voicepool.adapter import Adapter, LeaseMode

# Relative imports: mypy cannot map the repo folder adapters/ to voicepool.adapters, and
# a relative import resolves to the installed package at run time (hence the noqa).
from .websocket import (  # noqa: TID251
    BaseWebSocketAdapter,
    EndpointOptions,
    StreamClosed,
    _await_pong,
    _closed_error,
    close_politely,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

__all__ = ["ProviderAdapter", "ProviderOptions", "RawWebSocketAdapter", "SocketDialect"]

C = TypeVar("C")


class SocketDialect(Protocol):
    """The part of a provider's wire format the pool needs to keep a socket it does not read."""

    provider: str

    def keepalive_messages(self, open_contexts: list[str]) -> list[dict[str, Any]]:
        """What keeps the socket from the idle close (``open_contexts``: [] on an idle socket)."""
        ...

    def goodbye_messages(self) -> list[dict[str, Any]]:
        """What to send before the closing handshake (CloseStream, close_socket)."""
        ...


class ProviderOptions(EndpointOptions):
    """Options every provider adapter has, on top of the endpoint's."""

    keepalive: bool = Field(
        default=True, description="Send keepalives (off only to test the idle close)."
    )
    raw: bool = Field(
        default=False,
        description=(
            "Lend the plain `websockets` connection, with no voicepool reader, for frameworks"
            " that drive the protocol; leases are then single_use."
        ),
    )


def encode(messages: list[dict[str, Any]]) -> list[str]:
    """JSON text frames for dialect messages."""
    return [json.dumps(m, separators=(",", ":")) for m in messages]


class ProviderAdapter(BaseWebSocketAdapter[C], Generic[C]):
    """Base of the provider adapters: the provider's knowledge of its sockets.

    Subclasses set ``dialect`` in their constructor and may override ``recycle_after`` and
    ``stale_after`` (a provider without a keepalive message: Cartesia). Built from settings
    with ``raw = true``, :meth:`from_options` returns a :class:`RawWebSocketAdapter` over it.
    """

    options: ProviderOptions
    dialect: SocketDialect

    def __init__(self, options: Any = None, **kwargs: Any) -> None:
        super().__init__(options, **kwargs)
        if self.options.raw:
            name = type(self).__name__
            raise TypeError(
                f"{name}(raw=True) lends plain sockets: build it with {name}.from_options(...)"
                f" or RawWebSocketAdapter({name}(...))"
            )

    @classmethod
    def from_options(cls, options: BaseModel | None) -> Adapter[Any]:
        """The managed adapter, or with ``raw`` set, a :class:`RawWebSocketAdapter` over it."""
        if isinstance(options, ProviderOptions) and options.raw:
            return RawWebSocketAdapter(cls(options.model_copy(update={"raw": False})))
        return super().from_options(options)

    def idle_keepalives(self) -> list[str]:
        """Text frames that keep an idle socket (no context open) from the idle close."""
        return encode(self.dialect.keepalive_messages([])) if self.options.keepalive else []

    def goodbyes(self) -> list[str]:
        """Text frames sent before the closing handshake."""
        return encode(self.dialect.goodbye_messages())


class RawWebSocketAdapter(Adapter[ClientConnection]):
    """Lends the plain ``websockets`` connection of a provider adapter's endpoint (any
    :class:`~voicepool.adapters.websocket.BaseWebSocketAdapter` gives that knowledge).

    ``lease.conn`` is a :class:`websockets.asyncio.client.ClientConnection`: read and write it as
    the provider's protocol says; nothing else reads it. ``ping`` (idle sockets only) sends the
    provider's keepalive, then a WebSocket ping, and fails on purpose once the socket has been
    idle for the provider's ``recycle_after``; ``close`` sends the provider's goodbye. ``connect``
    raises :class:`~voicepool.ConnectError` as the provider adapter does.
    """

    lease_mode: LeaseMode = LeaseMode.SINGLE_USE

    def __init__(self, provider: BaseWebSocketAdapter[Any]) -> None:
        self.provider = provider
        self.max_idle = provider.max_idle
        self._opened: weakref.WeakKeyDictionary[ClientConnection, float] = (
            weakref.WeakKeyDictionary()
        )

    async def connect(self) -> ClientConnection:
        ws = await self.provider.open_socket()
        self._opened[ws] = asyncio.get_running_loop().time()
        # Tell the pool the moment the socket goes away, instead of at the next health tick.
        ws.connection_lost_waiter.add_done_callback(lambda _f: self.connection_changed(ws))
        return ws

    def _idle_for(self, ws: ClientConnection, limit: float | None) -> bool:
        opened = self._opened.get(ws)
        if limit is None or opened is None:
            return False
        return asyncio.get_running_loop().time() - opened >= limit

    async def ping(self, conn: ClientConnection) -> None:
        """Provider keepalive, then a WebSocket ping; wait for the pong. Raises StreamClosed when
        closed, or once idle for ``recycle_after`` (the pool then replaces the socket)."""
        where = self.describe()
        if self._idle_for(conn, self.provider.recycle_after()):
            raise StreamClosed(f"{where}: idle for too long; recycling before the idle close")
        try:
            for message in self.provider.idle_keepalives():
                await conn.send(message)
        except ConnectionClosed as exc:
            raise _closed_error(exc, where) from exc
        await _await_pong(conn, where)

    def is_open(self, conn: ClientConnection) -> bool:
        return conn.state is State.OPEN and not self._idle_for(conn, self.provider.stale_after())

    async def reset(self, conn: ClientConnection) -> None:
        """Always raises: a socket nothing reads cannot be proven clean (an ``exclusive``
        override in settings therefore discards every raw socket after its lease)."""
        raise RuntimeError(f"{self.describe()}: a raw socket cannot be proven clean; discarding")

    async def close(self, conn: ClientConnection) -> None:
        """The provider's goodbye (if the socket is open), its own close when it sends one
        (Deepgram: final results, then close), then the closing handshake; bounded by the
        endpoint's ``close_timeout``. Never raises on a dead peer."""
        until_closed: Callable[[], Awaitable[None]] | None = None
        if self.provider.waits_for_server_close:

            async def until_closed() -> None:
                # Read what the server still sends, so its close frame is seen (nothing else
                # reads this socket any more; a holder still reading makes this a plain close).
                with contextlib.suppress(
                    ConnectionClosed, RuntimeError
                ):  # RuntimeError: concurrent recv
                    while True:
                        await conn.recv()

        await close_politely(
            conn,
            self.provider.goodbyes(),
            timeout=self.provider.options.close_timeout,
            until_closed=until_closed,
        )

    def is_fatal(self, exc: BaseException) -> bool:
        return self.provider.is_fatal(exc)

    def describe(self) -> str:
        return f"{self.provider.describe()} (raw)"

    def __repr__(self) -> str:
        return f"<{self.describe()}>"

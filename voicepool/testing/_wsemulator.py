"""What the WebSocket emulators share: a real ``websockets`` server on 127.0.0.1, TLS from trustme,
handshake checks (path, API key, concurrency -> 404/401/429), a per-socket idle close, counters and
fault hooks. Provider behaviour lives in :mod:`voicepool.testing.asr` and :mod:`~.tts`.

Accounts: ``api_key`` and ``extra_keys`` are the accepted keys, each its own provider account;
``max_concurrency`` is an account limit, counted per key across every connection the emulator
serves (so several worker processes sharing a key see what one real account would do).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from http import HTTPStatus
from types import EllipsisType
from typing import Any, ClassVar, Self
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from voicepool.testing._service import LocalService
from voicepool.testing.tls import test_certificates

__all__ = ["EmulatorSession", "WebSocketEmulator"]

log = logging.getLogger("voicepool.testing")


class EmulatorSession:
    """One accepted WebSocket of an emulator. Tests use it to inject faults into that socket."""

    def __init__(self, emulator: WebSocketEmulator, ws: ServerConnection, ident: int) -> None:
        self.emulator = emulator
        self.ws = ws
        self.id = ident
        request = ws.request
        assert request is not None
        parts = urlsplit(request.path)
        self.path = parts.path
        self.query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self.headers: Headers = request.headers
        self.account: str | None = emulator.account_of(request.headers, self.query)
        self.loop = asyncio.get_running_loop()
        self.last_activity = self.loop.time()
        self.idle_timeout = emulator.idle_timeout
        self.messages = 0
        self.state: Any = None  # the provider emulator's per-socket state
        self._idle: asyncio.TimerHandle | None = None
        self._closing = False

    def touch(self) -> None:
        """Count client activity: the idle close is measured from the last call."""
        self.last_activity = self.loop.time()

    async def send_raw(self, data: str | bytes) -> None:
        """Send any frame as is (e.g. a malformed message)."""
        await self.ws.send(data)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close this socket with a close frame."""
        self._closing = True
        with contextlib.suppress(ConnectionClosed):
            await self.ws.close(code, reason)

    def close_soon(self, code: int, reason: str) -> None:
        """Close from synchronous code (timers)."""
        if not self._closing:
            self._closing = True
            self.emulator.spawn(self.close(code, reason))

    def abort(self) -> None:
        """Drop the TCP connection without a close frame."""
        self._closing = True
        self.ws.transport.abort()

    # -- idle close -------------------------------------------------------------------------------

    def arm_idle(self) -> None:
        if self.idle_timeout is None or self._closing:
            return
        self._idle = self.loop.call_at(self.last_activity + self.idle_timeout, self._idle_due)

    def _idle_due(self) -> None:
        self._idle = None
        timeout = self.idle_timeout
        if timeout is None or self._closing:
            return
        if self.loop.time() - self.last_activity >= timeout - 0.001:
            em = self.emulator
            em.idle_closes += 1
            self.close_soon(em.idle_close_code, em.idle_close_reason)
        else:
            self.arm_idle()

    def stop(self) -> None:
        self._closing = True
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None


class WebSocketEmulator(LocalService):
    """Base of the provider emulators: ``async with Emulator(...) as server: server.url``.

    ``tls``: serve wss:// with the trustme certificate (clients trust ``server.ca_file``).
    ``api_key``: the only key accepted (``None``: no auth). ``idle_timeout``: seconds without
    client activity before the provider's idle close. ``max_concurrency``: open sockets above it
    get HTTP 429 at the handshake (subclasses may count something else).

    Counters: ``accepted``, ``rejected`` (Counter by HTTP status), ``active``, ``idle_closes``,
    ``close_codes`` (Counter of codes the sockets ended with), ``malformed_inputs``.
    """

    name: ClassVar[str] = "emulator"
    auth_header: ClassVar[str] = "Authorization"
    auth_scheme: ClassVar[str] = ""
    default_idle_timeout: ClassVar[float | None] = None
    idle_close_code: ClassVar[int] = 1000
    idle_close_reason: ClassVar[str] = "idle"

    def __init__(
        self,
        *,
        tls: bool = False,
        api_key: str | None = "test-key",
        extra_keys: tuple[str, ...] = (),
        idle_timeout: float | EllipsisType | None = ...,
        max_concurrency: int | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("emulators listen on loopback only")
        self.tls = tls
        self.api_key = api_key
        self.api_keys = frozenset(k for k in (api_key, *extra_keys) if k is not None)
        # `...` (the default) means the provider's own idle close; None turns it off.
        self.idle_timeout: float | None = (
            self.default_idle_timeout if isinstance(idle_timeout, EllipsisType) else idle_timeout
        )
        self.max_concurrency = max_concurrency
        self.host = host
        self._port = port
        self._server: Server | None = None
        self._pending: dict[ServerConnection, str | None] = {}  # handshakes passed: account
        self._forced: list[int] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self.sessions: dict[int, EmulatorSession] = {}
        self.accepted = 0
        self.rejected: Counter[int] = Counter()
        self.idle_closes = 0
        self.close_codes: Counter[int | None] = Counter()
        self.malformed_inputs = 0
        self._session_changed = asyncio.Event()

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> Self:
        """Listen on ``host`` (port 0: any free port). Raises OSError if the port is taken."""
        self._session_changed = asyncio.Event()
        self._server = await serve(
            self._handler,
            self.host,
            self._port,
            ssl=test_certificates().server_context(["http/1.1"]) if self.tls else None,
            process_request=self._process_request,
            ping_interval=None,  # providers do not ping clients; client pings are answered
            compression=None,
            max_size=2**22,
            logger=log,
            server_header=self.name,
        )
        self._port = self._server.sockets[0].getsockname()[1]
        return self

    async def aclose(self) -> None:
        """Close every socket (1001 going away) and stop listening. Idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        for session in list(self.sessions.values()):
            session.stop()
        server.close()
        await server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        """Base URL (scheme, host, port); the adapters add the provider's path."""
        return f"{'wss' if self.tls else 'ws'}://{self.host}:{self._port}"

    @property
    def ca_file(self) -> str:
        """PEM file of the CA that signed the server certificate."""
        return str(test_certificates().ca_path)

    @property
    def active(self) -> int:
        """Sockets open now."""
        return len(self.sessions)

    # -- faults and waits -------------------------------------------------------------------------

    def reject_next(self, status: int, count: int = 1) -> None:
        """Answer the next ``count`` handshakes with HTTP ``status`` (e.g. 503, 429)."""
        self._forced.extend([status] * count)

    async def close_all(self, code: int = 1011, reason: str = "server restart") -> None:
        """Close every open socket with ``code``."""
        await asyncio.gather(*(s.close(code, reason) for s in list(self.sessions.values())))

    async def wait_sessions(self, count: int, timeout: float = 5.0) -> None:
        """Wait until exactly ``count`` sockets are open. Raises TimeoutError."""
        async with asyncio.timeout(timeout):
            while len(self.sessions) != count:
                self._session_changed.clear()
                await self._session_changed.wait()

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- subclass hooks ---------------------------------------------------------------------------

    def route(self, path: str, query: dict[str, str], headers: Headers) -> int | None:
        """Check the request target; return an HTTP status to refuse it (404, 400), or None."""
        return None

    def concurrency_used(self, account: str | None) -> int:
        """What ``max_concurrency`` limits at the handshake for ``account`` (default: its open
        sockets, and handshakes under way)."""
        open_ = sum(1 for s in self.sessions.values() if s.account == account)
        return open_ + sum(1 for a in self._pending.values() if a == account)

    def handshake_limit(self) -> int | None:
        return self.max_concurrency

    async def serve_session(self, session: EmulatorSession) -> None:
        """Run one accepted socket until it closes."""
        raise NotImplementedError

    def end_session(self, session: EmulatorSession) -> None:
        """A socket ended (any way): release what it held."""

    # -- handshake and handler --------------------------------------------------------------------

    def offered_keys(self, headers: Headers, query: dict[str, str]) -> list[str]:
        """The keys a handshake offers, where the provider takes them (subclasses override)."""
        value = headers.get(self.auth_header)
        if value is None:
            return []
        if self.auth_scheme:
            scheme, _, key = value.partition(" ")
            return [key] if scheme == self.auth_scheme else []
        return [value]

    def account_of(self, headers: Headers, query: dict[str, str]) -> str | None:
        """The accepted key a handshake offers (its account), else None; with no ``api_key``
        every request is the one anonymous account (None)."""
        return next((k for k in self.offered_keys(headers, query) if k in self.api_keys), None)

    def _check_key(self, headers: Headers, query: dict[str, str]) -> bool:
        return self.api_key is None or self.account_of(headers, query) is not None

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        parts = urlsplit(request.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        if self._forced:
            return self._reject(connection, self._forced.pop(0), "injected failure")
        status = self.route(parts.path, query, request.headers)
        if status is not None:
            return self._reject(connection, status, "bad request target")
        if not self._check_key(request.headers, query):
            return self._reject(connection, 401, "invalid credentials")
        # Handshakes that failed after passing here never reach the handler: forget them.
        self._pending = {c: a for c, a in self._pending.items() if c.state is not State.CLOSED}
        limit = self.handshake_limit()
        account = self.account_of(request.headers, query)
        if limit is not None and self.concurrency_used(account) >= limit:
            return self._reject(connection, 429, f"too many concurrent requests (limit {limit})")
        self._pending[connection] = account
        return None

    def _reject(self, connection: ServerConnection, status: int, text: str) -> Response:
        self.rejected[status] += 1
        return connection.respond(HTTPStatus(status), text + "\n")

    async def _handler(self, ws: ServerConnection) -> None:
        self._pending.pop(ws, None)
        self.accepted += 1
        session = EmulatorSession(self, ws, self.accepted)
        self.sessions[session.id] = session
        self._session_changed.set()
        session.arm_idle()
        try:
            await self.serve_session(session)
        except ConnectionClosed:
            pass
        finally:
            session.stop()
            self.sessions.pop(session.id, None)
            self._session_changed.set()
            self.end_session(session)
            with contextlib.suppress(ConnectionClosed):
                await ws.close()
            self.close_codes[ws.close_code] += 1

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url} active={self.active} accepted={self.accepted}>"

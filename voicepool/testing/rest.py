"""A small HTTP/1.1 keep-alive server, and `RestEmulator`: a CRM / calendar / tool JSON API on it.

The server is deliberately minimal and honest about connections: it counts every TCP connection it
accepts, keeps connections alive between requests (HTTP/1.1 keep-alive), closes idle ones after
``keepalive_timeout`` like a real load balancer, and closes them on command (:meth:`close_idle`), so
tests can see whether a client reuses connections and how it copes with the server closing them.

    async with RestEmulator(keepalive_timeout=5) as crm:
        crm.url               # http://127.0.0.1:<port>
        crm.connections_accepted, crm.requests["/v1/contacts"]
        crm.close_idle()      # FIN every keep-alive connection that is between requests

:class:`Http1Connection` also serves the HTTP/1.1 side of :class:`voicepool.testing.llm.LlmEmulator`
(nginx speaks HTTP/1.1 to its upstreams). Listens on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from voicepool.testing._service import LocalService

__all__ = ["Http1Connection", "HttpRequest", "HttpResponse", "RestEmulator"]

_REASONS = {
    200: "OK",
    201: "Created",
    204: "No Content",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    411: "Length Required",
    500: "Internal Server Error",
}
_MAX_HEAD = 64 * 1024


@dataclass
class HttpRequest:
    """One parsed request (HTTP/1.1 or HTTP/2). ``headers`` names are lower case."""

    method: str
    target: str
    headers: dict[str, str]
    body: bytes = b""

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.target).query)

    def json(self) -> Any:
        """The body parsed as JSON (``{}`` when empty). Raises ValueError on bad JSON."""
        return json.loads(self.body) if self.body else {}


@dataclass
class HttpResponse:
    """A response; ``body`` is bytes (Content-Length) or an async iterator (streamed, chunked)."""

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | AsyncIterator[bytes] = b""

    @classmethod
    def json(
        cls, status: int, obj: Any, headers: list[tuple[str, str]] | None = None
    ) -> HttpResponse:
        data = json.dumps(obj, separators=(",", ":")).encode()
        return cls(status, [("content-type", "application/json"), *(headers or [])], data)


Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]


async def _finish(tasks: set[asyncio.Task[None]], timeout: float = 2.0) -> None:
    """Wait for connection tasks whose sockets were aborted; cancel any that linger."""
    if tasks:
        _, pending = await asyncio.wait(list(tasks), timeout=timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


class Http1Connection:
    """Serves HTTP/1.1 requests on one accepted connection until either side closes it.

    ``idle`` is true between requests. ``on_change`` is called when a request starts or ends.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        handler: Handler,
        *,
        keepalive_timeout: float | None = None,
        first_line: bytes = b"",
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.handler = handler
        self.keepalive_timeout = keepalive_timeout
        self.first_line = first_line
        self.on_change = on_change
        self.idle = True
        self.requests = 0
        self.in_flight = 0

    def close(self) -> None:
        """Close now (FIN; TLS close_notify)."""
        self.writer.close()

    async def run(self) -> None:
        """Serve until the peer closes, the keep-alive timeout passes, or :meth:`close`."""
        try:
            while True:
                self.idle = True
                async with asyncio.timeout(self.keepalive_timeout if not self.first_line else None):
                    line = self.first_line or await self.reader.readuntil(b"\r\n")
                self.first_line = b""
                self.idle = False
                keep = await self._one(line)
                if not keep:
                    break
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            self.idle = False
            self.writer.close()
            with contextlib.suppress(OSError, TimeoutError, asyncio.CancelledError):
                async with asyncio.timeout(1.0):
                    await self.writer.wait_closed()
            self.writer.transport.abort()

    async def _one(self, line: bytes) -> bool:
        try:
            method, target, version = line.decode("latin-1").strip().split(" ", 2)
        except ValueError:
            await self._write_simple(400, b"bad request line")
            return False
        headers: dict[str, str] = {}
        size = 0
        while True:
            raw = await self.reader.readuntil(b"\r\n")
            size += len(raw)
            if raw == b"\r\n" or size > _MAX_HEAD:
                break
            name, _, value = raw.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = await self._read_chunked()
        else:
            body = await self.reader.readexactly(int(headers.get("content-length", "0") or 0))
        keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        self.in_flight += 1
        self.requests += 1
        self.on_change()
        try:
            try:
                response = await self.handler(HttpRequest(method, target, headers, body))
            except Exception as exc:  # an emulator bug must still answer
                response = HttpResponse(500, [("content-type", "text/plain")], repr(exc).encode())
            await self._write(response, head_only=method == "HEAD", keep=keep)
        finally:
            self.in_flight -= 1
            self.on_change()
        return keep

    async def _read_chunked(self) -> bytes:
        parts: list[bytes] = []
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while await self.reader.readuntil(b"\r\n") != b"\r\n":
                    pass  # trailers
                return b"".join(parts)
            parts.append(await self.reader.readexactly(size))
            await self.reader.readexactly(2)

    async def _write_simple(self, status: int, text: bytes) -> None:
        await self._write(HttpResponse(status, [("content-type", "text/plain")], text), keep=False)

    async def _write(self, response: HttpResponse, *, head_only: bool = False, keep: bool) -> None:
        status = response.status
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}"]
        lines += [f"{k}: {v}" for k, v in response.headers]
        streamed = not isinstance(response.body, bytes)
        if streamed:
            lines.append("transfer-encoding: chunked")
        else:
            assert isinstance(response.body, bytes)
            lines.append(f"content-length: {len(response.body)}")
        lines.append("connection: keep-alive" if keep else "connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        w = self.writer
        if isinstance(response.body, bytes):
            w.write(head if head_only else head + response.body)
            await w.drain()
            return
        w.write(head)
        body = response.body
        try:
            async for chunk in body:
                if chunk and not head_only:
                    w.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    await w.drain()
            w.write(b"0\r\n\r\n")
            await w.drain()
        finally:
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                await aclose()


class RestEmulator(LocalService):
    """A CRM / calendar / tool JSON API over HTTP/1.1 keep-alive on 127.0.0.1.

    Endpoints: ``GET /health``; ``GET /v1/contacts[?phone=]``, ``GET /v1/contacts/{id}``,
    ``POST /v1/contacts``; ``GET /v1/calendar/slots``, ``POST /v1/calendar/bookings``;
    ``POST /v1/tools/{name}`` (echoes the arguments). With ``api_key`` every ``/v1`` request needs
    ``Authorization: Bearer <key>`` (else 401). ``latency`` delays every answer.
    ``ssl_context`` serves HTTPS (e.g. ALPN ``http/1.1`` only, to play an HTTP/1.1-only server).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        latency: float = 0.0,
        keepalive_timeout: float | None = 75.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.api_key = api_key
        self.latency = latency
        self.keepalive_timeout = keepalive_timeout
        self.ssl_context = ssl_context
        self.connections_accepted = 0
        self.requests: Counter[str] = Counter()
        self._conns: set[Http1Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._contacts: dict[str, dict[str, Any]] = {
            "c1": {"id": "c1", "name": "Ada Lovelace", "phone": "+15550001"},
            "c2": {"id": "c2", "name": "Alan Turing", "phone": "+15550002"},
        }
        self._bookings: list[dict[str, Any]] = []

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://{self.host}:{self.port}"

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    async def start(self) -> RestEmulator:
        self._server = await asyncio.start_server(
            self._accept, self.host, self.port, ssl=self.ssl_context
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def aclose(self) -> None:
        """Stop listening and close every connection."""
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn.writer.transport.abort()
        await _finish(self._tasks)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def close_idle(self) -> int:
        """Close every keep-alive connection that is between requests; returns how many."""
        idle = [c for c in self._conns if c.idle]
        for conn in idle:
            conn.close()
        return len(idle)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections_accepted += 1
        conn = Http1Connection(
            reader, writer, self._handle, keepalive_timeout=self.keepalive_timeout
        )
        self._conns.add(conn)
        try:
            await conn.run()
        except asyncio.CancelledError:
            pass  # aclose(): end quietly (asyncio would log a cancelled handler as unhandled)
        finally:
            self._conns.discard(conn)
            self._tasks.discard(task)

    async def _handle(self, req: HttpRequest) -> HttpResponse:
        path = req.path
        self.requests[path] += 1
        if self.latency:
            await asyncio.sleep(self.latency)
        if path == "/health":
            return HttpResponse.json(200, {"status": "ok", "time": time.time()})
        if self.api_key and req.headers.get("authorization") != f"Bearer {self.api_key}":
            return HttpResponse.json(401, {"error": "invalid api key"})
        parts = path.strip("/").split("/")
        if parts[:2] == ["v1", "contacts"]:
            return self._contacts_api(req, parts[2:])
        if path == "/v1/calendar/slots" and req.method == "GET":
            slots = [{"start": f"2030-01-0{d}T10:00:00Z", "minutes": 30} for d in range(1, 4)]
            return HttpResponse.json(200, {"slots": slots})
        if path == "/v1/calendar/bookings" and req.method == "POST":
            booking = {"id": f"b{len(self._bookings) + 1}", **req.json()}
            self._bookings.append(booking)
            return HttpResponse.json(201, booking)
        if len(parts) == 3 and parts[:2] == ["v1", "tools"] and req.method == "POST":
            return HttpResponse.json(200, {"tool": parts[2], "arguments": req.json(), "ok": True})
        return HttpResponse.json(404, {"error": f"no route {req.method} {path}"})

    def _contacts_api(self, req: HttpRequest, rest: list[str]) -> HttpResponse:
        if not rest and req.method == "GET":
            phone = req.query.get("phone", [None])[0]
            found = [c for c in self._contacts.values() if phone in (None, c["phone"])]
            return HttpResponse.json(200, {"contacts": found})
        if not rest and req.method == "POST":
            contact = {"id": f"c{len(self._contacts) + 1}", **req.json()}
            self._contacts[contact["id"]] = contact
            return HttpResponse.json(201, contact)
        if len(rest) == 1 and req.method == "GET":
            known = self._contacts.get(rest[0])
            if known is None:
                return HttpResponse.json(404, {"error": "no such contact"})
            return HttpResponse.json(200, known)
        return HttpResponse.json(405, {"error": "method not allowed"})

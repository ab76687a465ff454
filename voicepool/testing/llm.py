"""`LlmEmulator`: an OpenAI-compatible LLM server over TLS + HTTP/2 (its own ``h2`` server).

    async with LlmEmulator(ttft=0.05, tokens=20, tokens_per_second=50) as llm:
        llm.base_url            # https://127.0.0.1:<port>/v1 (trust test_certificates().ca_path)
        llm.connections_accepted, llm.open_streams, llm.resets_received, llm.pings_received
        llm.peak_open_streams
        llm.goaway()            # GOAWAY to every connection: in-flight streams finish, then close
        llm.set_max_concurrent_streams(10)
        await llm.wait_for(lambda: llm.open_streams == 0)

Routes: ``GET /v1/models`` (free warm-up), ``POST /v1/chat/completions`` (``stream: true`` answers
SSE ``chat.completion.chunk`` events, ``stream_options.include_usage`` adds a usage chunk, then
``data: [DONE]``), ``POST /v1/responses`` (OpenAI's Responses API, streamed or not),
``POST /v1/messages`` (Anthropic Messages SSE, with ``ping`` events),
``POST /v1/messages/count_tokens``, ``POST /v1/echo`` (returns the body: flow-control tests),
``POST /v1/too-large`` (413 before the body, then RST_STREAM NO_ERROR). Requests that offer
``tools`` get a tool call first, then text after the tool result. The bodies are built in
:mod:`voicepool.testing._llm_api` (the shapes the official SDKs parse; docs/providers.md).
Per request, headers ``x-emulator-ttft`` and ``x-emulator-tokens`` override the timing;
``x-emulator-head-delay`` holds the response head that many seconds. With ``api_key``, ``/v1``
needs ``Authorization: Bearer`` or ``x-api-key`` (else the provider's 401 body). Every ``/v1``
answer carries the provider's request id and rate-limit headers (``rate_limit`` per minute); a
request whose input exceeds ``context_window`` (estimated tokens) gets the provider's 400.

Faults: :meth:`fail_next` (429 / 5xx with ``retry-after``), :meth:`goaway` (any error code,
graceful), :meth:`refuse_connections`,
:meth:`refuse_streams` (RST_STREAM REFUSED_STREAM), pings closer than ``min_ping_interval`` get
GOAWAY ENHANCE_YOUR_CALM (like gRPC's too_many_pings). ``tls=False`` serves cleartext: HTTP/1.1,
or HTTP/2 with prior knowledge (so nginx can proxy to it). ALPN ``http/1.1`` serves HTTP/1.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame

from voicepool.testing._llm_api import (
    ModelApi,
    error_response,
    estimate_tokens,
    rate_limit_headers,
)
from voicepool.testing._service import LocalService
from voicepool.testing.rest import Http1Connection, HttpRequest, HttpResponse, _finish
from voicepool.testing.tls import test_certificates

__all__ = ["LlmEmulator"]

_PREFACE_LINE = b"PRI * HTTP/2.0\r\n"
_TICK = 0.005


async def _tick_sleep(delay: float) -> None:
    """Sleep ``delay``, waking on a 5 ms grid: tokens of concurrent streams fall due in the same
    loop iteration and leave in one write per connection (each syscall is costly on small VMs,
    and real servers batch too). Timing stays within one tick of the request's."""
    if delay <= 0:
        return  # no wait asked (e.g. x-emulator-ttft: 0): no grid either
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    # call_at with the exact grid time (asyncio.sleep would add its own clock read to it).
    handle = loop.call_at(math.ceil((loop.time() + delay) / _TICK) * _TICK, _wake, fut)
    try:
        await fut
    finally:
        handle.cancel()


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _H2Server:
    """One server-side HTTP/2 connection of the emulator."""

    def __init__(
        self, emu: LlmEmulator, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ):
        self.emu = emu
        self.reader = reader
        self.writer = writer
        # Inbound headers stay validated (that checks the client under test); our own outbound
        # headers are well-formed by construction, and skipping their checks saves CPU at scale.
        config = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.h2 = h2.connection.H2Connection(config=config)
        self.h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: emu.max_concurrent_streams,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 65536,
            },
        )
        self.requests: dict[int, tuple[list[tuple[bytes, bytes]], bytearray]] = {}
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.windows: dict[int, asyncio.Future[None]] = {}
        self.open: set[int] = set()  # streams counted in emu.open_streams
        self.goaway_sent = False
        self.flush_pending = False
        self.last_ping = time.monotonic()

    def flush(self) -> None:
        """Write h2's output at the end of this loop iteration (one write for many streams)."""
        if not self.flush_pending:
            self.flush_pending = True
            asyncio.get_running_loop().call_soon(self.flush_now)

    def flush_now(self) -> None:
        self.flush_pending = False
        data = self.h2.data_to_send()
        if data and not self.writer.transport.is_closing():
            self.writer.write(data)

    async def run(self, preface: bytes = b"") -> None:
        self.h2.initiate_connection()
        self.flush()
        try:
            data = preface
            while True:
                if data:
                    try:
                        events = self.h2.receive_data(data)
                    except h2.exceptions.ProtocolError:
                        self.flush()
                        return
                    for event in events:
                        self.on_event(event)
                    self.flush()
                data = await self.reader.read(65536)
                if not data:
                    return
        except OSError:
            return
        finally:
            for task in list(self.tasks.values()):
                task.cancel()
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)
            for sid in list(self.open):
                self.stream_done(sid)

    def on_event(self, ev: h2.events.Event) -> None:
        emu = self.emu
        if isinstance(ev, h2.events.RequestReceived):
            sid = ev.stream_id or 0
            if self.goaway_sent or emu._refuse_streams:
                self.h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
                return
            headers = list(ev.headers or [])
            if (b":path", b"/v1/too-large") in headers:
                # Answer before the body arrives, then RST_STREAM(NO_ERROR) (RFC 9113 8.1).
                emu.requests["/v1/too-large"] += 1
                self.h2.send_headers(sid, [(b":status", b"413"), (b"content-length", b"0")], True)
                self.h2.reset_stream(sid, ErrorCodes.NO_ERROR)
                self.flush()
                return
            self.requests[sid] = (headers, bytearray())
            self.open.add(sid)
            emu.streams_total += 1
            emu.open_streams += 1
            emu.peak_open_streams = max(emu.peak_open_streams, emu.open_streams)
            emu._notify()
        elif isinstance(ev, h2.events.DataReceived):
            req = self.requests.get(ev.stream_id or 0)
            if req is not None:
                req[1].extend(ev.data or b"")
            size = ev.flow_controlled_length or 0
            if size:
                self.h2.acknowledge_received_data(size, ev.stream_id or 0)
        elif isinstance(ev, h2.events.StreamEnded):
            sid = ev.stream_id or 0
            if sid in self.requests:
                task = asyncio.get_running_loop().create_task(self.respond(sid))
                self.tasks[sid] = task
        elif isinstance(ev, h2.events.StreamReset):
            sid = ev.stream_id or 0
            emu.resets_received += 1
            running = self.tasks.pop(sid, None)
            if running is not None:
                running.cancel()
            self.stream_done(sid)
        elif isinstance(ev, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            for fut in self.windows.values():
                if not fut.done():
                    fut.set_result(None)
        elif isinstance(ev, h2.events.PingReceived):
            emu.pings_received += 1
            now = time.monotonic()
            too_soon = emu.min_ping_interval and now - self.last_ping < emu.min_ping_interval
            self.last_ping = now
            emu._notify()
            if too_soon and not self.goaway_sent:
                emu.calm_goaways += 1
                self.goaway(ErrorCodes.ENHANCE_YOUR_CALM, None)

    def stream_done(self, sid: int) -> None:
        self.requests.pop(sid, None)
        self.windows.pop(sid, None)
        if sid in self.open:
            self.open.discard(sid)
            self.emu.open_streams -= 1
            self.emu._notify()
        if self.goaway_sent and not self.open:
            self.flush_now()
            self.writer.close()  # drained after GOAWAY: close

    def goaway(self, code: int, last_stream_id: int | None) -> None:
        """Send GOAWAY without moving h2's state machine to CLOSED (so in-flight streams finish)."""
        self.flush_now()
        last = self.h2.highest_inbound_stream_id if last_stream_id is None else last_stream_id
        frame = GoAwayFrame(stream_id=0, last_stream_id=last, error_code=code)
        self.goaway_sent = True
        if not self.writer.transport.is_closing():
            self.writer.write(frame.serialize())
        for sid in [s for s in self.open if s > last]:
            task = self.tasks.pop(sid, None)
            if task is not None:
                task.cancel()
            self.stream_done(sid)
        if not self.open:
            self.flush_now()
            self.writer.close()

    async def respond(self, sid: int) -> None:
        headers, body = self.requests[sid]
        fields = {k.decode(): v.decode() for k, v in headers}
        req = HttpRequest(
            fields.get(":method", "GET"),
            fields.get(":path", "/"),
            {k: v for k, v in fields.items() if not k.startswith(":")},
            bytes(body),
        )
        try:
            resp = await self.emu._handle(req)
            out = [(b":status", str(resp.status).encode())]
            out += [(k.lower().encode(), v.encode()) for k, v in resp.headers]
            if isinstance(resp.body, bytes):
                out.append((b"content-length", str(len(resp.body)).encode()))
                self.h2.send_headers(sid, out, end_stream=not resp.body)
                self.flush()
                if resp.body:
                    await self.send(sid, resp.body, end=True)
            else:
                self.h2.send_headers(sid, out)
                self.flush()
                async for chunk in resp.body:
                    await self.send(sid, chunk, end=False)
                self.h2.end_stream(sid)
                self.flush()
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, OSError):
            pass
        finally:
            self.tasks.pop(sid, None)
            self.stream_done(sid)

    async def send(self, sid: int, data: bytes, *, end: bool) -> None:
        while data:
            size = min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size)
            if size <= 0:
                fut = self.windows[sid] = asyncio.get_running_loop().create_future()
                await fut
                continue
            chunk, data = data[:size], data[size:]
            self.h2.send_data(sid, chunk, end_stream=end and not data)
            if len(chunk) >= 16384:
                self.flush_now()
                await self.writer.drain()
            else:
                self.flush()


class LlmEmulator(LocalService):
    """An OpenAI-compatible streaming LLM on 127.0.0.1 (see the module docstring)."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: bool = True,
        alpn: Iterable[str] = ("h2",),
        api_key: str | None = None,
        ttft: float = 0.05,
        tokens: int = 20,
        tokens_per_second: float = 50.0,
        max_concurrent_streams: int = 100,
        min_ping_interval: float | None = None,
        keepalive_timeout: float | None = None,
        model: str = "voicepool-emulator",
        context_window: int | None = 128_000,
        rate_limit: int = 10_000,
    ) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self.alpn = list(alpn)
        self.api_key = api_key
        self.ttft = ttft
        self.tokens = tokens
        self.tokens_per_second = tokens_per_second
        self.max_concurrent_streams = max_concurrent_streams
        self.min_ping_interval = min_ping_interval
        self.keepalive_timeout = keepalive_timeout  # HTTP/1.1 connections only
        self.model = model
        self.context_window = context_window
        self.rate_limit = rate_limit  # requests per minute, shown in the rate-limit headers
        self.api = ModelApi(model, tokens_per_second, _tick_sleep)
        self._failures: list[tuple[int, float | None]] = []
        self.connections_accepted = 0
        self.open_streams = 0  # requests in flight (HTTP/2 streams and HTTP/1.1 requests)
        self.peak_open_streams = 0  # highest open_streams seen on HTTP/2 (tests may reset it)
        self.streams_total = 0
        self.resets_received = 0
        self.pings_received = 0
        self.calm_goaways = 0
        self.requests: Counter[str] = Counter()
        self._h2conns: set[_H2Server] = set()
        self._h1conns: set[Http1Connection] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._refuse_connections = False
        self._refuse_streams = False
        self._changed = asyncio.Event()
        self._ids = itertools.count(1)
        self._window_start = time.monotonic()
        self._window_requests = 0

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def open_connections(self) -> int:
        return len(self._writers)

    async def start(self) -> LlmEmulator:
        ctx = test_certificates().server_context(self.alpn) if self.tls else None
        self._server = await asyncio.start_server(self._accept, self.host, self.port, ssl=ctx)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def aclose(self) -> None:
        """Stop listening and abort every connection."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await _finish(self._tasks)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    # -- faults and observation -----------------------------------------------------------------

    def goaway(
        self, error_code: int = ErrorCodes.NO_ERROR, last_stream_id: int | None = None
    ) -> int:
        """GOAWAY on every HTTP/2 connection; streams up to ``last_stream_id`` (default: all
        received) finish, then the connection closes. Returns the number of connections."""
        conns = [c for c in self._h2conns if not c.goaway_sent]
        for conn in conns:
            conn.goaway(error_code, last_stream_id)
        return len(conns)

    def set_max_concurrent_streams(self, value: int) -> None:
        """Advertise a new SETTINGS_MAX_CONCURRENT_STREAMS to every connection (and new ones)."""
        self.max_concurrent_streams = value
        for conn in self._h2conns:
            conn.h2.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: value})
            conn.flush()

    def refuse_connections(self, on: bool = True) -> None:
        """Close new connections right after accepting them (before any HTTP)."""
        self._refuse_connections = on

    def fail_next(self, status: int = 429, count: int = 1, retry_after: float | None = 1.0) -> None:
        """Answer the next ``count`` API requests (``/v1/...`` except ``/v1/models``) with HTTP
        ``status`` and the provider's error body; ``retry_after`` (seconds) adds ``retry-after``
        and ``retry-after-ms`` headers (None: no header)."""
        self._failures.extend([(status, retry_after)] * count)

    def refuse_streams(self, on: bool = True) -> None:
        """Answer every new stream with RST_STREAM(REFUSED_STREAM)."""
        self._refuse_streams = on

    def close_idle(self) -> int:
        """Close HTTP/1.1 keep-alive connections that are between requests; returns how many."""
        idle = [c for c in self._h1conns if c.idle]
        for conn in idle:
            conn.close()
        return len(idle)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait until ``predicate()`` holds, re-checked at every counter change. Raises
        TimeoutError."""
        async with asyncio.timeout(timeout):
            while not predicate():
                await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # -- connections ----------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections_accepted += 1
        self._notify()
        try:
            if self._refuse_connections:
                return
            sslobj = writer.get_extra_info("ssl_object")
            alpn = sslobj.selected_alpn_protocol() if sslobj is not None else None
            if alpn == "h2":
                await self._serve_h2(reader, writer, b"")
                return
            first = await reader.readuntil(b"\r\n")
            if first == _PREFACE_LINE and not self.tls:
                await self._serve_h2(reader, writer, first)
                return
            conn = Http1Connection(
                reader,
                writer,
                self._handle,
                keepalive_timeout=self.keepalive_timeout,
                first_line=first,
                on_change=self._notify,
            )
            self._h1conns.add(conn)
            try:
                await conn.run()
            finally:
                self._h1conns.discard(conn)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:
            # aclose() cancels connection tasks; end quietly (asyncio's stream server would log
            # a cancelled handler task as an unhandled exception).
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError, asyncio.CancelledError):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()
            writer.transport.abort()
            self._writers.discard(writer)
            self._tasks.discard(task)
            self._notify()

    async def _serve_h2(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, preface: bytes
    ) -> None:
        conn = _H2Server(self, reader, writer)
        self._h2conns.add(conn)
        try:
            await conn.run(preface)
        finally:
            self._h2conns.discard(conn)

    # -- the API --------------------------------------------------------------------------------

    async def _handle(self, req: HttpRequest) -> HttpResponse:
        resp = await self._answer(req)
        if req.path.startswith("/v1/"):
            now = time.monotonic()
            if now - self._window_start >= 60:
                self._window_start, self._window_requests = now, 0
            self._window_requests += 1
            remaining = max(0, self.rate_limit - self._window_requests)
            request_id = f"req_{next(self._ids):012d}"
            resp.headers.extend(
                rate_limit_headers(req.path, request_id, limit=self.rate_limit, remaining=remaining)
            )
        return resp

    async def _answer(self, req: HttpRequest) -> HttpResponse:
        path = req.path
        self.requests[path] += 1
        self._notify()
        head_delay = float(req.headers.get("x-emulator-head-delay", 0))
        if head_delay > 0:
            await asyncio.sleep(head_delay)
        if self.api_key and path.startswith("/v1/"):
            auth = req.headers.get("authorization", "")
            if auth != f"Bearer {self.api_key}" and req.headers.get("x-api-key") != self.api_key:
                return error_response(path, 401, "invalid api key")
        if path == "/v1/models":
            now = int(time.time())
            model = {"id": self.model, "object": "model", "created": now, "owned_by": "voicepool"}
            return HttpResponse.json(200, {"object": "list", "data": [model]})
        if path == "/v1/echo" and req.method == "POST":
            return HttpResponse(200, [("content-type", "application/octet-stream")], req.body)
        routes = ("/v1/chat/completions", "/v1/responses", "/v1/messages")
        if req.method != "POST" or path not in (*routes, "/v1/messages/count_tokens"):
            return error_response(path, 404, f"no route {req.method} {path}")
        if self._failures:
            status, retry_after = self._failures.pop(0)
            headers = []
            if retry_after is not None:
                headers = [
                    ("retry-after", str(max(0, math.ceil(retry_after)))),
                    ("retry-after-ms", str(int(retry_after * 1000))),
                ]
            return error_response(path, status, f"injected {status}", headers=headers)
        try:
            body = req.json()
        except ValueError:
            return error_response(path, 400, "body is not JSON")
        if not isinstance(body, dict):
            return error_response(path, 400, "body is not a JSON object")
        if self.context_window is not None and estimate_tokens(body) > self.context_window:
            used = estimate_tokens(body)
            text = f"prompt is too long: {used} tokens > {self.context_window} maximum"
            return error_response(path, 400, text, code="context_length_exceeded")
        if path == "/v1/messages/count_tokens":
            return self.api.count_tokens(body)
        ttft = float(req.headers.get("x-emulator-ttft", self.ttft))
        limit = (
            body.get("max_tokens")
            or body.get("max_completion_tokens")
            or body.get("max_output_tokens")
            or self.tokens
        )
        count = max(1, min(int(req.headers.get("x-emulator-tokens", self.tokens)), int(limit)))
        if path == "/v1/messages":
            return self.api.messages(body, ttft, count)
        if path == "/v1/responses":
            return self.api.responses(body, ttft, count)
        return self.api.chat(body, ttft, count)


def main() -> None:  # pragma: no cover - manual / benchmark use
    """``python -m voicepool.testing.llm --port 8443``: run the emulator until interrupted."""
    import argparse

    parser = argparse.ArgumentParser(description="OpenAI-compatible HTTP/2 LLM emulator")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ttft", type=float, default=0.05)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--tokens-per-second", type=float, default=50.0)
    parser.add_argument("--max-concurrent-streams", type=int, default=100)
    parser.add_argument("--plain", action="store_true", help="cleartext (no TLS)")
    args = parser.parse_args()

    async def serve() -> None:
        emu = LlmEmulator(
            port=args.port,
            tls=not args.plain,
            ttft=args.ttft,
            tokens=args.tokens,
            tokens_per_second=args.tokens_per_second,
            max_concurrent_streams=args.max_concurrent_streams,
        )
        async with emu:
            print(f"listening {emu.url} ca={test_certificates().ca_path}", flush=True)
            await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":  # pragma: no cover
    main()

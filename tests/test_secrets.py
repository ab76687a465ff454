"""No credential anywhere: a key set through the environment, every failure path of every adapter
(401/403, refused and dropped connections, non-HTTP answers, redirect loops, HTTP/2 protocol
errors) against real servers on 127.0.0.1, and the key searched for in everything voicepool
reports: DEBUG logs of every logger, reprs, tracebacks, ``stats()``, ``health()``, exported spans
and ``voicepool check`` output."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import sys
import traceback
from collections.abc import AsyncIterator, Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from voicepool import PoolManager, PoolState, VoicePoolSettings, telemetry
from voicepool._redact import scrub
from voicepool.testing import LlmEmulator

KEY = "sk-live-" + secrets.token_hex(12)
# Answers of the bad server, by request path. "garbage" is not HTTP at all.
_ANSWERS = {
    "/401": b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n",
    "/403": b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n",
    "/500": b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n",
    "/loop": b"HTTP/1.1 302 Found\r\nLocation: /loop\r\nContent-Length: 0\r\n\r\n",
    "/garbage": b"SSH-2.0-OpenSSH_9.2p1\r\n",
    "/close": b"",
}


class BadServer:
    """Answers each request by its path (see _ANSWERS), then closes; HTTP/2 prefaces get junk."""

    def __init__(self) -> None:
        self.port = 0
        self.requests = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> BadServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:  # keep-alive, so a redirect loop runs on one socket until the client quits
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                self.requests += 1
                parts = head.split(b" ", 2)
                path = parts[1].decode().split("?")[0] if len(parts) > 1 else ""
                if head.startswith(b"PRI * HTTP/2.0"):
                    writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\nnot h2")  # protocol error
                    path = "/close"
                else:
                    writer.write(_ANSWERS.get(path, _ANSWERS["/garbage"]))
                await writer.drain()
                if path in ("/garbage", "/close") or b"websocket" in head.lower():
                    break
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # closed: connecting to it is refused


def _pool_env(name: str, adapter: str, options: dict[str, str]) -> dict[str, str]:
    prefix = f"VOICEPOOL_POOLS__{name.upper()}__"
    env = {
        prefix + "ADAPTER": adapter,
        prefix + "REQUIRED": "false",
        prefix + "MIN_SIZE": "1",
        prefix + "MAX_SIZE": "1",
        prefix + "CONNECT_TIMEOUT": "2",
        prefix + "FAILURE_THRESHOLD": "1",
        prefix + "BACKOFF_INITIAL": "30",
        prefix + "BACKOFF_MAX": "30",
    }
    env.update({prefix + "OPTIONS__" + k.upper(): v for k, v in options.items()})
    return env


def _environment(bad: int, refused: int, llm: int) -> dict[str, str]:
    """Every pool of the lab, the key in its environment variable (plain headers too)."""
    env: dict[str, str] = {}
    http = f"http://127.0.0.1:{bad}"
    ws = f"ws://127.0.0.1:{bad}"
    for path in _ANSWERS:
        tag = path.strip("/")
        env |= _pool_env(
            f"rest_{tag}", "rest", {"base_url": http, "warmup_path": path, "api_key": KEY}
        )
        env |= _pool_env(f"ws_{tag}", "websocket", {"url": ws + path, "api_key": KEY})
        # The key in the plain `headers` option (not secret_headers): still never printed.
        env |= _pool_env(
            f"wsh_{tag}",
            "websocket",
            {"url": ws + path, "headers": json.dumps({"Authorization": f"Bearer {KEY}"})},
        )
    env |= _pool_env(
        "rest_refused", "rest", {"base_url": f"http://127.0.0.1:{refused}", "api_key": KEY}
    )
    env |= _pool_env(
        "ws_refused", "websocket", {"url": f"ws://127.0.0.1:{refused}/", "api_key": KEY}
    )
    env |= _pool_env(
        "h2_refused", "http2", {"base_url": f"http://127.0.0.1:{refused}", "api_key": KEY}
    )
    env |= _pool_env("h2_protocol", "http2", {"base_url": http, "api_key": KEY})
    env |= _pool_env(
        "h2_401",
        "http2",
        {"base_url": f"http://127.0.0.1:{llm}", "api_key": KEY, "warmup_path": "/v1/models"},
    )
    for provider in ("deepgram", "elevenlabs", "cartesia"):
        env |= _pool_env(f"{provider}_401", provider, {"url": ws + "/401", "api_key": KEY})
    return env


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    inst = telemetry.instrument(tracer_provider=provider)
    try:
        yield exporter
    finally:
        inst.remove()
        provider.shutdown()


@pytest.fixture
async def lab() -> AsyncIterator[dict[str, str]]:
    async with BadServer() as bad, LlmEmulator(tls=False, api_key="the-right-key") as llm:
        yield _environment(bad.port, _free_port(), llm.port)


def _span_text(exporter: InMemorySpanExporter) -> str:
    out = []
    for span in exporter.get_finished_spans():
        out.append(f"{span.name} {dict(span.attributes or {})} {span.status}")
        for event in span.events:
            out.append(f"{event.name} {dict(event.attributes or {})}")
    return "\n".join(out)


def _error_text(error: BaseException | None) -> str:
    if error is None:
        return ""
    return repr(error) + "".join(traceback.format_exception(error))


async def test_the_key_is_nowhere(
    lab: dict[str, str],
    spans: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    for name, value in lab.items():
        monkeypatch.setenv(name, value)
    caplog.set_level(logging.DEBUG)
    settings = VoicePoolSettings()
    manager = PoolManager.from_settings(settings)
    seen: list[str] = [repr(settings), repr(settings.model_dump()), settings.model_dump_json()]
    async with manager:
        # Every pool failed its first connect: the circuit is open (failure_threshold 1).
        for name, pool in manager.pools.items():
            assert pool.last_error is not None, name
            assert pool.state is PoolState.UNAVAILABLE, (name, pool.state)
            seen += [
                repr(pool),
                repr(pool.adapter),
                repr(pool.stats()),
                _error_text(pool.last_error),
            ]
            try:
                async with pool.acquire(timeout=0.05):
                    pass
            except Exception as exc:  # PoolUnavailable chaining the connect error
                seen.append(_error_text(exc))
        health = manager.health()
        seen += [repr(manager), json.dumps(health), repr(manager.stats())]
    kinds = {h["reason"].split(":")[0] for h in health["pools"].values()}
    assert kinds == {"circuit open"}
    reasons = " ".join(h["reason"] for h in health["pools"].values())
    for expected in ("HTTP 401", "HTTP 403", "HTTP 500", "Redirect", "refused", "HTTP/2"):
        assert expected.lower() in reasons.lower(), expected  # the failures are still explained
    seen += [caplog.text, _span_text(spans)]
    assert "GET /401 HTTP/1.1" in caplog.text  # the websockets DEBUG handshake log was captured
    assert spans.get_finished_spans()
    leaks = [text for text in seen if KEY in text]
    assert not leaks, leaks[0][:2000]


async def test_cli_check_never_prints_the_key(lab: dict[str, str]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("VOICEPOOL_")}
    env |= lab
    for extra in ([], ["--json"]):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "voicepool.cli",
            "check",
            "--timeout",
            "2",
            *extra,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        text = out.decode() + err.decode()
        assert proc.returncode == 1, text
        assert "401" in text
        assert KEY not in text, text


def test_scrub_masks_known_values_and_credential_shapes() -> None:
    headers = "<CIMultiDictProxy('Host': 'h', 'Authorization': 'Bearer abc.def-123')>"
    assert "abc.def-123" not in scrub(headers)
    assert "Bearer **********" in scrub(headers)
    assert scrub("GET /listen?token=xyz123&model=nova") == "GET /listen?token=**********&model=nova"
    assert scrub("x-api-key: k-9f9f9f") == "x-api-key: **********"
    assert scrub("max_tokens: 1000, 20 tokens left") == "max_tokens: 1000, 20 tokens left"
    assert scrub("value v3ry-s3cret here", ["v3ry-s3cret"]) == "value ********** here"


def test_every_voicepool_logger_is_scrubbed() -> None:
    import voicepool  # noqa: F401 - installs the NullHandler with the filter

    handler = logging.getLogger("voicepool").handlers
    assert any(isinstance(h, logging.NullHandler) and h.filters for h in handler)
    record = logging.LogRecord("voicepool.x", logging.INFO, __file__, 1, "auth %s", (KEY,), None)
    from voicepool._redact import remember

    remember([KEY])
    for h in handler:
        h.handle(record)
    assert KEY not in record.getMessage()

"""Fixtures of the settings / manager / examples tests: a tiny line-protocol server on 127.0.0.1
and an adapter for it, so pools open real TCP connections with a handshake, a credential and a ping.

Protocol (one line each way): the server greets ``HELLO`` (after ``delay`` seconds); the client
sends ``AUTH <key>``, the server answers ``OK`` or ``DENIED`` (then closes); ``PING`` -> ``PONG``;
``QUIT`` closes; any other line is echoed.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from voicepool import Adapter, ConnectError, register_adapter

ECHO = "vp-test-echo"
LIMITED = "vp-test-limited"
API_KEY = "sk-test-SUPERSECRET-4f9a2c"


class EchoServer:
    """A line-protocol server. Flip ``refuse`` (close at once: provider down), ``delay`` (slow
    greeting), ``token`` (the key it accepts; None accepts any) while it runs."""

    def __init__(self, *, delay: float = 0.0, token: str | None = API_KEY) -> None:
        self.delay = delay
        self.token = token
        self.refuse = False
        self.accepted = 0
        self.open = 0
        self.auth_seen: list[str] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    async def all_closed(self, timeout: float = 5.0) -> None:
        """Wait until no client connection is open (raises TimeoutError after ``timeout``)."""
        await asyncio.wait_for(self._idle.wait(), timeout)

    async def start(self) -> EchoServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.accepted += 1
        self.open += 1
        self._idle.clear()
        self._writers.add(writer)
        try:
            if self.refuse:
                return
            if self.delay:
                await asyncio.sleep(self.delay)
            writer.write(b"HELLO\n")
            await writer.drain()
            while line := await reader.readline():
                cmd, _, arg = line.strip().partition(b" ")
                if cmd == b"AUTH":
                    self.auth_seen.append(arg.decode())
                    if self.token is not None and arg.decode() != self.token:
                        writer.write(b"DENIED\n")
                        await writer.drain()
                        return
                    writer.write(b"OK\n")
                elif cmd == b"PING":
                    writer.write(b"PONG\n")
                elif cmd == b"QUIT":
                    return
                else:
                    writer.write(line)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.open -= 1
            if not self.open:
                self._idle.set()
            self._writers.discard(writer)
            writer.close()
            with suppress(Exception):
                await writer.wait_closed()
            self._handlers.discard(task)

    async def drop_connections(self) -> None:
        """Close every client connection from the server side (a provider restart)."""
        for writer in list(self._writers):
            writer.close()

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for writer in list(self._writers):
            writer.close()
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=5)


class EchoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)
    api_key: SecretStr


class EchoConn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def request(self, line: str) -> str:
        self.writer.write(line.encode() + b"\n")
        await self.writer.drain()
        answer = await self.reader.readline()
        if not answer:
            raise ConnectionError("server closed the connection")
        return answer.decode().rstrip("\n")


@register_adapter(ECHO)
class EchoAdapter(Adapter[EchoConn]):
    """EXCLUSIVE line-protocol connections; a DENIED key is fatal (opens the circuit)."""

    Options = EchoOptions

    def __init__(self, options: EchoOptions) -> None:
        self.options = options

    async def connect(self) -> EchoConn:
        opts = self.options
        reader, writer = await asyncio.open_connection(opts.host, opts.port)
        try:
            if await reader.readline() != b"HELLO\n":
                raise ConnectError(f"{self.describe()}: closed before the greeting")
            writer.write(b"AUTH " + opts.api_key.get_secret_value().encode() + b"\n")
            await writer.drain()
            answer = await reader.readline()
            if answer == b"DENIED\n":
                raise ConnectError(f"{self.describe()}: key rejected", fatal=True, status=401)
            if answer != b"OK\n":
                raise ConnectError(f"{self.describe()}: no answer to AUTH")
        except BaseException:
            writer.close()
            raise
        return EchoConn(reader, writer)

    async def ping(self, conn: EchoConn) -> None:
        if await conn.request("PING") != "PONG":
            raise ConnectionError("bad ping answer")

    def is_open(self, conn: EchoConn) -> bool:
        return not conn.writer.is_closing() and not conn.reader.at_eof()

    async def close(self, conn: EchoConn) -> None:
        conn.writer.close()
        with suppress(Exception):
            await conn.writer.wait_closed()

    def describe(self) -> str:
        return f"echo {self.options.host}:{self.options.port}"


@register_adapter(LIMITED)
class LimitedEchoAdapter(EchoAdapter):
    """Like SIP on pjsua2: at most 8 connections in the whole process."""

    max_connections_per_process = 8


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No VOICEPOOL_* variable from the outside, and a working directory without a .env."""
    for name in list(os.environ):
        if name.upper().startswith("VOICEPOOL_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
async def echo_server() -> AsyncIterator[Callable[..., Awaitable[EchoServer]]]:
    """Factory: ``server = await echo_server(delay=0.2)``; every server is closed at teardown."""
    servers: list[EchoServer] = []

    async def make(**kwargs: Any) -> EchoServer:
        server = await EchoServer(**kwargs).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.aclose()


def echo_pool(port: int, **fields: Any) -> dict[str, Any]:
    """A raw pool entry (as the TOML file would give it) for the echo adapter."""
    entry: dict[str, Any] = {
        "adapter": fields.pop("adapter", ECHO),
        "options": {"port": port, "api_key": fields.pop("api_key", API_KEY)},
        "backoff_initial": 0.05,
        "backoff_max": 0.2,
        "connect_timeout": 2.0,
        "drain_timeout": 2.0,
    }
    entry.update(fields)
    return entry

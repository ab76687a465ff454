"""A user-defined adapter, registered by decorator and configured from TOML.

    python examples/custom_adapter.py

voicepool pools any connection an :class:`~voicepool.Adapter` can open, check and close. This file
pools connections to a small line-based TCP service (think: an in-house inventory or routing
service your voice agent queries every turn). It starts a stand-in for that service on 127.0.0.1,
boots a pool for it from the TOML below, and makes a few requests on warm connections.

An adapter declares:
* ``Options``: a pydantic model of what ``[pools.<name>.options]`` may contain. Credentials are
  ``SecretStr``: they are never printed, logged, or reported by ``manager.health()``.
* ``connect`` / ``ping`` / ``is_open`` / ``close`` (and ``reset`` if a connection needs cleaning
  between holders). Raise :class:`~voicepool.ConnectError` with ``fatal=True`` when retrying
  cannot help (a rejected credential): the pool opens its circuit and fails fast.
* ``lease_mode`` (EXCLUSIVE here: one holder at a time), ``max_idle`` if the service closes idle
  connections (the pool pings sooner).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
from contextlib import suppress
from pathlib import Path
from types import TracebackType
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from voicepool import (
    Adapter,
    ConnectError,
    LeaseMode,
    PoolManager,
    VoicePoolSettings,
    register_adapter,
)

# -- the adapter ----------------------------------------------------------------------------------


class LineOptions(BaseModel):
    """``[pools.<name>.options]`` of a ``line`` pool."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)
    token: SecretStr | None = Field(None, description="Sent as `AUTH <token>` after the greeting.")
    reply_timeout: float = Field(5.0, gt=0, description="Longest wait for one answer.")


class LineConnection:
    """One open connection; ``request`` sends a line and returns the answer line."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.timeout = timeout

    async def request(self, line: str) -> str:
        """Raises ConnectionError if the service closed the connection, TimeoutError if slow."""
        self.writer.write(line.encode() + b"\n")
        await self.writer.drain()
        async with asyncio.timeout(self.timeout):
            answer = await self.reader.readline()
        if not answer:
            raise ConnectionError("the service closed the connection")
        return answer.decode().rstrip("\n")


@register_adapter("line")
class LineAdapter(Adapter[LineConnection]):
    """Pools connections to a line-protocol service: greeting, optional AUTH, PING/PONG."""

    Options = LineOptions
    lease_mode = LeaseMode.EXCLUSIVE

    def __init__(self, options: LineOptions) -> None:
        self.options = options

    async def connect(self) -> LineConnection:
        opts = self.options
        reader, writer = await asyncio.open_connection(opts.host, opts.port)
        try:
            if await reader.readline() != b"HELLO\n":
                raise ConnectError(f"{self.describe()} closed before its greeting")
            if opts.token is not None:
                writer.write(b"AUTH " + opts.token.get_secret_value().encode() + b"\n")
                await writer.drain()
                if await reader.readline() != b"OK\n":
                    # Never put the token in the message: errors end up in logs and health.
                    raise ConnectError(f"{self.describe()} rejected the token", fatal=True)
        except BaseException:
            writer.close()  # cancelled or failed half-way: leave nothing open
            raise
        return LineConnection(reader, writer, opts.reply_timeout)

    async def ping(self, conn: LineConnection) -> None:
        if await conn.request("PING") != "PONG":
            raise ConnectionError("unexpected answer to PING")

    def is_open(self, conn: LineConnection) -> bool:
        return not conn.writer.is_closing() and not conn.reader.at_eof()

    async def close(self, conn: LineConnection) -> None:
        with suppress(ConnectionError):
            conn.writer.write(b"QUIT\n")
        conn.writer.close()
        with suppress(ConnectionError):
            await conn.writer.wait_closed()

    def describe(self) -> str:
        return f"line service {self.options.host}:{self.options.port}"


# -- a stand-in for the service (so the example runs anywhere) ------------------------------------


class LineServer:
    """A tiny line-protocol server on 127.0.0.1: greets ``HELLO``, checks ``AUTH <token>``,
    answers ``PING`` with ``PONG``, echoes anything else after ``reply_delay`` seconds."""

    def __init__(self, *, token: str | None = None, reply_delay: float = 0.0) -> None:
        self.token = token
        self.reply_delay = reply_delay
        self.port = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> LineServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        for writer in list(self._writers):
            writer.close()
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(writer)
        self.connections += 1
        try:
            writer.write(b"HELLO\n")
            while line := await reader.readline():
                command, _, argument = line.strip().partition(b" ")
                if command == b"AUTH":
                    ok = self.token is None or argument.decode() == self.token
                    writer.write(b"OK\n" if ok else b"DENIED\n")
                    if not ok:
                        break
                elif command == b"PING":
                    writer.write(b"PONG\n")
                elif command == b"QUIT":
                    break
                else:
                    if self.reply_delay:
                        await asyncio.sleep(self.reply_delay)
                    writer.write(line)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            with suppress(ConnectionError):
                await writer.wait_closed()
            self._handlers.discard(task)


# -- the configuration a user would keep in voicepool.toml ----------------------------------------

CONFIG = """
[pools.inventory]
adapter = "line"            # the name given to @register_adapter
required = true
min_size = 2                # two warm connections at boot...
max_size = 4                # ...at most four
ping_interval = 15

[pools.inventory.options]   # validated by LineAdapter.Options
host = "127.0.0.1"
port = 7000                 # the demo overrides it with the stand-in's port
# token: from VOICEPOOL_POOLS__INVENTORY__OPTIONS__TOKEN (environment or .env)
"""


async def main() -> int:
    async with LineServer(token="demo-token", reply_delay=0.002) as service:
        # In production the token comes from the environment or .env, never from the TOML file.
        os.environ.setdefault("VOICEPOOL_POOLS__INVENTORY__OPTIONS__TOKEN", "demo-token")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp, "voicepool.toml")
            await asyncio.to_thread(path.write_text, CONFIG)
            # Constructor arguments beat environment and file, key by key: only the port changes.
            settings = VoicePoolSettings(
                config=path, pools={"inventory": {"options": {"port": service.port}}}
            )
        print(f"settings: {settings!r}")  # the token shows as '**********'
        async with PoolManager.from_settings(settings) as manager:
            print(f"booted: {service.connections} connections opened before the first request")
            for item in ("apples", "pears", "plums"):
                async with manager.acquire("inventory") as lease:
                    print(f"inventory: {await lease.conn.request(item)}")
            print("health:", json.dumps(manager.health(), sort_keys=True))
        print(f"closed: {service.connections} connections were opened in all")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

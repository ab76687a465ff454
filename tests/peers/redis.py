"""Run a real redis-server on 127.0.0.1 for a test (the fleet quota backend), stopped by PID.

::

    async with RedisServer() as server:
        quota = FleetQuota(server.url)

``redis-server --port P --bind 127.0.0.1 --save '' --appendonly no`` in a private directory:
nothing persists, so :meth:`RedisServer.restart` is a Redis that lost its data (what the quota
recovers from). :meth:`stop` and :meth:`restart` keep the port, so clients reconnect to the same
URL. The Debian package (``scripts/install-system-deps.sh``) provides the binary; tests skip when
:func:`redis_available` is false.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from pathlib import Path

from tests.peers._process import find_binary, free_port, poll_ready, stop_process
from voicepool.testing._service import LocalService

__all__ = ["RedisServer", "redis_available", "redis_binary"]


def redis_binary() -> str | None:
    """Path of redis-server (``PATH`` first, then /usr/bin), or None."""
    return find_binary("redis-server", "/usr/bin")


def redis_available() -> bool:
    return redis_binary() is not None


class RedisServer(LocalService):
    """One redis-server process; ``url``, ``port`` and ``pid`` while it runs."""

    def __init__(self, *, port: int | None = None, startup_timeout: float = 10.0) -> None:
        self.port = port or free_port()
        self.startup_timeout = startup_timeout
        self._proc: asyncio.subprocess.Process | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self) -> RedisServer:
        """Start redis-server and wait until it answers PING. Raises RuntimeError (no binary,
        exited early, not answering within ``startup_timeout``), after stopping it."""
        binary = redis_binary()
        if binary is None:
            raise RuntimeError("redis-server is not installed (scripts/install-system-deps.sh)")
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="voicepool-redis-")
        workdir = Path(self._tmp.name)
        self._proc = await asyncio.create_subprocess_exec(
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
            "--protected-mode",
            "yes",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            await poll_ready(
                self._proc,
                lambda: _pong(self.port),
                timeout=self.startup_timeout,
                exited=lambda status: RuntimeError(f"redis-server exited with {status} at start"),
                late=lambda: RuntimeError(f"redis-server did not answer on port {self.port}"),
            )
        except BaseException:
            await asyncio.shield(self.stop())
            raise
        return self

    async def stop(self) -> None:
        """Stop the server by its PID (SIGTERM, SIGKILL after 5 s); its data is gone."""
        proc, self._proc = self._proc, None
        if proc is not None:
            await stop_process(proc, 5.0)

    async def restart(self) -> None:
        """Stop, then start on the same port: a Redis back without its data."""
        await self.stop()
        await self.start()

    async def aclose(self) -> None:
        await self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __repr__(self) -> str:
        return f"<RedisServer pid={self.pid} port={self.port}>"


async def _pong(port: int) -> bool:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    try:
        writer.write(b"PING\r\n")
        await writer.drain()
        return (await reader.readline()).startswith(b"+PONG")
    except OSError:
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()

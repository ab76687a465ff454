"""A scripted asyncio fake adapter whose connects and pings fail on command, and test helpers."""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import SecretStr

from voicepool import Adapter, ConnectError
from voicepool._engine.observer import PoolObserver
from voicepool.pool import Pool

_ids = itertools.count(1)


@dataclass(eq=False)
class FakeConn:
    """One fake connection; ``open`` is what the adapter's ``is_open`` reports."""

    ident: int = field(default_factory=lambda: next(_ids))
    open: bool = True


class ScriptedAdapter(Adapter[FakeConn]):
    """Connects after ``connect_delay`` seconds; fails the next connects or pings when told to.

    Every connect, ping and close sets ``changed`` so a test can await the state it needs with
    :meth:`wait_for` instead of sleeping. ``api_key`` is a secret that must never reach telemetry.
    """

    def __init__(self, *, api_key: str = "sk-live-TOPSECRET-0042", connect_delay: float = 0.0):
        self.api_key = SecretStr(api_key)
        self.connect_delay = connect_delay
        self.connect_errors: deque[BaseException] = deque()
        self.fail_all_connects: BaseException | None = None
        self.ping_error: BaseException | None = None
        self.connects = 0
        self.pings = 0
        self.closed: list[FakeConn] = []
        self.conns: list[FakeConn] = []
        self._changed: asyncio.Event | None = None

    # -- scripting --------------------------------------------------------------------------------

    def fail_next_connects(self, *errors: BaseException) -> None:
        self.connect_errors.extend(errors)

    def kill(self, conn: FakeConn) -> None:
        """The peer closed ``conn``: mark it and tell the pool, as a reader task would."""
        conn.open = False
        self.connection_changed(conn)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``predicate()`` holds, re-checking after every connect, ping and close."""
        async with asyncio.timeout(timeout):
            while not predicate():
                await self._event().wait()
                self._event().clear()

    def _event(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def _notify(self) -> None:
        self._event().set()

    # -- Adapter ---------------------------------------------------------------------------------

    async def connect(self) -> FakeConn:
        try:
            if self.connect_delay:
                await asyncio.sleep(self.connect_delay)
            if self.connect_errors:
                raise self.connect_errors.popleft()
            if self.fail_all_connects is not None:
                raise self.fail_all_connects
            self.connects += 1
            conn = FakeConn()
            self.conns.append(conn)
            return conn
        finally:
            self._notify()

    async def ping(self, conn: FakeConn) -> None:
        self.pings += 1
        try:
            if self.ping_error is not None:
                raise self.ping_error
        finally:
            self._notify()

    def is_open(self, conn: FakeConn) -> bool:
        return conn.open

    async def close(self, conn: FakeConn) -> None:
        conn.open = False
        self.closed.append(conn)
        self._notify()

    def describe(self) -> str:
        return "fake://127.0.0.1"


def auth_error(adapter: ScriptedAdapter) -> ConnectError:
    """A fatal connect error whose message mentions the (masked) key, as careless code might."""
    return ConnectError(f"401 unauthorized for key {adapter.api_key}", fatal=True, status=401)


class Probe(PoolObserver):
    """Sets asyncio events when chosen hooks run, so tests await them instead of sleeping."""

    def __init__(self) -> None:
        self.alarms: list[tuple[float, bool]] = []
        self.alarm = asyncio.Event()
        self.pings: list[BaseException | None] = []
        self.pinged = asyncio.Event()

    def on_alarm(self, pool: Pool[Any], p95: float, firing: bool) -> None:
        self.alarms.append((p95, firing))
        self.alarm.set()

    def on_ping(self, pool: Pool[Any], duration: float, error: BaseException | None) -> None:
        self.pings.append(error)
        self.pinged.set()


async def settle(predicate: Callable[[], bool], rounds: int = 200) -> None:
    """Yield to the loop until ``predicate()`` holds (bounded); for states reached without I/O."""
    for _ in range(rounds):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")

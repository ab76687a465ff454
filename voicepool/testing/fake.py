"""A scripted fake adapter, for unit tests of code that uses a pool (no sockets).

Every outcome is chosen by the test: connect delays and failures, pings that fail, resets that
fail or wait, peer closes (:meth:`FakeAdapter.kill`). :func:`wait_until` waits for a condition
that no event announces (pool stats), bounded.

    adapter = FakeAdapter()
    async with Pool(adapter, PoolSettings(min_size=1, max_size=1), name="t") as pool:
        adapter.fail_all = ConnectionRefusedError("down")
        ...
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections import deque
from collections.abc import Callable

from voicepool.adapter import Adapter, LeaseMode
from voicepool.errors import ConnectError

__all__ = [
    "FakeAdapter",
    "FakeConn",
    "FakeMuxAdapter",
    "FakeNoResetAdapter",
    "FakeSingleUseAdapter",
    "fatal_error",
    "wait_until",
]


async def wait_until(
    predicate: Callable[[], object], timeout: float = 5.0, what: str = ""
) -> float:
    """Wait until ``predicate()`` is truthy (it may return an awaitable); return the seconds it
    took.

    For state no event announces (pool stats, a peer's table): re-checked at every loop
    iteration for the first few, then every 5 ms. Raises AssertionError naming ``what`` (or the
    predicate) after ``timeout`` seconds.
    """
    t0 = time.monotonic()
    spins = 0
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not reached within {timeout:g}s: {what or predicate}")
        spins += 1
        await asyncio.sleep(0 if spins < 20 else 0.005)


class FakeConn:
    """One fake connection; ``holders`` counts leases holding it at once (must stay <= 1)."""

    def __init__(self, ident: int) -> None:
        self.id = ident
        self.open = True
        self.closed = False
        self.pings = 0
        self.resets = 0
        self.holders = 0
        self.streams: set[int] = set()

    def __repr__(self) -> str:
        return f"<FakeConn {self.id} open={self.open} closed={self.closed}>"


class FakeAdapter(Adapter[FakeConn]):
    """An adapter whose connect / ping / reset / close outcomes a test scripts.

    * ``connect_delay``: seconds each connect sleeps (0: one loop iteration).
    * ``fail_next(exc, n)``: the next n connects raise exc; ``fail_all = exc`` fails every connect.
    * ``gate``: when set, connects wait for this event (to hold them "in flight").
    * ``ping_fails``: set of conn ids whose ping raises; ``ping_delay``/``reset_delay`` likewise.
    """

    lease_mode = LeaseMode.EXCLUSIVE

    def __init__(self, connect_delay: float = 0.0) -> None:
        self.connect_delay = connect_delay
        self.fail_all: BaseException | None = None
        self._fail_queue: deque[BaseException] = deque()
        self.gate: asyncio.Event | None = None
        self.ping_fails: set[int] = set()
        self.ping_delay = 0.0
        self.reset_delay = 0.0
        self.reset_fails = False
        self.release_delay = 0.0
        self.next_id = 0
        self.conns: list[FakeConn] = []
        self.connects = 0
        self.connect_attempts = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.pinged: list[int] = []
        self.closed_ids: list[int] = []
        self.io_calls = 0  # every awaited adapter call (connect, ping, reset, close, streams)
        self.reset_started: asyncio.Event | None = None  # set when a reset begins, if given

    def fail_next(self, exc: BaseException, n: int = 1) -> None:
        """The next ``n`` connects raise ``exc``."""
        self._fail_queue.extend([exc] * n)

    @property
    def open_conns(self) -> list[FakeConn]:
        return [c for c in self.conns if not c.closed]

    def kill(self, conn: FakeConn) -> None:
        """The peer closed ``conn``: mark it and tell the pool, as a reader task would."""
        conn.open = False
        self.connection_changed(conn)

    async def connect(self) -> FakeConn:
        self.io_calls += 1
        self.connect_attempts += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(self.connect_delay)
            if self._fail_queue:
                raise self._fail_queue.popleft()
            if self.fail_all is not None:
                raise self.fail_all
        finally:
            self.in_flight -= 1
        self.next_id += 1
        conn = FakeConn(self.next_id)
        self.conns.append(conn)
        self.connects += 1
        return conn

    async def ping(self, conn: FakeConn) -> None:
        self.io_calls += 1
        assert conn.holders == 0, "pinged a connection that is leased"
        conn.pings += 1
        self.pinged.append(conn.id)
        if self.ping_delay:
            await asyncio.sleep(self.ping_delay)
        if conn.id in self.ping_fails or not conn.open:
            raise ConnectionError(f"ping of {conn.id} failed")

    def is_open(self, conn: FakeConn) -> bool:
        return conn.open and not conn.closed

    async def reset(self, conn: FakeConn) -> None:
        self.io_calls += 1
        conn.resets += 1
        if self.reset_started is not None:
            self.reset_started.set()
        if self.reset_delay:
            await asyncio.sleep(self.reset_delay)
        if self.reset_fails:
            raise ConnectionError("reset failed")

    async def close(self, conn: FakeConn) -> None:
        self.io_calls += 1
        conn.closed = True
        self.closed_ids.append(conn.id)

    def describe(self) -> str:
        return "fake://test"


class FakeNoResetAdapter(FakeAdapter):
    """EXCLUSIVE with the base no-op reset: the pool takes its synchronous release path."""

    reset = Adapter.reset


class FakeSingleUseAdapter(FakeAdapter):
    lease_mode = LeaseMode.SINGLE_USE


class FakeMuxAdapter(FakeAdapter):
    """MULTIPLEXED fake: ``capacity`` per connection id can be changed (0 = draining)."""

    lease_mode = LeaseMode.MULTIPLEXED
    max_streams = 3

    def __init__(self, connect_delay: float = 0.0) -> None:
        super().__init__(connect_delay)
        self.capacity: dict[int, int] = {}
        self.released: list[tuple[int, int, BaseException | None]] = []
        self.kill_on_error = False
        self.release_started: asyncio.Event | None = None

    async def ping(self, conn: FakeConn) -> None:
        holders, conn.holders = conn.holders, 0  # pings run beside open streams here
        try:
            await super().ping(conn)
        finally:
            conn.holders += holders

    def stream_capacity(self, conn: FakeConn) -> int:
        return self.capacity.get(conn.id, self.max_streams)

    async def release_stream(
        self, conn: FakeConn, stream_id: int, error: BaseException | None
    ) -> bool:
        self.io_calls += 1
        if self.release_started is not None:
            self.release_started.set()
        if self.release_delay:
            await asyncio.sleep(self.release_delay)
        self.released.append((conn.id, stream_id, error))
        if error is not None and self.kill_on_error:
            return False
        return self.is_open(conn)


def fatal_error() -> ConnectError:
    """A connect error that opens the circuit at once (an auth rejection)."""
    return ConnectError("401 Unauthorized", fatal=True, status=401)

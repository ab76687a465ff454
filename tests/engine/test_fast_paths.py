"""The inlined paths of Lease (idle hit, clean release, hand-off, MULTIPLEXED stream hit), taken
only by adapters that keep the base ``is_open`` / ``reset`` / ``release_stream``: each must do
what the core would have done. The scripted fakes override those methods, so they never reach
these paths; the adapters here keep the base ones."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest

from voicepool import Adapter, LeaseMode, Pool, PoolSettings, PoolState, telemetry
from voicepool.testing import wait_until


class Conn:
    __slots__ = ("closed", "n")

    def __init__(self, n: int) -> None:
        self.n = n
        self.closed = False


class BaseAdapter(Adapter[Conn]):
    """Keeps every base method but connect/close: the pool's fastest paths apply."""

    def __init__(self, mode: LeaseMode = LeaseMode.EXCLUSIVE) -> None:
        self.lease_mode = mode
        self.max_streams = 4 if mode is LeaseMode.MULTIPLEXED else 1
        self.opened = 0
        self.closed: list[int] = []

    async def connect(self) -> Conn:
        self.opened += 1
        return Conn(self.opened)

    async def close(self, conn: Conn) -> None:
        conn.closed = True
        self.closed.append(conn.n)


class TrivialReset(BaseAdapter):
    def __init__(self) -> None:
        super().__init__()
        self.resets = 0

    async def reset(self, conn: Conn) -> None:
        self.resets += 1


class SuspendingReset(BaseAdapter):
    async def reset(self, conn: Conn) -> None:
        await asyncio.sleep(0)


class FailingReset(BaseAdapter):
    async def reset(self, conn: Conn) -> None:
        raise RuntimeError("dirty")


class ClosingReset(BaseAdapter):
    """A reset that closes the connection: is_open then says so."""

    async def reset(self, conn: Conn) -> None:
        conn.closed = True

    def is_open(self, conn: Conn) -> bool:
        return not conn.closed


@pytest.fixture(params=[False, True], ids=["no-telemetry", "telemetry"])
def observed(request: pytest.FixtureRequest) -> Iterator[bool]:
    """Both shapes of every path: with the default telemetry observer and without any."""
    if not request.param:
        telemetry.disable_default()
    try:
        yield bool(request.param)
    finally:
        telemetry.enable_default()


def consistent(pool: Pool[Conn]) -> None:
    """The public account adds up after the inlined paths (the core's own check() runs in the
    pure-core suites): nothing counted twice, nothing lost, within the bounds."""
    s = pool.stats()
    assert s.idle + s.in_use <= s.size <= s.max_size, s
    assert s.waiters == 0, s
    if pool.adapter.lease_mode is not LeaseMode.MULTIPLEXED:
        assert s.in_use == 0, s  # every lease of these tests has ended


def fixed(size: int, **kw: object) -> PoolSettings:
    return PoolSettings.model_validate(
        {"min_size": size, "max_size": size, "idle_timeout": None, "acquire_timeout": 2.0, **kw}
    )


@pytest.fixture
async def started() -> AsyncIterator[list[Pool[Conn]]]:
    pools: list[Pool[Conn]] = []
    yield pools
    for p in pools:
        await p.aclose()


async def boot(pools: list[Pool[Conn]], adapter: BaseAdapter, s: PoolSettings) -> Pool[Conn]:
    pool = Pool(adapter, s, name="fast")
    await pool.start()
    pools.append(pool)
    return pool


async def test_exclusive_idle_hit_and_clean_release(
    observed: bool, started: list[Pool[Conn]]
) -> None:
    pool = await boot(started, BaseAdapter(), fixed(2))
    for _ in range(3):
        async with pool.acquire() as lease:
            assert not lease.conn.closed
            assert pool.stats().in_use == 1
    s = pool.stats()
    assert (s.idle, s.in_use, s.acquired) == (2, 0, 3)
    consistent(pool)


async def test_trivial_reset_runs_inline(observed: bool, started: list[Pool[Conn]]) -> None:
    adapter = TrivialReset()
    pool = await boot(started, adapter, fixed(1))
    for _ in range(3):
        async with pool.acquire():
            pass
    assert adapter.resets == 3
    assert pool.stats().idle == 1


async def test_reset_that_suspends_goes_to_the_pool(
    observed: bool, started: list[Pool[Conn]]
) -> None:
    pool = await boot(started, SuspendingReset(), fixed(1))
    async with pool.acquire() as lease:
        first = lease.conn
    async with pool.acquire() as lease:  # waits for the reset to finish, then lends it again
        assert lease.conn is first
    assert pool.stats().idle == 1


@pytest.mark.parametrize("adapter_type", [FailingReset, ClosingReset])
async def test_reset_that_fails_or_closes_retires_the_connection(
    observed: bool, started: list[Pool[Conn]], adapter_type: type[BaseAdapter]
) -> None:
    adapter = adapter_type()
    pool = await boot(started, adapter, fixed(1))
    async with pool.acquire() as lease:
        first = lease.conn
    async with pool.acquire() as lease:  # a replacement, never the dirty one
        assert lease.conn is not first
    assert first.n in adapter.closed or first.closed
    consistent(pool)


async def test_contended_hand_off_serves_waiters_in_order(
    observed: bool, started: list[Pool[Conn]]
) -> None:
    pool = await boot(started, BaseAdapter(), fixed(2))
    order: list[int] = []

    async def call(i: int) -> None:
        async with pool.acquire():
            order.append(i)
            await asyncio.sleep(0)  # hold across one loop pass: the others queue (the traffic)

    await asyncio.gather(*(call(i) for i in range(20)))
    assert order == list(range(20))  # FIFO through the inline hand-off
    s = pool.stats()
    assert (s.idle, s.in_use, s.waiters, s.acquired) == (2, 0, 0, 20)
    consistent(pool)


async def test_hand_off_of_an_expired_connection_goes_through_the_core(
    observed: bool, started: list[Pool[Conn]]
) -> None:
    pool = await boot(started, BaseAdapter(), fixed(1))
    lease = await pool.lease()
    waiter = asyncio.ensure_future(pool.lease())
    await wait_until(lambda: pool.stats().waiters == 1, what="the second lease queued")
    pool.expire_all()  # the held connection retires on release; the waiter gets a new one
    first = lease.conn
    await lease.release()
    second = await asyncio.wait_for(waiter, 2.0)
    assert second.conn is not first
    await second.release()
    consistent(pool)


async def test_single_use_idle_hit(observed: bool, started: list[Pool[Conn]]) -> None:
    adapter = BaseAdapter(LeaseMode.SINGLE_USE)
    pool = await boot(started, adapter, fixed(2))
    seen = set()
    for _ in range(3):
        async with pool.acquire() as lease:
            seen.add(lease.conn.n)
    assert len(seen) == 3  # each one closed after use
    assert len(adapter.closed) >= 2


async def test_multiplexed_stream_hit_and_release(
    observed: bool, started: list[Pool[Conn]]
) -> None:
    pool = await boot(started, BaseAdapter(LeaseMode.MULTIPLEXED), fixed(2))
    leases = [await pool.lease() for _ in range(6)]
    assert pool.stats().streams_in_use == 6
    assert len({id(x.conn) for x in leases}) == 2  # least-loaded first: spread over both
    for x in leases:
        await x.release()
    for _ in range(5):
        async with pool.acquire():
            pass
    s = pool.stats()
    assert (s.streams_in_use, s.state) == (0, PoolState.READY)
    consistent(pool)


async def test_multiplexed_release_with_a_waiter_goes_through_the_core(
    observed: bool, started: list[Pool[Conn]]
) -> None:
    pool = await boot(started, BaseAdapter(LeaseMode.MULTIPLEXED), fixed(1))
    leases = [await pool.lease() for _ in range(4)]  # every stream of the one connection
    waiter = asyncio.ensure_future(pool.lease())
    await wait_until(lambda: pool.stats().waiters == 1, what="the fifth stream queued")
    shared = leases[0].conn
    await leases[0].release()
    got = await asyncio.wait_for(waiter, 2.0)
    assert got.conn is shared
    for x in [*leases[1:], got]:
        await x.release()
    assert pool.stats().streams_in_use == 0
    consistent(pool)


async def test_release_with_an_error_discards_on_the_slow_path(
    observed: bool, started: list[Pool[Conn]]
) -> None:
    adapter = BaseAdapter()
    pool = await boot(started, adapter, fixed(1))
    with pytest.raises(ValueError, match="boom"):
        async with pool.acquire() as lease:
            first = lease.conn
            raise ValueError("boom")
    async with pool.acquire() as lease:
        assert lease.conn is not first
    consistent(pool)


async def test_instrumented_pool_releases_through_the_coroutine(
    observed: bool, started: list[Pool[Conn]]
) -> None:
    adapter = TrivialReset()
    pool = await boot(started, adapter, fixed(1, leak_threshold=5.0))
    for _ in range(2):
        async with pool.acquire():
            pass
    assert adapter.resets == 2
    assert pool.stats().idle == 1

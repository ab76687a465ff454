"""`Lease[C]`: one borrowed connection (or stream), as an async context manager.

``pool.acquire()`` returns a Lease; ``async with`` acquires on entry and releases on exit. The
class is deliberately plain (``__slots__``, no ``contextlib`` wrapper): it is the hot path.
"""

from __future__ import annotations

import asyncio
from asyncio import _get_running_loop
from types import TracebackType
from typing import TYPE_CHECKING, Generic, TypeVar

from voicepool._engine.record import ConnState
from voicepool.errors import LeaseReleased

if TYPE_CHECKING:
    from voicepool._engine.record import ConnRecord
    from voicepool.pool import Pool  # (pool <-> lease: the driver and its hot path)

C = TypeVar("C")

_NEW, _HELD, _RELEASED = 0, 1, 2
_IDLE, _IN_USE = ConnState.IDLE, ConnState.IN_USE  # module constants: no enum lookups per call


class Lease(Generic[C]):
    """A connection borrowed from a :class:`~voicepool.Pool`.

    ``lease.conn`` is the connection; ``lease.stream_id`` identifies the stream on a MULTIPLEXED
    connection (``None`` otherwise). Leaving the block cleanly returns the connection; an exception
    in the block, or :meth:`discard`, closes it (MULTIPLEXED: the adapter decides whether the shared
    connection survives). Using the lease after the block raises :class:`~voicepool.LeaseReleased`.

    Entering is cancellation-safe: a cancelled or timed-out acquire leaks no slot and never leaves a
    connection assigned to nobody. Raises :class:`~voicepool.PoolExhausted` (timeout),
    :class:`~voicepool.PoolUnavailable` (circuit open) or :class:`~voicepool.PoolClosed`.
    """

    __slots__ = (
        "_conn",
        "_discard",
        "_leak",
        "_pool",
        "_rec",
        "_state",
        "_t0",
        "_timeout",
        "stream_id",
    )

    _rec: ConnRecord[C]
    _conn: C
    _t0: float
    _leak: asyncio.TimerHandle | None

    def __init__(self, pool: Pool[C], timeout: float | None) -> None:
        # Only what __aexit__ reads unconditionally is set here (this is the hot path); _rec,
        # _conn and _t0 are set by the acquire, _leak only by leak watching.
        self._pool = pool
        self._timeout = timeout
        self._state = _NEW
        self._discard: str | None = None
        self.stream_id: int | None = None

    @property
    def conn(self) -> C:
        """The leased connection. Raises LeaseReleased outside the ``async with`` block."""
        if self._state != _HELD:
            raise LeaseReleased(f"lease of pool {self._pool.name!r} is not held")
        return self._conn

    @property
    def pool(self) -> Pool[C]:
        return self._pool

    @property
    def released(self) -> bool:
        return self._state == _RELEASED

    def discard(self, reason: str = "discarded") -> None:
        """Close this connection (or, MULTIPLEXED, let the adapter judge it) instead of reusing it.

        Takes effect when the block exits. Raises LeaseReleased if the lease is not held.
        """
        if self._state != _HELD:
            raise LeaseReleased(f"lease of pool {self._pool.name!r} is not held")
        self._discard = reason

    async def __aenter__(self) -> Lease[C]:
        if self._state:
            raise RuntimeError("a Lease can be entered only once; call pool.acquire() again")
        pool = self._pool
        # The common case, inlined (this is the hot path: every call-level function call costs
        # tens of ns here): an EXCLUSIVE / SINGLE_USE pool whose newest idle connection is open,
        # used from the loop it was started on. Anything else goes through the core.
        if pool._simple:
            idle = pool._idle
            if idle:
                rec = idle[-1]
                conn = rec.conn
                if pool._is_open(conn) and _get_running_loop() is pool._loop:
                    idle.pop()
                    rec.state = _IN_USE
                    self._rec = rec
                    self._conn = conn
                    self._t0 = pool._clock()
                    pool._core.n_acquired += 1
                    self._state = _HELD
                    return self
        await pool._acquire(self)
        self._state = _HELD
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._state != _HELD:
            return
        self._state = _RELEASED
        pool = self._pool
        if pool._instrumented and self._leak is not None:
            self._leak.cancel()
        if exc_type is not None or self._discard is not None or not pool._exclusive:
            await pool._release_slow(self, exc)
            return
        # A clean EXCLUSIVE release, inlined. A reset that completes without suspending (the
        # base no-op, or an override that awaits nothing) costs no task and no timer: it is driven
        # once here; only one that really waits goes to the pool under its timeout.
        rec = self._rec
        now = pool._clock()
        if pool._observers:
            pool._record_use(now - self._t0)
        rec.last_used = now
        reset = pool._reset
        if reset is not None:
            coro = reset(self._conn)
            try:
                first = coro.send(None)
            except StopIteration:
                pass
            except Exception as err:
                pool._reset_failed(rec, now, err)
                return
            else:
                await pool._finish_reset(rec, coro, first)
                return
            if not pool._is_open(self._conn):
                pool._reset_failed(rec, now, ConnectionError("closed by its reset"))
                return
        core = pool._core
        if rec.expires > now and not core.n_waiting and not core.closing:
            # Back to idle, nobody waiting: what core.released would do, without its actions.
            rec.state = _IDLE
            pool._idle.append(rec)
            return
        pool._apply(core.released(rec, now, "ok"))

    async def release(self, error: BaseException | None = None) -> None:
        """Return the connection, for leases from :meth:`Pool.lease` (no ``async with``).

        ``error``: the exception that ended the use, if any (the connection is then closed, or on
        MULTIPLEXED judged by the adapter), as an exception leaving ``async with`` would.
        Cancellation-safe like the block's exit; a second call does nothing.
        """
        await self.__aexit__(None if error is None else type(error), error, None)

    def __repr__(self) -> str:
        state = ("new", "held", "released")[self._state]
        sid = f" stream={self.stream_id}" if self.stream_id is not None else ""
        return f"<Lease pool={self._pool.name!r} {state}{sid}>"

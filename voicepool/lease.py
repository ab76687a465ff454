"""`Lease[C]`: one borrowed connection (or stream), as an async context manager.

``pool.acquire()`` returns a Lease; ``async with`` acquires on entry and releases on exit. The
class is deliberately plain (``__slots__``, no ``contextlib`` wrapper): it is the hot path.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Coroutine, Generator
from threading import get_ident as _get_ident
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from voicepool._engine.record import ConnState
from voicepool._engine.waitqueue import GRANTED
from voicepool.errors import LeaseReleased

if TYPE_CHECKING:
    from voicepool._engine.record import ConnRecord
    from voicepool._engine.waitqueue import WaitQueue
    from voicepool.pool import Pool  # (pool <-> lease: the driver and its hot path)

C = TypeVar("C")

_NEW, _HELD, _RELEASED, _DISCARDED = 0, 1, 2, 3  # _DISCARDED: held, discard() called
_IDLE, _IN_USE = ConnState.IDLE, ConnState.IN_USE  # module constants: no enum lookups per call
_MAX_BUFFERED = 4096  # hold times buffered for observers between flushes (about a second)


@types.coroutine
def _finished() -> Generator[Any, None, None]:
    return
    yield


# What a release that completed synchronously returns to ``async with``: a generator-based
# coroutine already run to its end. Awaiting it returns None at once and never suspends, from any
# task and any loop, any number of times at once (an exhausted generator has nothing left to
# run), and costs neither an allocation nor an exception. A finished Future did the same at a
# higher price: awaiting one builds an iterator, and from Python 3.12 on its end is a raised
# StopIteration (about 1,200 instructions a release, measured with callgrind).
_exhausted: Any = _finished()
for _ in _exhausted:  # (run it to its end: there is nothing in it)
    pass
# (Typed as the coroutine __aexit__'s annotation names: awaited the same way.)
_DONE = cast("Coroutine[Any, Any, None]", _exhausted)


def _hand_off(waiters: WaitQueue, rec: ConnRecord[Any]) -> None:
    """Grant ``rec`` (proven, in use) to the first live waiter: core._deliver's grant, inlined."""
    w = waiters.pop()
    assert w is not None  # waiters.count > 0
    w.state = GRANTED
    w.rec = rec
    fut = w.future
    if not fut.done():  # (cancelled, not yet given up: its give_up passes the grant on)
        fut.set_result(None)


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
        "_discard",
        "_leak",
        "_pool",
        "_rec",
        "_sid",
        "_state",
        "_t0",
        "_timeout",
    )

    _rec: ConnRecord[C]
    _t0: float
    _leak: asyncio.TimerHandle | None
    _discard: str

    def __init__(self, pool: Pool[C], timeout: float | None) -> None:
        # Only what every exit reads is set here (this is the hot path); _rec and _t0 are set by
        # the acquire, _sid only on MULTIPLEXED, _leak only by leak watching, _discard only by
        # discard().
        self._pool = pool
        self._timeout = timeout
        self._state = _NEW

    @property
    def stream_id(self) -> int | None:
        """The stream of a MULTIPLEXED lease while it is held (its id on the connection), else
        None."""
        try:
            return self._sid
        except AttributeError:
            return None

    @property
    def conn(self) -> C:
        """The leased connection. Raises LeaseReleased outside the ``async with`` block."""
        if self._state != _HELD and self._state != _DISCARDED:
            raise LeaseReleased(f"lease of pool {self._pool.name!r} is not held")
        return self._rec.conn

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
        if self._state != _HELD and self._state != _DISCARDED:
            raise LeaseReleased(f"lease of pool {self._pool.name!r} is not held")
        self._discard = reason
        self._state = _DISCARDED

    async def __aenter__(self) -> Lease[C]:
        if self._state:
            raise RuntimeError("a Lease can be entered only once; call pool.acquire() again")
        pool = self._pool
        # The common case, inlined (this is the hot path: every call-level function call costs
        # tens of ns here): an EXCLUSIVE / SINGLE_USE pool whose newest idle connection is open,
        # used from the loop it was started on. Anything else goes through the core.
        idle = pool._idle
        # "Used from the loop it was started on", without asking asyncio for the running loop
        # (that reads getpid(), a system call, on every call): a BaseEventLoop records the thread
        # that runs it, and only one loop runs in a thread at a time (Pool._owner).
        if idle and pool._owner._thread_id == _get_ident():
            if pool._fast:  # EXCLUSIVE / SINGLE_USE, the base is_open, no hold times wanted
                rec = idle.pop()
                rec.state = _IN_USE
                self._rec = rec
                pool._core.n_acquired += 1
                self._state = _HELD
                return self
            if pool._timed:  # ... observers want hold times
                rec = idle.pop()
                rec.state = _IN_USE
                self._rec = rec
                clock = pool._clock
                self._t0 = clock()
                pool._core.n_acquired += 1
                self._state = _HELD
                return self
            if pool._simple:
                rec = idle[-1]
                check = pool._check_open  # None when the adapter keeps the base is_open
                if check is None or check(rec.conn):
                    idle.pop()
                    rec.state = _IN_USE
                    self._rec = rec
                    if pool._timing:  # (hold times are for observers only)
                        clock = pool._clock
                        self._t0 = clock()
                    pool._core.n_acquired += 1
                    self._state = _HELD
                    return self
        elif pool._mux_take and pool._owner._thread_id == _get_ident():
            # A MULTIPLEXED stream hit, inlined: core._take_stream's choice (the least-loaded
            # connection with room that is not suspect) when it is not the last free stream
            # (that one goes through the core, which opens another connection).
            core = pool._core
            conns = core.mux_conns
            if len(conns) == 1:  # (one connection, the common small pool: nothing to choose)
                best = conns[0]
                free = 0 if best.suspect else best.cap - best.streams
            else:
                best = None
                load = 1 << 30
                free = 0
                for rec in conns:
                    room = rec.cap - rec.streams
                    if room > 0 and not rec.suspect:
                        free += room
                        if rec.streams < load:
                            best = rec
                            load = rec.streams
            if free > 1 and best is not None and not core.closing:
                check = pool._check_open
                if check is None or check(best.conn):
                    best.streams += 1
                    best.seq += 1
                    core.n_acquired += 1
                    self._rec = best
                    self._sid = best.seq
                    self._state = _HELD
                    return self
        if pool._instrumented:
            await pool._acquire(self)
        else:
            # Queue and wait here, not in a coroutine of the pool's: no coroutine per waiter.
            waiter = pool._begin(self)
            if waiter is not None:
                try:
                    await waiter.future
                except BaseException as exc:
                    pool._abandon(waiter, exc)
                    raise
                pool._served(self, waiter)
        self._state = _HELD
        return self

    def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Coroutine[Any, Any, None]:
        # Not a coroutine function: a clean release that completes at once (the common case)
        # does its bookkeeping here and returns the pool's already-completed future (awaitable
        # like the coroutine the annotation names, which keeps Lease an AsyncContextManager to
        # type checkers), so it costs no coroutine. Everything else returns the coroutine that
        # does the rest.
        if exc_type is not None or self._state != _HELD:
            # (Tested first, and a near jump: CPython 3.11 specialises a comparison only when
            # its jump is short, and this one runs on every release.)
            return self._exit(exc_type, exc)
        pool = self._pool
        if pool._bare:  # _plain, no hold times wanted, the base reset
            rec = self._rec
            clock = pool._clock  # (an attribute, then a call: LOAD_METHOD on it is slow)
            now = clock()
            rec.last_used = now
            self._state = _RELEASED
            if rec.expires > now:
                waiters = pool._waiters
                if not waiters.count:
                    rec.state = _IDLE
                    pool._idle.append(rec)
                    return _DONE
                if rec.proven:
                    # The contended hand-off: what core.released would do (nothing else
                    # changes: no proof, no state, no connect), without its action list.
                    _hand_off(waiters, rec)
                    return _DONE
            pool._apply(pool._core.released(rec, now, "ok"))
            return _DONE
        if pool._plain:  # EXCLUSIVE, no leak watching or acquire tracing: a reset or hold times
            rec = self._rec
            clock = pool._clock
            now = clock()
            if pool._timing:
                uses = pool._use_times
                if len(uses) < _MAX_BUFFERED:
                    try:
                        uses.append(now - self._t0)
                    except AttributeError:  # taken before hold times were wanted
                        pass
            rec.last_used = now
            self._state = _RELEASED
            reset = pool._reset
            if reset is not None:
                # A reset that completes without suspending (an override that awaits nothing)
                # costs no task and no timer: driven once here (a `for` over its awaitable: no
                # StopIteration is raised when it returns); only one that really waits goes to
                # the pool, under its timeout.
                coro = reset(rec.conn)
                try:
                    for first in coro.__await__():
                        return pool._finish_reset(rec, coro, first)
                except Exception as err:
                    pool._reset_failed(rec, now, err)
                    return _DONE
                check = pool._check_open
                if check is not None and not check(rec.conn):
                    pool._reset_failed(rec, now, ConnectionError("closed by its reset"))
                    return _DONE
            if rec.expires > now:
                # Back to idle, nobody waiting: what core.released would do, without its
                # actions. (A closing pool has expired every connection: those go through
                # the core.)
                waiters = pool._waiters
                if not waiters.count:
                    rec.state = _IDLE
                    pool._idle.append(rec)
                    return _DONE
                if rec.proven:
                    _hand_off(waiters, rec)
                    return _DONE
            pool._apply(pool._core.released(rec, now, "ok"))
            return _DONE
        if pool._mux_fast:  # MULTIPLEXED, the base release_stream, no hold times wanted
            rec = self._rec
            clock = pool._clock
            now = clock()
            check = pool._check_open
            if (
                rec.proven
                and rec.cap
                and rec.expires > now
                and rec.state is _IN_USE
                and not pool._waiters.count
                and (check is None or check(rec.conn))
            ):
                # The adapter keeps the connection (its base release_stream answers
                # is_open), nobody waits for the stream, nothing to prove or retire: what
                # core.stream_released would do, without its actions.
                self._state = _RELEASED
                rec.streams -= 1
                rec.last_used = now
                return _DONE
        return self._exit(exc_type, exc)

    async def _exit(self, exc_type: type[BaseException] | None, exc: BaseException | None) -> None:
        """The release :meth:`__aexit__` does not complete itself: an error, a discard, another
        lease mode, leak watching. Cancellation-safe (the bookkeeping runs in ``finally``)."""
        state = self._state
        if state != _HELD and state != _DISCARDED:
            return
        self._state = _RELEASED
        pool = self._pool
        if pool._instrumented and self._leak is not None:
            self._leak.cancel()
        reason = self._discard if state == _DISCARDED else None
        if exc_type is not None or reason is not None or not pool._exclusive:
            await pool._release_slow(self, exc, reason)
            return
        # A clean EXCLUSIVE release of an instrumented pool.
        rec = self._rec
        now = pool._clock()
        if pool._timing:
            pool._record_use(self, now)
        reset = pool._reset
        if reset is not None:
            coro = reset(rec.conn)
            try:
                for first in coro.__await__():
                    await pool._finish_reset(rec, coro, first)
                    return
            except Exception as err:
                pool._reset_failed(rec, now, err)
                return
            if not pool._is_open(rec.conn):
                pool._reset_failed(rec, now, ConnectionError("closed by its reset"))
                return
        pool._apply(pool._core.released(rec, now, "ok"))

    async def release(self, error: BaseException | None = None) -> None:
        """Return the connection, for leases from :meth:`Pool.lease` (no ``async with``).

        ``error``: the exception that ended the use, if any (the connection is then closed, or on
        MULTIPLEXED judged by the adapter), as an exception leaving ``async with`` would.
        Cancellation-safe like the block's exit; a second call does nothing.
        """
        await self.__aexit__(None if error is None else type(error), error, None)

    def __repr__(self) -> str:
        state = ("new", "held", "released", "held, discarded")[self._state]
        sid = f" stream={self.stream_id}" if self.stream_id is not None else ""
        return f"<Lease pool={self._pool.name!r} {state}{sid}>"

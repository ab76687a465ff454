"""`Pool[C]`: the asyncio driver of one pool of an adapter's connections.

How it is built (DESIGN.md, "The engine"): every decision is made by
:class:`~voicepool._engine.core.PoolCore`, which takes events and returns actions. This module
owns what the core cannot: futures, tasks, the one timer, the adapter awaits (through
``voicepool._engine.calls``), observers and logs. ``_apply`` performs actions and decides nothing.

The one sanctioned shortcut is :class:`~voicepool.Lease`'s inlined fast path, which takes from and
returns to the core's idle deque directly, allocation-free.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import math
import random
import threading
import time
import traceback
from collections.abc import Callable, Coroutine, Iterable, Sequence
from threading import get_ident as _get_ident
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from voicepool._engine import calls
from voicepool._engine.actions import (
    Action,
    Alarm,
    Close,
    Connect,
    Fail,
    Grant,
    Ping,
    QuotaSync,
    StateChanged,
    Wake,
)
from voicepool._engine.core import PoolCore, SizingPolicy
from voicepool._engine.observer import PoolObserver, observers_for
from voicepool._engine.quota import QuotaBackend, QuotaGate, QuotaGrant
from voicepool._engine.record import ConnRecord, ConnState
from voicepool._engine.state import PoolState, PoolStats
from voicepool._engine.waitqueue import WAITING, Waiter
from voicepool._engine.warm import sizing_for
from voicepool._redact import describe_error, get_logger, remember_from
from voicepool.adapter import Adapter, LeaseMode
from voicepool.errors import (
    ConnectError,
    PoolClosed,
    PoolError,
    PoolExhausted,
    PoolLoopError,
    PoolUnavailable,
    VoicepoolError,
)
from voicepool.lease import _HELD, _MAX_BUFFERED, _NEW, Lease
from voicepool.pool_settings import PoolSettings

if TYPE_CHECKING:
    pass

__all__ = ["Pool", "PoolState", "PoolStats"]

C = TypeVar("C")
log = get_logger("voicepool.pool")

_FLUSH_EVERY = 1.0  # seconds between hand-offs of buffered hold times to observers


class _RunningCheck:
    """Pool._owner for a loop that does not record its thread (uvloop): ``_thread_id`` is the
    caller's thread when ``loop`` is the running loop, else None."""

    __slots__ = ("loop",)

    def __init__(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self.loop = loop

    @property
    def _thread_id(self) -> int | None:
        running = asyncio._get_running_loop()
        return threading.get_ident() if running is not None and running is self.loop else None


_new = object.__new__


class Pool(Generic[C]):
    """Connections of type ``C`` produced by one :class:`~voicepool.Adapter`.

    ``async with Pool(adapter, settings, name="asr") as pool:`` starts (warms) and closes it;
    ``async with pool.acquire() as lease:`` borrows a connection. See DESIGN.md for the contract.

    ``clock`` (default ``time.monotonic``) is the one clock of every decision; ``rng`` the
    source of every jitter; ``observers`` are added to those the registered factories attach
    (telemetry); ``sizing`` replaces the warm-floor policy; ``quota`` is the fleet quota's
    backend when ``settings.quota`` is set (default: a :class:`voicepool.quota.FleetQuota` of
    its own on ``settings.quota.backend``, made at start).
    """

    # Slots, not a __dict__: the lease's hot path reads a dozen of these per acquire+release, and
    # a slot is the cheapest attribute CPython has (47 fields are past the shared-keys limit, so
    # a __dict__ here was an ordinary dict probed on every read).
    __slots__ = (
        "__weakref__",
        "_acquire_timeout",
        "_bare",
        "_check_open",
        "_clock",
        "_close_task",
        "_closers",
        "_core",
        "_drained",
        "_exclusive",
        "_fast",
        "_flush_at",
        "_flushed",
        "_hard_close",
        "_holder",
        "_idle",
        "_instrumented",
        "_is_open",
        "_leak_threshold",
        "_loop",
        "_mux",
        "_mux_fast",
        "_mux_take",
        "_new_future",
        "_observers",
        "_owner",
        "_owns_quota",
        "_plain",
        "_quota",
        "_reset",
        "_simple",
        "_started",
        "_timed",
        "_timer",
        "_timer_at",
        "_timer_ctx",
        "_timing",
        "_use_times",
        "_waiters",
        "_warmed",
        "_work",
        "adapter",
        "lease_mode",
        "max_size",
        "max_streams",
        "min_size",
        "name",
        "settings",
    )

    def __init__(
        self,
        adapter: Adapter[C],
        settings: PoolSettings | None = None,
        *,
        name: str,
        clock: Callable[[], float] | None = None,
        observers: Iterable[PoolObserver] = (),
        rng: random.Random | None = None,
        sizing: SizingPolicy | None = None,
        quota: QuotaBackend | None = None,
    ) -> None:
        self.name = name
        self.adapter = adapter
        remember_from(adapter)  # its credentials are masked in every report from now on
        self.settings = s = settings if settings is not None else PoolSettings()
        resolved = s.resolve(adapter)
        self.lease_mode = resolved.lease_mode
        self.min_size = resolved.min_size
        self.max_size = resolved.max_size
        self.max_streams = resolved.max_streams
        self._clock = clock or time.monotonic
        interval = s.ping_interval
        if adapter.max_idle is not None:
            # Keep well under the provider's idle close (Deepgram ~10 s): ping at half of it.
            interval = min(interval, adapter.max_idle / 2)
        self._core: PoolCore[C] = PoolCore(
            name,
            s,
            resolved,
            ping_interval=interval,
            rng=rng if rng is not None else random.Random(),
            is_open=adapter.is_open,
            describe=adapter.describe(),
            policy=sizing if sizing is not None else sizing_for(s),
            close_reason=adapter.close_reason,
            connection_error=adapter.connection_error,
            is_fatal=adapter.is_fatal,
            use_proves_liveness=adapter.use_proves_liveness,
            quota=_gate(s, resolved.lease_mode, resolved.max_streams),
        )
        self._quota = quota  # the backend; made at start when settings name one
        self._owns_quota = False
        self._mux = resolved.lease_mode is LeaseMode.MULTIPLEXED
        self._is_open = adapter.is_open
        self._check_open = None if type(adapter).is_open is Adapter.is_open else adapter.is_open
        self._leak_threshold = s.leak_threshold
        self._acquire_timeout = s.acquire_timeout
        self._instrumented = s.leak_threshold is not None or s.trace_acquire
        # Lease inlines the idle hit for these, and the clean EXCLUSIVE release for _plain.
        self._simple = not self._mux and not self._instrumented
        self._exclusive = resolved.lease_mode is LeaseMode.EXCLUSIVE
        self._plain = self._exclusive and not self._instrumented
        self._timing = False  # some observer wants lease hold times (see _refresh_fast)
        self._fast = False  # _simple, the base is_open and no timing
        self._timed = False  # _simple, the base is_open, and timing (hold times)
        self._bare = False  # _plain, the base reset and no timing
        self._mux_take = False  # MULTIPLEXED, no timing: Lease inlines the stream hit
        self._mux_fast = False  # ... and the base release_stream: and the clean release
        # None for the base no-op reset: the clean release then calls nothing at all.
        self._reset: Callable[[C], Coroutine[Any, Any, None]] | None = (
            None if type(adapter).reset is Adapter.reset else adapter.reset
        )
        self._idle = self._core.idle  # the fast path's view (the core mutates it in place)
        self._waiters = self._core.waiters  # ... and whether anyone waits (its count)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._timer_ctx = contextvars.Context()  # the timer's work belongs to no caller's trace
        self._work: set[asyncio.Task[Any]] = set()  # connects and pings
        self._closers: set[asyncio.Task[Any]] = set()
        self._warmed: asyncio.Future[None] | None = None
        # The loop that Lease compares thread ids with (see Lease.__aenter__): none until start.
        self._owner: Any = _RunningCheck(None)
        self._drained: asyncio.Event | None = None
        self._close_task: asyncio.Task[None] | None = None
        self._hard_close: asyncio.Event | None = None
        self._use_times: list[float] = []  # hold times, buffered for observers (only if any)
        self._flushed = (0, 0)  # (acquired, waited) at the last observer flush
        self._flush_at = 0.0
        self._observers: list[PoolObserver] = [*observers_for(self), *observers]
        self._refresh_fast()

    def _refresh_fast(self) -> None:
        """Whether Lease may lend an idle connection without asking anything (no is_open to
        call, no start time for observers): recomputed when observers come and go, and at each
        flush (an observer's :meth:`~PoolObserver.wants_use_times` may change)."""
        timing = any(obs.wants_use_times(self) for obs in self._observers)
        self._timing = timing  # leases record their hold time (some observer wants them)
        self._fast = self._simple and self._check_open is None and not timing
        self._timed = self._simple and self._check_open is None and timing
        self._bare = self._plain and self._reset is None and not timing
        self._mux_take = self._mux and not self._instrumented and not timing
        self._mux_fast = (
            self._mux_take and type(self.adapter).release_stream is Adapter.release_stream
        )

    # -- public API -------------------------------------------------------------------------------

    def acquire(self, timeout: float | None = None) -> Lease[C]:
        """Borrow a connection: ``async with pool.acquire() as lease: lease.conn``.

        ``timeout`` defaults to ``acquire_timeout``. Raises (on entry) PoolExhausted after the
        timeout, PoolUnavailable at once when the circuit is open and nothing is idle (or no
        retry can come before the deadline), PoolClosed when closing, PoolLoopError from another
        event loop. Cancellation-safe at every await.
        """
        # Lease(self, timeout), without the Python-level __init__ frame (the hot path: a third of
        # the cost of building the lease); keep these three fields in step with Lease.__init__.
        lease: Lease[C] = _new(Lease)
        lease._pool = self
        lease._timeout = timeout
        lease._state = _NEW
        return lease

    async def lease(self, timeout: float | None = None) -> Lease[C]:
        """Acquire without ``async with`` (frameworks whose connect and disconnect are separate
        calls): ``lease = await pool.lease()``, later ``await lease.release(error=None)``.

        Same errors and guarantees as :meth:`acquire`; a lease never released is what leak
        watching (``leak_threshold``) reports.
        """
        lease = Lease(self, timeout)
        await lease.__aenter__()
        return lease

    async def start(self, *, require_ready: bool = True) -> None:
        """Open ``min_size`` connections concurrently (waves of ``connect_concurrency``).

        Warm-up stops dialing at the first failed wave or once the circuit opens, so boot against
        a dead provider costs about one ``connect_timeout``. If not one could be opened: with
        ``require_ready`` the pool closes itself and raises PoolUnavailable chaining the last
        connect error; without it the pool starts DEGRADED or UNAVAILABLE and keeps probing in
        the background. Cancelling start closes what was opened.
        """
        if self._started or self._close_task is not None:
            raise PoolError(f"pool {self.name!r} was already started", pool=self.name)
        if s_quota := self.settings.quota:
            if self._quota is None:
                from voicepool.quota import shared  # redis-py: only for pools with a quota

                # One client per loop and backend: a worker's pools share its Redis connection.
                # (Before anything starts: without redis-py this raises ConfigError, no leak.)
                self._quota = shared(s_quota.backend, s_quota.timeout)
                self._owns_quota = True
            self._holder = self._quota.holder(self.name)
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._started = True
        # Watch from start (not __init__) to close: adapters may hold process-wide resources
        # per watching pool (the SIP engine), and a pool built but never started must not pin them.
        self.adapter.watch(self._on_conn_changed)
        self._warmed = loop.create_future()
        # A waiter's future: asyncio's create_future is a Python frame around Future(loop=...);
        # other loops (uvloop) make their own.
        self._new_future: Callable[[], asyncio.Future[None]] = (
            functools.partial(asyncio.Future, loop=loop)
            if type(loop).create_future is asyncio.BaseEventLoop.create_future
            else loop.create_future
        )
        self._owner = loop if isinstance(loop, asyncio.BaseEventLoop) else _RunningCheck(loop)
        self._flush_at = self._clock() + _FLUSH_EVERY
        try:
            # Warm-up connects belong to the caller's trace (the boot span); the timer's work
            # (refills, pings) runs in a context of its own, never a child of a span long ended.
            self._apply(self._core.start(self._clock()))
            if self._core.warming:
                await asyncio.shield(self._warmed)
        except BaseException:
            await asyncio.shield(self.aclose(0))
            raise
        core = self._core
        # (A fleet quota that gave nothing yet is not a failure: the pool waits for its share.)
        quota_only = core.quota is not None and core.last_error is None
        if self.min_size and not core.conns and require_ready and not quota_only:
            err = PoolUnavailable(
                f"pool {self.name!r} could not open any of {self.min_size} connections"
                f" ({self.adapter.describe()}): {core.last_error}",
                pool=self.name,
            )
            await self.aclose(0)
            raise err from core.last_error

    async def aclose(self, timeout: float | None = None) -> None:
        """Stop lending (PoolClosed), wait up to ``timeout`` (default ``drain_timeout``) for leases,
        then close every connection through the adapter. Idempotent; safe to cancel (the close goes
        on in the background and a later call awaits it).
        """
        loop = asyncio.get_running_loop()
        if self._hard_close is None:
            self._hard_close = asyncio.Event()
        if self._close_task is None:
            self._close_task = loop.create_task(
                self._close(self.settings.drain_timeout if timeout is None else timeout),
                name=f"voicepool:{self.name}:close",
                context=contextvars.Context(),
            )
        elif timeout is not None:
            # A later, shorter deadline (a second SIGTERM: close hard) cuts a running drain short.
            loop.call_later(max(0.0, timeout), self._hard_close.set)
        await asyncio.shield(self._close_task)

    async def __aenter__(self) -> Pool[C]:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def state(self) -> PoolState:
        """Current state: the lifecycle while new/starting/closing, else the circuit's view."""
        return self._core.state

    @property
    def last_error(self) -> BaseException | None:
        """The last connect error (kept after the circuit closes again)."""
        return self._core.last_error

    @property
    def observers(self) -> tuple[PoolObserver, ...]:
        """The observers attached to this pool (factories' and the ``observers`` argument's)."""
        return tuple(self._observers)

    def stats(self) -> PoolStats:
        """A snapshot; O(number of connections), no I/O, never raises."""
        return self._core.stats()

    def expire_all(self) -> None:
        """Retire every current connection as soon as it is idle, and any connect in flight.

        For credential rotation or an endpoint change: leases in use are never interrupted (a
        connection is closed at its release; a multiplexed one drains), idle ones are replaced
        at the next timer run, and replacements connect with the adapter's current settings.
        Synchronous, never raises.
        """
        self._apply(self._core.expire_all(self._clock()))

    def maintain(self) -> None:
        """Do the timer's work now: expire waiters, a health pass, the observers' flush.

        The pool runs this itself when due; tests on a fake ``clock`` call it after moving time.
        """
        now = self._clock()
        self._apply(self._core.tick(now, health=True))
        if self._observers:
            self._flush(now)

    # -- run-time sizing and observers: the public seams PoolGroup is built on ------------------

    def lease_nowait(self) -> Lease[C] | None:
        """A held lease if a connection (or stream) is free right now, else None.

        Never waits, never connects, never raises: a pool that is not lending (not started,
        closing, or nothing free) answers None. Release the lease as usual.
        """
        core = self._core
        if not self._started or core.closing:
            return None
        now = self._clock()
        rec, actions = core.take(now)
        if actions:
            self._apply(actions)
        if rec is None:
            return None
        lease = Lease(self, None)
        self._lend(lease, rec, rec.seq if self._mux else None, now)
        lease._state = _HELD
        if self._instrumented:
            lease._leak = None
            if self._leak_threshold is not None:
                stack = "".join(traceback.format_list(traceback.extract_stack(limit=12)[:-1]))
                loop = asyncio.get_running_loop()
                lease._leak = loop.call_later(self._leak_threshold, self._report_leak, stack)
        return lease

    def set_min_size(self, min_size: int) -> None:
        """Change the warm floor at run time (a standby member of a group grows or shrinks).

        Growing opens the missing connections in the background (with the usual backoff);
        shrinking closes idle connections above the new floor at once, oldest first, and never
        touches a lease in use. Raises ValueError outside ``0 <= min_size <= max_size``.
        Synchronous.
        """
        if not 0 <= min_size <= self.max_size:
            raise ValueError(
                f"pool {self.name!r}: min_size must be within 0..{self.max_size}, got {min_size}"
            )
        self.min_size = min_size
        self._apply(self._core.set_min_size(min_size, self._clock()))

    def add_observer(self, observer: PoolObserver) -> None:
        """Attach ``observer`` (a :class:`voicepool._engine.observer.PoolObserver`) from now on."""
        if observer not in self._observers:
            self._observers.append(observer)
            self._refresh_fast()

    def remove_observer(self, observer: PoolObserver) -> None:
        """Detach an observer added with :meth:`add_observer`; unknown ones are ignored."""
        if observer in self._observers:
            self._observers.remove(observer)
            self._refresh_fast()

    def __repr__(self) -> str:
        core = self._core
        return (
            f"<Pool {self.name!r} {core.state.value} size={len(core.conns)}/{self.max_size}"
            f" opening={core.opening} waiters={core.waiters.count}>"
        )

    # -- acquire (the part Lease does not inline) ------------------------------------------------

    def _wrong_loop(self) -> PoolLoopError:
        loop = asyncio.get_running_loop()
        return PoolLoopError(
            f"pool {self.name!r} was started on event loop {self._loop!r} and cannot be used"
            f" from event loop {loop!r}: build one pool per event loop",
            pool=self.name,
        )

    async def _acquire(self, lease: Lease[C], traced: bool = False) -> None:
        """Take without waiting, else queue FIFO; see :meth:`acquire` for what escapes.

        ``traced``: called by :meth:`_acquire_instrumented`, which wraps this one. (Lease does
        the same itself, without this coroutine, for a pool that is not instrumented.)"""
        if self._instrumented and not traced:
            self._check_caller()
            await self._acquire_instrumented(lease)
            return
        waiter = self._begin(lease)
        if waiter is None:
            return
        try:
            await waiter.future
        except BaseException as exc:
            self._abandon(waiter, exc)
            raise
        self._served(lease, waiter)

    def _check_caller(self) -> None:
        """Raises PoolClosed / PoolError (not started) / PoolLoopError."""
        if not self._started:
            if self._close_task is not None:
                raise PoolClosed(f"pool {self.name!r} is closed", pool=self.name)
            raise PoolError(
                f"pool {self.name!r} is not started: use `async with pool` or await pool.start()",
                pool=self.name,
            )
        if self._owner._thread_id != threading.get_ident():  # (see Lease.__aenter__)
            raise self._wrong_loop()

    def _begin(self, lease: Lease[C]) -> Waiter | None:
        """Lend at once (returns None) or queue a waiter whose ``future`` the caller awaits, then
        hands to :meth:`_served` or, if that await raised, to :meth:`_abandon`. Synchronous:
        nothing is queued if it raises (the errors of :meth:`acquire`)."""
        if not self._started or self._owner._thread_id != _get_ident():
            self._check_caller()
        core = self._core
        t0 = self._clock()
        if not core.closing and (core.idle or self._mux):  # (nothing to take from empty idle)
            rec, actions = core.take(t0)
            if actions:
                self._apply(actions)
            if rec is not None:
                self._lend(lease, rec, rec.seq if self._mux else None, t0)
                return None
        timeout = self._acquire_timeout if lease._timeout is None else lease._timeout
        fut = self._new_future()
        # Waiter(t0 + timeout, timeout, fut) without its __init__ frame (every contended acquire
        # builds one); keep these fields in step with Waiter.__init__.
        waiter: Waiter = _new(Waiter)
        waiter.deadline = t0 + timeout
        waiter.timeout = timeout
        waiter.future = fut
        waiter.rec = None
        waiter.stream_id = None
        waiter.state = WAITING
        waiter.exhausted = False
        actions = core.wait(waiter, t0)
        if actions:  # (a Fail is an action: with none, the future is pending)
            self._apply(actions)
            if fut.done():  # failed at once: closed, circuit open, or no retry in time
                err = fut.exception()
                assert err is not None
                if isinstance(err, PoolUnavailable):
                    for obs in self._observers:
                        obs.on_unavailable(self, err)
                raise err
        if waiter.exhausted and self._observers:
            for obs in self._observers:
                obs.on_exhausted(self)
        return waiter

    def _abandon(self, waiter: Waiter, exc: BaseException) -> None:
        """The await of a queued waiter raised ``exc`` (timeout, cancelled): undo; a grant this
        caller never took passes to the next waiter."""
        core = self._core
        now = self._clock()
        waited = now - (waiter.deadline - waiter.timeout)
        self._apply(core.give_up(waiter, now))
        if isinstance(exc, PoolExhausted):
            core.timed_out(waited)
            for obs in self._observers:
                obs.on_timeout(self, waited, exc)
        else:
            for obs in self._observers:
                obs.on_wait_failed(self, waited, exc)

    def _served(self, lease: Lease[C], waiter: Waiter) -> None:
        """A queued waiter's grant arrived: the lease holds it."""
        now = self._clock()
        waited = now - (waiter.deadline - waiter.timeout)
        self._core.served(waiter, waited)
        if self._observers:
            for obs in self._observers:
                obs.on_waited(self, waited)
        rec = waiter.rec
        assert rec is not None
        lease._rec = rec
        lease._t0 = now
        if waiter.stream_id is not None:
            lease._sid = waiter.stream_id

    def _lend(self, lease: Lease[C], rec: ConnRecord[C], sid: int | None, now: float) -> None:
        lease._rec = rec
        if sid is not None:
            lease._sid = sid
        lease._t0 = now

    async def _acquire_instrumented(self, lease: Lease[C]) -> None:
        """Acquire with per-acquire observer hooks (trace_acquire) and leak watching."""
        lease._leak = None
        tokens = (
            [obs.acquire_started(self) for obs in self._observers]
            if self.settings.trace_acquire
            else []
        )
        error: BaseException | None = None
        try:
            await self._acquire(lease, traced=True)
        except BaseException as exc:
            error = exc
            raise
        finally:
            for obs, tok in zip(self._observers, tokens, strict=False):
                obs.on_acquire_end(self, tok, lease, error)
        if self._leak_threshold is not None:
            stack = "".join(traceback.format_list(traceback.extract_stack(limit=12)[:-3]))
            lease._leak = asyncio.get_running_loop().call_later(
                self._leak_threshold, self._report_leak, stack
            )

    def _report_leak(self, stack: str) -> None:
        log.warning(
            "pool %s: a lease has been held for more than %gs (possible leak); acquired at:\n%s",
            self.name,
            self._leak_threshold,
            stack,
            extra=self._extra,
        )

    # -- release (the part Lease does not inline) ------------------------------------------------

    def _record_use(self, lease: Lease[C], now: float) -> None:
        """Buffer a lease hold time for observers (bounded; flushed by the timer). A lease taken
        before hold times were wanted has no start time: it is not counted."""
        if len(self._use_times) < _MAX_BUFFERED:
            try:
                self._use_times.append(now - lease._t0)
            except AttributeError:
                pass

    async def _finish_reset(
        self, rec: ConnRecord[C], coro: Coroutine[Any, Any, None], first: Any
    ) -> None:
        """A reset that suspended: await the rest under ``connect_timeout``.

        Cancellation-safe: a cancelled or failed reset discards the connection (its state is then
        unknown); the bookkeeping runs in ``finally``.
        """
        how = "reset_failed"
        try:
            await calls.finish_reset(coro, first, self.settings.connect_timeout)
            how = "ok" if self._is_open(rec.conn) else "reset_failed"
        except Exception as err:
            log.debug("pool %s: reset failed: %r", self.name, err, extra=self._extra)
        finally:
            self._apply(self._core.released(rec, self._clock(), how))

    def _reset_failed(self, rec: ConnRecord[C], now: float, err: BaseException) -> None:
        log.debug("pool %s: reset failed: %r", self.name, err, extra=self._extra)
        self._apply(self._core.released(rec, now, "reset_failed"))

    async def _release_slow(
        self, lease: Lease[C], exc: BaseException | None, reason: str | None
    ) -> None:
        """Release with a discard (``reason``), an error, single use, or a stream to end (no
        clean EXCLUSIVE release comes here: Lease does those). Cancellation-safe (bookkeeping in
        ``finally``)."""
        rec = lease._rec
        now = self._clock()
        if self._timing:
            self._record_use(lease, now)
        if self._mux:
            await self._release_stream(lease, rec, exc, reason)
            return
        if reason is not None:
            how = "discarded"
        elif exc is not None:
            how = "error"
        elif self.lease_mode is LeaseMode.SINGLE_USE:
            how = "ok"  # used, whatever state the call left it in: the core closes it
        elif not self._is_open(rec.conn):
            how = "remote_closed"
        else:
            how = "ok"
        self._apply(self._core.released(rec, now, how))

    async def _release_stream(
        self, lease: Lease[C], rec: ConnRecord[C], exc: BaseException | None, reason: str | None
    ) -> None:
        keep = False
        err: BaseException | None = exc
        if err is None and reason is not None:
            err = VoicepoolError(f"lease discarded: {reason}")
        why = "discarded" if reason is not None else ("error" if exc is not None else None)
        try:
            if rec.state is not ConnState.CLOSED:
                # Driven once here: a release_stream that completes without suspending (most
                # do: they free local state and queue a frame) costs no extra coroutine level.
                coro = self.adapter.release_stream(rec.conn, lease.stream_id or 0, err)
                try:
                    first = coro.send(None)
                except StopIteration as done:
                    keep = bool(done.value)
                except Exception as e:
                    log.debug("pool %s: release_stream failed: %r", self.name, e, extra=self._extra)
                else:
                    try:
                        keep = bool(await calls.Resume(coro, first))
                    except Exception as e:
                        log.debug(
                            "pool %s: release_stream failed: %r", self.name, e, extra=self._extra
                        )
        except asyncio.CancelledError:
            # Cancelled mid-release: the stream's fate is the adapter's (it frees its local state
            # before its first await); the shared connection is judged by is_open alone.
            keep = self._is_open(rec.conn)
            raise
        finally:
            self._apply(self._core.stream_released(rec, self._clock(), keep, why))

    # -- performing actions ---------------------------------------------------------------------

    def _apply(self, actions: Sequence[Action]) -> None:
        """Perform the core's actions in order. Decides nothing."""
        for a in actions:
            cls = a.__class__
            if cls is Grant:
                fut = a.waiter.future  # type: ignore[union-attr]
                if not fut.done():
                    fut.set_result(None)
            elif cls is Close:
                self._close_conn(a)  # type: ignore[arg-type]
            elif cls is Connect:
                self._spawn_connect(a)  # type: ignore[arg-type]
            elif cls is Ping:
                self._spawn(self._ping(a.rec), self._work)  # type: ignore[union-attr]
            elif cls is Fail:
                fut = a.waiter.future  # type: ignore[union-attr]
                if not fut.done():
                    fut.set_exception(a.error)  # type: ignore[union-attr]
            elif cls is Wake:
                self._arm(a.at)  # type: ignore[union-attr]
            elif cls is StateChanged:
                self._state_changed(a)  # type: ignore[arg-type]
            elif cls is Alarm:
                self._alarm(a)  # type: ignore[arg-type]
            elif cls is QuotaSync:
                self._quota_sync(a)  # type: ignore[arg-type]
        core = self._core
        if core.closing and self._drained is not None and not core.busy:
            self._drained.set()

    def _arm(self, at: float) -> None:
        """The one timer: re-armed only for an earlier time than it already has."""
        if at >= self._timer_at or self._loop is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        delay = max(0.0, at - self._clock())
        self._timer = self._loop.call_later(delay, self._on_timer, context=self._timer_ctx)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        now = self._clock()
        self._apply(self._core.tick(now))
        if self._observers and not self._core.closing:
            if now >= self._flush_at:
                self._flush(now)
            self._arm(self._flush_at)

    def _flush(self, now: float) -> None:
        """Hand buffered hold times and the no-wait acquire count to observers (background)."""
        self._flush_at = now + _FLUSH_EVERY
        self._refresh_fast()  # (whether observers want hold times may have changed)
        core = self._core
        if not (self._use_times or core.n_acquired != self._flushed[0] or core.n_timeouts):
            return
        uses, self._use_times = self._use_times, []
        acquired, waited = core.n_acquired, core.n_waited
        zero = (acquired - self._flushed[0]) - (waited - self._flushed[1])
        self._flushed = (acquired, waited)
        for obs in self._observers:
            obs.on_flush(self, uses, max(0, zero))

    def _state_changed(self, a: StateChanged) -> None:
        log.debug("pool %s: %s -> %s", self.name, a.old.value, a.new.value, extra=self._extra)
        if a.new is PoolState.UNAVAILABLE:
            log.warning(
                "pool %s: circuit open: %s", self.name, self._core.last_error, extra=self._extra
            )
        elif a.old is PoolState.UNAVAILABLE and a.new is PoolState.READY:
            log.warning(
                "pool %s: circuit closed, provider reachable again", self.name, extra=self._extra
            )
        for obs in self._observers:
            obs.on_state(self, a.old, a.new)
        if a.old is PoolState.STARTING and self._warmed is not None and not self._warmed.done():
            self._warmed.set_result(None)

    def _alarm(self, a: Alarm) -> None:
        limit = self.settings.alarm_wait_p95_ms
        core = self._core
        if a.firing:
            log.warning(
                "pool %s: acquire-wait p95 %.1f ms is above %.1f ms over the last %gs (%d acquires,"
                " size %d/%d, waiters %d)",
                self.name,
                a.p95 * 1e3,
                limit,
                core.window.length,
                a.count,
                len(core.conns),
                self.max_size,
                core.waiters.count,
                extra=self._extra,
            )
        else:
            log.warning(
                "pool %s: acquire-wait p95 back to %.1f ms (threshold %.1f ms)",
                self.name,
                a.p95 * 1e3,
                limit,
                extra=self._extra,
            )
        for obs in self._observers:
            obs.on_alarm(self, a.p95, a.firing)

    def _close_conn(self, a: Close) -> None:
        for obs in self._observers:
            obs.on_closed(self, a.reason)
        log.debug(
            "pool %s: connection #%d closed (%s)", self.name, a.rec.id, a.reason, extra=self._extra
        )
        if self._core.quota is None:
            self._spawn(calls.close(self.adapter, a.rec.conn, self.name), self._closers)
        else:
            self._spawn(self._close_counted(a.rec), self._closers)

    async def _close_counted(self, rec: ConnRecord[C]) -> None:
        """Close, then free the fleet quota's token (not before: the provider still counts it)."""
        try:
            await calls.close(self.adapter, rec.conn, self.name)
        finally:
            self._apply(self._core.quota_closed(rec, self._clock()))

    def _spawn(self, coro: Coroutine[Any, Any, None], into: set[asyncio.Task[Any]]) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coro)
        into.add(task)
        task.add_done_callback(into.discard)

    # -- connects and pings ----------------------------------------------------------------------

    def _spawn_connect(self, a: Connect) -> None:
        """Connect into the slot the core counted. The current context: a connect started for a
        waiting caller is part of its trace (it shows why the call waited)."""
        assert self._loop is not None
        ran = [False]
        task = self._loop.create_task(self._connect(a, ran))
        self._work.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self._work.discard(task)
            if not ran[0]:  # cancelled before it ran: nothing reported its slot
                self._apply(self._core.connect_cancelled(a, self._clock()))

        task.add_done_callback(done)

    async def _connect(self, a: Connect, ran: list[bool]) -> None:
        ran[0] = True
        tokens = [obs.connect_started(self) for obs in self._observers]
        t0 = self._clock()
        try:
            conn = await calls.connect(self.adapter, self.settings.connect_timeout)
        except ConnectError as err:
            self._connected(tokens, t0, err)
            log.debug("pool %s: connect failed: %s", self.name, err, extra=self._extra)
            fatal = calls.is_fatal(self.adapter, err)
            self._apply(self._core.connect_failed(a, err, fatal, self._clock()))
            return
        except BaseException as exc:  # cancelled (the pool is closing)
            self._connected(tokens, t0, exc)
            self._apply(self._core.connect_cancelled(a, self._clock()))
            raise
        duration = self._connected(tokens, t0, None)
        log.debug(
            "pool %s: connection open in %.1f ms", self.name, duration * 1e3, extra=self._extra
        )
        cap = self.adapter.stream_capacity(conn) if self._mux else 1
        self._apply(self._core.connected(a, conn, self._clock(), cap))

    def _connected(self, tokens: list[object], t0: float, err: BaseException | None) -> float:
        duration = self._clock() - t0
        for obs, tok in zip(self._observers, tokens, strict=True):
            obs.on_connected(self, tok, duration, err)
        return duration

    async def _ping(self, rec: ConnRecord[C]) -> None:
        t0 = self._clock()
        try:
            error = await calls.ping(self.adapter, rec.conn, self.settings.ping_timeout)
        except asyncio.CancelledError:
            self._apply(self._core.ping_cancelled(rec, self._clock()))
            raise
        now = self._clock()
        for obs in self._observers:
            obs.on_ping(self, now - t0, error)
        ok = error is None and self._is_open(rec.conn)
        if not ok:
            log.debug(
                "pool %s: ping of #%d failed: %r", self.name, rec.id, error, extra=self._extra
            )
        self._apply(self._core.pinged(rec, ok, now, now - t0))

    def _quota_sync(self, a: QuotaSync) -> None:
        """Perform one :class:`QuotaSync`. An urgent one (callers wait for it) is started here,
        in the step that asked: the backend writes its request before that step ends (no task
        hop first: in a busy loop a hop is a whole loop iteration); its answer, and every other
        sync, is awaited in a task (:meth:`_quota_done`)."""
        if a.waiting <= 0:
            self._spawn(self._quota_done(a, None), self._work)
            return
        call = self._quota_call(a, urgent=True)  # callers wait: no batching with other pools
        # Driven up to its first suspension now (QuotaBackend.sync says what that part may do).
        started: calls.Resume | QuotaGrant | Exception
        try:
            started = calls.Resume(call, call.send(None))
        except StopIteration as done:
            started = done.value
        except Exception as err:
            started = err
        self._spawn(self._quota_done(a, started), self._work)

    def _quota_call(self, a: QuotaSync, urgent: bool) -> Coroutine[Any, Any, QuotaGrant]:
        qs, backend, gate = self.settings.quota, self._quota, self._core.quota
        assert qs is not None
        assert backend is not None
        assert gate is not None
        return backend.sync(
            qs.key,
            self._holder,
            want=a.want,
            claimed=a.claimed,
            waiting=a.waiting,
            busy=a.busy,
            limit=qs.limit,
            ttl=qs.ttl,
            step=gate.per,
            recover=min(qs.ttl, 2 * qs.refresh),  # every live holder syncs within it
            urgent=urgent,
        )

    async def _quota_done(
        self, a: QuotaSync, started: calls.Resume | QuotaGrant | Exception | None
    ) -> None:
        """The answer of one sync (``started``: what its first step came to, None when not
        started yet), under the quota's ``timeout``. A backend error never reaches a caller:
        the core keeps the reservation and retries after ``refresh``; the first error of an
        outage is logged (once), and the return."""
        qs = self.settings.quota
        gate = self._core.quota
        assert qs is not None
        assert gate is not None
        try:
            async with asyncio.timeout(qs.timeout):
                if started is None:
                    grant = await self._quota_call(a, urgent=False)
                elif isinstance(started, calls.Resume):
                    grant = await started
                elif isinstance(started, Exception):
                    raise started
                else:
                    grant = started
        except asyncio.CancelledError:
            self._core.quota_cancelled()
            raise
        except Exception as err:
            if gate.online:
                log.warning(
                    "pool %s: fleet quota %r: backend unreachable (%s); serving from the"
                    " reservation of %d tokens, opening nothing beyond it",
                    self.name,
                    qs.key,
                    describe_error(err),
                    gate.granted,
                    extra=self._extra,
                )
            self._apply(self._core.quota_failed(self._clock()))
            return
        if not gate.online:
            log.warning(
                "pool %s: fleet quota %r: backend reachable again (%d of %d tokens held here)",
                self.name,
                qs.key,
                grant.granted,
                qs.limit,
                extra=self._extra,
            )
        self._apply(self._core.quota_synced(grant, self._clock()))

    async def _quota_release(self) -> None:
        """At close: give every token back now (not after the TTL); best effort, bounded."""
        qs, backend = self.settings.quota, self._quota
        if qs is None or backend is None:
            return
        try:
            async with asyncio.timeout(qs.timeout):
                await backend.sync(
                    qs.key,
                    self._holder,
                    want=0,
                    claimed=0,
                    waiting=0,
                    busy=0,
                    limit=qs.limit,
                    ttl=qs.ttl,
                )
        except Exception as err:
            log.debug("pool %s: quota release failed: %r", self.name, err, extra=self._extra)
        if self._owns_quota:
            from voicepool.quota import FleetQuota, release_shared

            assert isinstance(backend, FleetQuota)
            await release_shared(backend)

    def _on_conn_changed(self, conn: Any) -> None:
        """Adapter callback: re-read ``conn``'s capacity and liveness now."""
        rec = self._core.by_conn.get(id(conn))
        if rec is None:
            return
        is_open = self._is_open(conn)
        if (
            not is_open
            and self._observers
            and not self._core.closing
            and (rec.state is ConnState.IN_USE or (self._mux and rec.streams > 0))
        ):
            # Retired only when its lease ends: observers hear of the loss now.
            reason = self.adapter.close_reason(conn) or "remote_closed"
            for obs in self._observers:
                obs.on_lost_in_use(self, reason)
        cap = self.adapter.stream_capacity(conn) if self._mux and is_open else 1
        self._apply(self._core.changed(conn, is_open, cap, self._clock()))

    # -- close ----------------------------------------------------------------------------------

    @property
    def _extra(self) -> dict[str, str]:
        return {"voicepool.pool.name": self.name}

    async def _close(self, timeout: float) -> None:
        core = self._core
        self._drained = asyncio.Event()
        self._apply(core.close(self._clock()))
        tasks = list(self._work)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if core.busy:
            assert self._hard_close is not None
            drained = asyncio.ensure_future(self._drained.wait())
            hard = asyncio.ensure_future(self._hard_close.wait())
            try:
                await asyncio.wait([drained, hard], timeout=timeout, return_when="FIRST_COMPLETED")
            finally:
                drained.cancel()
                hard.cancel()
            held = core.stats().in_use
            if held:
                log.warning(
                    "pool %s: %d leases still held at the drain deadline; closing them",
                    self.name,
                    held,
                    extra=self._extra,
                )
        self._apply(core.close_all(self._clock()))
        if self._closers:
            await asyncio.wait(list(self._closers), timeout=calls.CLOSE_TIMEOUT + 1)
        if core.quota is not None and self._started:
            await self._quota_release()
        self.adapter.unwatch(self._on_conn_changed)
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_at = None, math.inf
        if self._observers:
            self._flush(self._clock())
        self._apply(core.closed(self._clock()))
        for obs in self._observers:
            obs.on_pool_closed(self)


def _gate(s: PoolSettings, mode: LeaseMode, max_streams: int) -> QuotaGate | None:
    """The core's side of ``s.quota``: a MULTIPLEXED connection counts ``max_streams`` tokens
    when the provider counts streams (it may carry that many), every other connection one."""
    q = s.quota
    if q is None:
        return None
    per = max_streams if q.unit == "stream" and mode is LeaseMode.MULTIPLEXED else 1
    return QuotaGate(q.key, q.limit, per, q.refresh, q.poll)

"""`Pool[C]`: a bounded, warm, health-checked, cancellation-safe pool of one adapter's connections.

How it is built (see DESIGN.md, "The engine"):

* Bookkeeping is synchronous. ``_take``, ``_deliver``, ``_release_idle``, ``_retire`` and ``_grow``
  never await: they decide who gets which connection and which connects to start, then the awaits
  (connect, ping, reset, close) run in tasks the pool owns.
* A slot is counted (``_opening``) before a handshake starts, so racing acquires cannot over-open.
* Connects run in pool tasks, not in the caller: a waiter that gives up leaves the connection to
  the next waiter, and a release while connects are failing serves the waiter at once.
* Closes run in background tasks, so a cancelled caller never interrupts a polite close.

The engine's other parts, in ``voicepool._engine``: ``connect`` (how many to open, the connect,
backoff, circuit), ``waiters`` (FIFO, deadlines on one timer), ``release`` (reset, discard, end of
stream), ``health`` (pings, retirement, refill, the wait alarm), ``drain`` (close), ``leak``.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

from voicepool._engine.connect import connect_failed, grow, open_one, spawn_connect
from voicepool._engine.drain import _CLOSE_TIMEOUT, close
from voicepool._engine.health import maintain, run_health
from voicepool._engine.leak import watch_leak
from voicepool._engine.observer import PoolObserver, observers_for
from voicepool._engine.record import ConnRecord, ConnState
from voicepool._engine.release import after_stream_end, release_slow
from voicepool._engine.state import PoolState, PoolStats
from voicepool._engine.waiters import (
    Waiter,
    WaitExpired,
    abandon,
    arm_timer,
    exhausted_message,
)
from voicepool._engine.waitwindow import WaitWindow
from voicepool.adapter import Adapter, LeaseMode
from voicepool.errors import (
    PoolClosed,
    PoolError,
    PoolExhausted,
    PoolUnavailable,
)
from voicepool.lease import Lease
from voicepool.pool_settings import PoolSettings

__all__ = ["Pool", "PoolState", "PoolStats"]

C = TypeVar("C")
log = logging.getLogger("voicepool.pool")
# Close reasons the pool infers (drained, closed by the peer): the adapter may name them better
# (an HTTP/2 GOAWAY is "goaway", not "expired").
_PEER_NAMED = frozenset({"expired", "remote_closed"})


_MAX_BUFFERED = 4096  # hold times buffered for observers between flushes (about a second)


class Pool(Generic[C]):
    """Connections of type ``C`` produced by one :class:`~voicepool.Adapter`.

    ``async with Pool(adapter, settings, name="asr") as pool:`` starts (warms) and closes it;
    ``async with pool.acquire() as lease:`` borrows a connection. See DESIGN.md for the contract.
    """

    def __init__(
        self,
        adapter: Adapter[C],
        settings: PoolSettings | None = None,
        *,
        name: str,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.name = name
        self.adapter = adapter
        self.settings = s = settings if settings is not None else PoolSettings()
        sizing = s.resolve(adapter)
        self.lease_mode = sizing.lease_mode
        self.min_size = sizing.min_size
        self.max_size = sizing.max_size
        self.max_streams = sizing.max_streams
        self._clock = clock or time.monotonic
        self._mux = sizing.lease_mode is LeaseMode.MULTIPLEXED
        self._single_use = sizing.lease_mode is LeaseMode.SINGLE_USE
        # EXCLUSIVE with the base no-op reset can release without creating a coroutine.
        self._fast_release = (
            sizing.lease_mode is LeaseMode.EXCLUSIVE and type(adapter).reset is Adapter.reset
        )
        self._take: Callable[[Lease[C]], bool] = self._take_stream if self._mux else self._take_idle
        self._is_open = adapter.is_open
        self._leak_threshold = s.leak_threshold
        self._instrumented = s.leak_threshold is not None or s.trace_acquire
        # Lease inlines the idle fast path for these (see Lease.__aenter__ / __aexit__).
        self._simple = not self._mux and not self._instrumented
        self._fast_release = self._fast_release and not self._instrumented
        self._acquire_timeout = s.acquire_timeout
        interval = s.ping_interval
        if adapter.max_idle is not None:
            # Keep well under the provider's idle close (Deepgram ~10 s): ping at half of it.
            interval = min(interval, adapter.max_idle / 2)
        self._ping_interval = interval

        self._idle: deque[ConnRecord[C]] = deque()  # EXCLUSIVE / SINGLE_USE; LIFO at the right
        self._conns: dict[int, ConnRecord[C]] = {}  # every open connection, by record id
        self._by_conn: dict[int, ConnRecord[C]] = {}  # id(conn) -> record, for adapter callbacks
        self._mux_conns: list[ConnRecord[C]] = []  # MULTIPLEXED connections that may take streams
        # FIFO of (future, deadline in loop time). One pool timer, armed for the earliest
        # deadline, expires them: a TimerHandle per waiter costs heap churn under contention.
        self._waiters: deque[tuple[Waiter, float]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._opening = 0
        self._next_id = 0
        self._generation = 0  # bumped by expire_all(): connects started before it retire

        self._lifecycle = PoolState.NEW
        self._reported_state = PoolState.NEW
        self._started = False
        self._warming = False
        self._closing = False
        self._circuit_open = False
        self._consecutive_failures = 0
        self._retry_at = 0.0
        self._last_error: BaseException | None = None

        self._n_acquired = 0
        self._n_exhausted = 0
        self._n_timeouts = 0
        self._n_unavailable = 0
        self._n_connects = 0
        self._n_connect_failures = 0
        self._closed_by: dict[str, int] = {}
        self._n_waited = 0
        self._use_times: list[float] = []  # hold times, buffered for observers (only if any)
        self._flushed = (0, 0)  # (acquired, waited) at the last observer flush

        self._window = WaitWindow(s.alarm_window, self._clock())
        self._alarm_firing = False
        self._work: set[asyncio.Task[Any]] = set()  # connects and pings
        self._closers: set[asyncio.Task[Any]] = set()
        self._health_task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._drained: asyncio.Event | None = None
        self._close_task: asyncio.Task[None] | None = None
        self._hard_close: asyncio.Event | None = None
        self._observers: list[PoolObserver] = observers_for(self)

    # -- public API -------------------------------------------------------------------------------

    def acquire(self, timeout: float | None = None) -> Lease[C]:
        """Borrow a connection: ``async with pool.acquire() as lease: lease.conn``.

        ``timeout`` defaults to ``acquire_timeout``. Raises (on entry) PoolExhausted after the
        timeout, PoolUnavailable at once when the circuit is open and nothing is idle, PoolClosed
        when closing. Cancellation-safe at every await.
        """
        return Lease(self, timeout)

    async def start(self, *, require_ready: bool = True) -> None:
        """Open ``min_size`` connections concurrently (at most ``connect_concurrency`` at a time).

        If not one could be opened: with ``require_ready`` the pool closes itself and raises
        PoolUnavailable chaining the last connect error; without it the pool starts UNAVAILABLE or
        DEGRADED and keeps probing in the background. Cancelling start closes what was opened.
        """
        if self._started or self._closing:
            raise PoolError(f"pool {self.name!r} was already started", pool=self.name)
        loop = asyncio.get_running_loop()
        self._started = True
        self._warming = True
        # Watch from start (not __init__) to close: adapters may hold process-wide resources
        # per watching pool (the SIP engine), and a pool that is built but never started must
        # not pin them.
        self.adapter.watch(self._on_conn_changed)
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._window.start = self._clock()
        self._set_lifecycle(PoolState.STARTING)
        gate = asyncio.Semaphore(self.settings.connect_concurrency)

        async def warm_one() -> None:
            async with gate:
                if self._closing or len(self._conns) + self._opening >= self.max_size:
                    return
                self._opening += 1
                await self._open_one()

        try:
            await asyncio.gather(*(warm_one() for _ in range(self.min_size)))
        except BaseException:
            self._warming = False
            await asyncio.shield(self.aclose(0))
            raise
        self._warming = False
        if self.min_size and not self._conns and require_ready:
            err = PoolUnavailable(
                f"pool {self.name!r} could not open any of {self.min_size} connections"
                f" ({self.adapter.describe()}): {self._last_error}",
                pool=self.name,
            )
            await self.aclose(0)
            raise err from self._last_error
        self._set_lifecycle(PoolState.READY)
        self._health_task = loop.create_task(
            # A fresh context: refills and pings must not become children of whatever span was
            # current when start() ran (a boot span that ends long before them).
            run_health(self),
            name=f"voicepool:{self.name}:health",
            context=contextvars.Context(),
        )
        self._grow()

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
        if self._lifecycle is not PoolState.READY:
            return self._lifecycle
        if self._circuit_open:
            return PoolState.UNAVAILABLE
        if len(self._conns) < self.min_size and self._consecutive_failures:
            return PoolState.DEGRADED
        return PoolState.READY

    @property
    def last_error(self) -> BaseException | None:
        """The last connect error (None after a success closed the circuit... it is kept)."""
        return self._last_error

    def stats(self) -> PoolStats:
        """A snapshot; O(number of connections), no I/O, never raises."""
        conns = list(self._conns.values())  # a copy: exporters may call this from their thread
        if self._mux:
            in_use = sum(1 for r in conns if r.streams)
            streams = sum(r.streams for r in conns)
        else:
            in_use = sum(1 for r in conns if r.state is ConnState.IN_USE)
            streams = in_use
        return PoolStats(
            name=self.name,
            state=self.state,
            size=len(self._conns),
            idle=len(self._conns) - in_use,
            in_use=in_use,
            opening=self._opening,
            waiters=len(self._waiters),
            streams_in_use=streams,
            min_size=self.min_size,
            max_size=self.max_size,
            acquired=self._n_acquired,
            exhausted=self._n_exhausted,
            timeouts=self._n_timeouts,
            unavailable=self._n_unavailable,
            connects=self._n_connects,
            connect_failures=self._n_connect_failures,
            closed=dict(self._closed_by),
            wait_p95_ms=self._window.current(self._n_acquired) * 1000.0,
            last_error=None if self._last_error is None else str(self._last_error),
        )

    def expire_all(self) -> None:
        """Retire every current connection as soon as it is idle, and any connect in flight.

        For credential rotation or an endpoint change: leases in use are never interrupted (a
        connection is closed at its release; a multiplexed one drains), idle ones are replaced
        at the next health pass, and replacements connect with the adapter's current settings.
        Synchronous, never raises.
        """
        self._generation += 1
        for rec in self._conns.values():
            rec.expires = -math.inf
        self._poke()

    def _maintain(self, now: float | None = None) -> float:
        """Run one health pass (tests drive it with a fake clock); returns the next due time."""
        return maintain(self, self._clock() if now is None else now)

    def __repr__(self) -> str:
        return (
            f"<Pool {self.name!r} {self.state.value} size={len(self._conns)}/{self.max_size}"
            f" opening={self._opening} waiters={len(self._waiters)}>"
        )

    # -- acquire --------------------------------------------------------------------------------

    def _take_idle(self, lease: Lease[C]) -> bool:
        """Fast path (EXCLUSIVE / SINGLE_USE): pop the most recently used idle connection."""
        idle = self._idle
        while idle:
            rec = idle.pop()
            if self._is_open(rec.conn):
                rec.state = ConnState.IN_USE
                lease._rec = rec
                lease._conn = rec.conn
                lease._t0 = self._clock()
                self._n_acquired += 1
                return True
            self._retire(rec, "remote_closed")
        return False

    def _take_stream(self, lease: Lease[C]) -> bool:
        """Fast path (MULTIPLEXED): a stream on the least-loaded connection with room."""
        while True:
            best: ConnRecord[C] | None = None
            load = 1 << 30
            free = 0
            for rec in self._mux_conns:
                room = rec.cap - rec.streams
                if room > 0:
                    free += room
                    if rec.streams < load:
                        best, load = rec, rec.streams
            if best is None:
                return False
            if not self._is_open(best.conn):
                self._retire(best, "remote_closed")
                continue
            best.streams += 1
            best.seq += 1
            lease._rec = best
            lease._conn = best.conn
            lease.stream_id = best.seq
            lease._t0 = self._clock()
            self._n_acquired += 1
            if free == 1:
                self._grow()  # that was the last free stream: open another while we still can
            return True

    async def _acquire_slow(self, lease: Lease[C]) -> None:
        """Queue FIFO for a connection; see :meth:`acquire` for what escapes."""
        if self._closing:
            raise PoolClosed(f"pool {self.name!r} is closed", pool=self.name)
        if not self._started:
            raise PoolError(
                f"pool {self.name!r} is not started: use `async with pool` or await pool.start()",
                pool=self.name,
            )
        if self._circuit_open:
            self._n_unavailable += 1
            err = PoolUnavailable(
                f"pool {self.name!r} is unavailable (circuit open after"
                f" {self._consecutive_failures} connect failures): {self._last_error}",
                pool=self.name,
            )
            for obs in self._observers:
                obs.on_unavailable(self, err)
            raise err from self._last_error
        loop = asyncio.get_running_loop()
        fut: Waiter = loop.create_future()
        timeout = self._acquire_timeout if lease._timeout is None else lease._timeout
        deadline = loop.time() + timeout
        self._waiters.append((fut, deadline))
        if deadline < self._timer_at:
            self._arm_timer(loop, deadline)
        self._grow()
        if len(self._conns) + self._opening >= self.max_size:
            self._n_exhausted += 1
            for obs in self._observers:
                obs.on_exhausted(self)
        t0 = self._clock()
        try:
            rec, sid = await fut
        except BaseException as exc:
            timed_out = isinstance(exc, WaitExpired)
            # The timer already took this waiter out of the queue: count it back in.
            message = self._exhausted_message(timeout, extra_waiter=1) if timed_out else ""
            self._abandon(fut)
            if not timed_out:
                waited = self._clock() - t0
                for obs in self._observers:
                    obs.on_wait_failed(self, waited, exc)
                raise
            waited = self._clock() - t0
            self._n_timeouts += 1
            self._window.record(waited)
            exhausted = PoolExhausted(message, pool=self.name)
            for obs in self._observers:
                obs.on_timeout(self, waited, exhausted)
            raise exhausted from self._last_error
        waited = self._clock() - t0
        self._window.record(waited)
        self._n_waited += 1
        for obs in self._observers:
            obs.on_waited(self, waited)
        lease._rec = rec
        lease._conn = rec.conn
        lease.stream_id = sid
        lease._t0 = self._clock()
        self._n_acquired += 1

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
            if not self._take(lease):
                await self._acquire_slow(lease)
        except BaseException as exc:
            error = exc
            raise
        finally:
            for obs, tok in zip(self._observers, tokens, strict=False):
                obs.on_acquire_end(self, tok, lease, error)
        if self._leak_threshold is not None:
            self._watch_leak(lease)

    # -- waiting (voicepool._engine.waiters) and slow releases (voicepool._engine.release) --------

    def _exhausted_message(self, timeout: float, extra_waiter: int = 0) -> str:
        return exhausted_message(self, timeout, extra_waiter)

    def _arm_timer(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        arm_timer(self, loop, when)

    def _abandon(self, fut: Waiter) -> None:
        abandon(self, fut)

    async def _release_slow(self, lease: Lease[C], exc: BaseException | None) -> None:
        await release_slow(self, lease, exc)

    def _after_stream_end(self, rec: ConnRecord[C]) -> None:
        after_stream_end(self, rec)

    # -- release ----------------------------------------------------------------------------------

    def _release_idle(self, rec: ConnRecord[C]) -> None:
        """Clean EXCLUSIVE release with nothing to reset, once Lease stamped ``last_used``:
        synchronous, no adapter call. Liveness is checked at the next acquire (is_open) and by
        the health task, which also schedules the next ping from ``last_used``.
        """
        if rec.expires <= rec.last_used:
            self._retire(rec, "expired")
        else:
            self._deliver(rec)

    def _record_use(self, held: float) -> None:
        """Buffer a lease hold time for observers (bounded; flushed by the health task)."""
        if len(self._use_times) < _MAX_BUFFERED:
            self._use_times.append(held)

    # -- handing out ------------------------------------------------------------------------------

    def _deliver(self, rec: ConnRecord[C]) -> None:
        """An EXCLUSIVE / SINGLE_USE connection is free: first live waiter, else idle (LIFO)."""
        if self._closing:
            self._retire(rec, "shutdown")
            return
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()[0]
            if not fut.done():
                rec.state = ConnState.IN_USE
                fut.set_result((rec, None))
                return
        rec.state = ConnState.IDLE
        self._idle.append(rec)

    def _serve_streams(self, rec: ConnRecord[C]) -> None:
        """A MULTIPLEXED connection has room: give streams to waiters in FIFO order."""
        waiters = self._waiters
        while waiters and rec.streams < rec.cap:
            fut = waiters.popleft()[0]
            if not fut.done():
                rec.streams += 1
                rec.seq += 1
                fut.set_result((rec, rec.seq))

    # -- connects (voicepool._engine.connect), close (drain), leaks (leak) ----------------------

    def _grow(self) -> None:
        grow(self)

    def _spawn_connect(self) -> None:
        spawn_connect(self)

    async def _open_one(self, started: list[bool] | None = None) -> None:
        await open_one(self, started)

    async def _close(self, timeout: float) -> None:
        await close(self, timeout)

    def _watch_leak(self, lease: Lease[C]) -> None:
        watch_leak(self, lease)

    def _retire(self, rec: ConnRecord[C], reason: str) -> None:
        """Take ``rec`` out of the pool for good and close it in the background."""
        if rec.state is ConnState.CLOSED:
            return
        if rec.state is ConnState.IDLE:
            try:
                self._idle.remove(rec)
            except ValueError:
                pass  # already popped by the caller
        if reason in _PEER_NAMED:
            reason = self.adapter.close_reason(rec.conn) or reason
        rec.state = ConnState.CLOSED
        self._conns.pop(rec.id, None)
        self._by_conn.pop(id(rec.conn), None)
        if self._mux:
            try:
                self._mux_conns.remove(rec)
            except ValueError:
                pass
        self._closed_by[reason] = self._closed_by.get(reason, 0) + 1
        for obs in self._observers:
            obs.on_closed(self, reason)
        log.debug(
            "pool %s: connection #%d closed (%s)", self.name, rec.id, reason, extra=self._extra
        )
        self._spawn(self._close_conn(rec.conn), self._closers)
        if not self._closing:
            self._learn_error(rec.conn)
        if self._closing:
            self._check_drained()
        else:
            self._grow()

    async def _close_conn(self, conn: C) -> None:
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                await self.adapter.close(conn)
        except Exception as err:
            log.debug("pool %s: close failed: %r", self.name, err, extra=self._extra)

    def _spawn(self, coro: Coroutine[Any, Any, None], into: set[asyncio.Task[Any]]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        into.add(task)
        task.add_done_callback(into.discard)

    def _learn_error(self, conn: C) -> None:
        """Record the adapter's account of what ended ``conn``; a fatal one (a credential refused
        on a request) opens the circuit as a fatal connect error would, once per error."""
        err = self.adapter.connection_error(conn)
        if err is None or err is self._last_error:
            return
        self._last_error = err
        if self.adapter.is_fatal(err) and not self._circuit_open:
            connect_failed(self, err)

    def _on_conn_changed(self, conn: Any) -> None:
        """Adapter callback: re-read ``conn``'s capacity and liveness now."""
        rec = self._by_conn.get(id(conn))
        if rec is None or rec.state is ConnState.CLOSED:
            return
        self._learn_error(conn)
        if not self._is_open(conn):
            if rec.state is ConnState.IDLE or (self._mux and rec.streams == 0):
                self._retire(rec, "remote_closed")
            else:
                self._poke()
            return
        if self._mux:
            old, rec.cap = rec.cap, min(self.max_streams, self.adapter.stream_capacity(conn))
            if rec.cap == 0 and rec.streams == 0:
                self._retire(rec, "expired")
            elif rec.cap > old:
                self._serve_streams(rec)
            if rec.cap < old:
                self._grow()

    # -- state, close ---------------------------------------------------------------------------

    @property
    def _extra(self) -> dict[str, str]:
        return {"voicepool.pool.name": self.name}

    def _set_lifecycle(self, state: PoolState) -> None:
        self._lifecycle = state
        self._report_state()

    def _report_state(self) -> None:
        new = self.state
        old, self._reported_state = self._reported_state, new
        if old is not new:
            log.debug("pool %s: %s -> %s", self.name, old.value, new.value, extra=self._extra)
            for obs in self._observers:
                obs.on_state(self, old, new)

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _check_drained(self) -> None:
        if self._closing and self._drained is not None and not self._busy():
            self._drained.set()

    def _busy(self) -> bool:
        return self._opening > 0 or any(
            r.state is ConnState.IN_USE and (not self._mux or r.streams)
            for r in self._conns.values()
        )

"""`PoolCore`: every bookkeeping decision of one pool, without I/O, clocks or an event loop.

The shape is httpcore's ``_assign_requests_to_connections`` and websockets' sans-I/O
``Protocol``: each event method takes ``now`` and returns the actions the driver performs, in
order (``voicepool._engine.actions``). The core never imports asyncio, never reads a clock and
draws jitter from an injected ``random.Random``, so a run is reproducible from its seed and the
hypothesis state machine drives it with no loop at all.

What lives here: idle (a LIFO deque), opening (a counted slot per connect in flight), the
connection records, the FIFO waiters (lazily deleted: O(1) abandonment), streams, the failure
policy (``min_healthy``, overlapping failures as one backoff step, jittered refill, the circuit
and its probe, fail-fast of waiters no retry can serve in time), sizing (one method behind
:class:`SizingPolicy`), the admission of one more connect (:meth:`PoolCore._admit`), and the
state. Every event ends in :meth:`PoolCore._end`, the one transition point.

Not thread-safe: the driver calls it from its event loop only.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

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
from voicepool._engine.quota import QuotaGate, QuotaGrant
from voicepool._engine.record import ConnRecord, ConnState
from voicepool._engine.state import PoolState, PoolStats
from voicepool._engine.waitqueue import Waiter, WaitQueue
from voicepool._engine.waitwindow import WaitWindow
from voicepool._redact import scrub
from voicepool.adapter import LeaseMode
from voicepool.errors import ConnectError, PoolClosed, PoolExhausted, PoolUnavailable
from voicepool.pool_settings import PoolSettings, ResolvedSizing

__all__ = ["NO_ACTIONS", "PoolCore", "SizingPolicy"]

C = TypeVar("C")

NO_ACTIONS: tuple[Action, ...] = ()  # returned where nothing is to be done: no allocation
_MAX_SLEEP = 3600.0
_RTT_WEIGHT = 0.2  # EWMA weight of the latest ping round trip
_IDLE, _IN_USE, _PINGING, _CLOSED = (
    ConnState.IDLE,
    ConnState.IN_USE,
    ConnState.PINGING,
    ConnState.CLOSED,
)
# Losses that tell us about the provider (a network event), not about one lease.
_LOSSES = frozenset({"remote_closed", "ping_failed"})
# Close reasons the core infers (drained, closed by the peer): the adapter may name them better
# (an HTTP/2 GOAWAY is "goaway", not "expired"; see Adapter.close_reason).
_PEER_NAMED = frozenset({"expired", "remote_closed"})


def _no_reason(conn: object) -> str | None:
    return None


def _no_error(conn: object) -> BaseException | None:
    return None


def _never_fatal(exc: BaseException) -> bool:
    return False


class SizingPolicy:
    """How many connections the pool keeps warm. The seam for an adaptive warm floor.

    Override :meth:`warm_floor`; the core clamps the answer to ``[0, max_size]``. The other
    hooks let a policy that learns from traffic (``voicepool._engine.warm``) see connect times,
    ask for the timer and retire idle connections; the defaults do nothing (``warm = "fixed"``).
    """

    def warm_floor(self, core: PoolCore[Any], now: float) -> int:
        return core.min_size

    def due(self, now: float) -> float:
        """When the policy wants :meth:`PoolCore.tick` to run next."""
        return math.inf

    def connected(self, duration: float) -> None:
        """A connect succeeded after ``duration`` seconds."""

    def surplus(self, core: PoolCore[Any], now: float) -> int:
        """How many idle connections (least recently used first) to retire now."""
        return 0


class PoolCore(Generic[C]):
    """The decisions of one pool. See the module docstring; events are the public methods."""

    # Slots: the driver's fast paths read these on every lease (a __dict__ of 59 fields is an
    # ordinary dict, probed on every read).
    __slots__ = (
        "_gate",
        "_health_due",
        "_idle_at",
        "_last_reachable",
        "_max_step",
        "_next_id",
        "_refill",
        "_soonest",
        "_step_at",
        "_wake_at",
        "_warm_failed",
        "_young",
        "alarm_firing",
        "by_conn",
        "circuit_open",
        "close_reason",
        "closed_by",
        "closing",
        "connection_error",
        "conns",
        "describe",
        "generation",
        "idle",
        "idle_time",
        "is_fatal",
        "is_open",
        "last_error",
        "lease_mode",
        "lifecycle",
        "max_size",
        "max_streams",
        "min_size",
        "mux",
        "mux_conns",
        "n_acquired",
        "n_connect_failures",
        "n_connects",
        "n_exhausted",
        "n_timeouts",
        "n_unavailable",
        "n_waited",
        "name",
        "opening",
        "ping_interval",
        "ping_rtt",
        "policy",
        "probing",
        "quota",
        "reported",
        "retry_at",
        "rng",
        "settings",
        "single_use",
        "steps",
        "use_proves_liveness",
        "waiters",
        "warm_target",
        "warming",
        "window",
    )

    def __init__(
        self,
        name: str,
        settings: PoolSettings,
        sizing: ResolvedSizing,
        *,
        ping_interval: float,
        rng: random.Random,
        is_open: Callable[[C], bool],
        describe: str = "",
        policy: SizingPolicy | None = None,
        close_reason: Callable[[C], str | None] = _no_reason,
        connection_error: Callable[[C], BaseException | None] = _no_error,
        is_fatal: Callable[[BaseException], bool] = _never_fatal,
        use_proves_liveness: bool = True,
        quota: QuotaGate | None = None,
    ) -> None:
        self.name = name
        self.settings = s = settings
        self.lease_mode = sizing.lease_mode
        self.min_size = sizing.min_size
        self.max_size = sizing.max_size
        self.max_streams = sizing.max_streams
        self.mux = sizing.lease_mode is LeaseMode.MULTIPLEXED
        self.single_use = sizing.lease_mode is LeaseMode.SINGLE_USE
        self.ping_interval = ping_interval
        # Adapter.use_proves_liveness: whether a finished lease postpones the idle ping.
        self.use_proves_liveness = use_proves_liveness
        self.rng = rng
        self.is_open = is_open
        self.close_reason = close_reason
        self.connection_error = connection_error
        self.is_fatal = is_fatal
        self.describe = describe
        # The driver picks the policy (voicepool._engine.warm.sizing_for: settings.warm), so the
        # core never imports the policies built on it.
        self.policy = policy or SizingPolicy()
        # A fleet quota (voicepool._engine.quota): connects need tokens reserved on its backend.
        self.quota = quota
        # Backoff caps grow as initial * multiplier ** (step - 1) until backoff_max: the step
        # is clamped first, so a thousand failures in a row never overflow a float.
        self._max_step = (
            math.ceil(math.log(s.backoff_max / s.backoff_initial) / math.log(s.backoff_multiplier))
            if s.backoff_multiplier > 1
            else 0
        )

        self.idle: deque[ConnRecord[C]] = deque()  # EXCLUSIVE / SINGLE_USE; LIFO at the right
        self.conns: dict[int, ConnRecord[C]] = {}
        self.by_conn: dict[int, ConnRecord[C]] = {}  # id(conn) -> record, for adapter callbacks
        self.mux_conns: list[ConnRecord[C]] = []
        self.opening = 0
        self.generation = 0
        self._next_id = 0

        self.waiters = WaitQueue()  # FIFO, O(1) abandonment, deadlines for the one timer

        self.lifecycle = PoolState.NEW
        self.reported = PoolState.NEW
        self.warming = False
        self.closing = False
        self.circuit_open = False
        # Backoff steps: failures that did not overlap a counted one. The count starts over
        # only when a connection proves itself (_prove: it survived min_healthy, carried a
        # lease to a clean end, or answered a routine ping a whole ping period after it
        # opened), never on the first ping's answer: a server that answers and hangs up a few
        # ms later must keep its backoff growing. A proof never closes the circuit.
        self.steps = 0
        # After a failure, until a connection answers a ping or proves itself: DEGRADED below
        # the floor, and a waiter no scheduled retry serves in time fails at once.
        self.probing = False
        self._step_at = -math.inf
        self.retry_at = 0.0
        self._last_reachable = False  # the last failure was a server that answered (see _failed)
        self.last_error: BaseException | None = None
        self._warm_failed = False
        self._refill: list[float] = []  # jittered start times of replacements for lost ones
        self._young: deque[ConnRecord[C]] = deque()  # unproven, in creation order
        # A young connection pinged at once whose answer the next connects wait for (see
        # connected): while recovering, and between warm-up waves.
        self._gate: ConnRecord[C] | None = None
        self._health_due = 0.0
        self._wake_at = math.inf  # when the driver's timer is armed for
        self._soonest = math.inf  # the earliest time anything scheduled since then is due

        self.n_acquired = 0
        self.n_exhausted = 0
        self.n_timeouts = 0
        self.n_unavailable = 0
        self.n_connects = 0
        self.n_connect_failures = 0
        self.n_waited = 0
        self.warm_target = self.min_size  # the floor last computed (stats)
        self.idle_time = 0.0  # socket-seconds open and idle, summed at each event (see _end)
        self._idle_at = 0.0
        self.closed_by: dict[str, int] = {}
        self.ping_rtt: float | None = None
        self.window = WaitWindow(s.alarm_window, 0.0, rng)
        self.alarm_firing = False

    # -- lifecycle events -----------------------------------------------------------------------

    def start(self, now: float) -> list[Action]:
        """Begin warm-up: waves of at most ``connect_concurrency`` connects up to the floor."""
        out: list[Action] = []
        self.lifecycle = PoolState.STARTING
        self.warming = True
        self.window.start = now
        self._health_due = now
        self._at(now)
        self._grow(now, out)
        self._check_warm(now)
        return self._end(now, out)

    def close(self, now: float) -> list[Action]:
        """Stop lending: fail every waiter with PoolClosed, close what nobody holds."""
        out: list[Action] = []
        if self.closing:
            return out
        self.closing = True
        self.warming = False
        self.lifecycle = PoolState.CLOSING
        err = PoolClosed(f"pool {self.name!r} is closing", pool=self.name)
        for w in self.waiters.clear():
            w.state = 2
            out.append(Fail(w, err))
        for rec in list(self.conns.values()):
            if rec.state is not _IN_USE or (self.mux and not rec.streams):
                self._retire(rec, "shutdown", now, out)
            else:
                rec.expires = -math.inf  # its release comes to the core (the fast path checks this)
        return self._end(now, out)

    def close_all(self, now: float) -> list[Action]:
        """The drain deadline passed (or nothing is held): close every connection left."""
        out: list[Action] = []
        for rec in list(self.conns.values()):
            self._retire(rec, "shutdown", now, out)
        return self._end(now, out)

    def closed(self, now: float) -> list[Action]:
        out: list[Action] = []
        self.lifecycle = PoolState.CLOSED
        return self._end(now, out)

    @property
    def busy(self) -> bool:
        """Whether a lease is held or a connect runs (what a drain waits for)."""
        if self.opening:
            return True
        if self.mux:
            return any(r.streams for r in self.conns.values())
        return any(r.state is _IN_USE for r in self.conns.values())

    def expire_all(self, now: float) -> list[Action]:
        """Retire every connection once idle, and those of connects in flight (new generation)."""
        out: list[Action] = []
        self.generation += 1
        for rec in self.conns.values():
            rec.expires = -math.inf
        self._health_due = now
        self._at(now)
        return self._end(now, out)

    def set_min_size(self, min_size: int, now: float) -> list[Action]:
        """The warm floor changes at run time (a PoolGroup's standby grows or shrinks): idle
        connections above the new floor are retired at once, oldest first; missing ones open."""
        out: list[Action] = []
        self.min_size = min_size
        if self.lifecycle is PoolState.NEW or self.closing:
            return out
        surplus = len(self.conns) + self.opening - min_size
        spare = [r for r in self.mux_conns if not r.streams] if self.mux else list(self.idle)
        for rec in spare:  # the idle deque is LIFO at the right: oldest first
            if surplus <= 0:
                break
            self._retire(rec, "idle", now, out)
            surplus -= 1
        self._grow(now, out)
        return self._end(now, out)

    # -- acquire ---------------------------------------------------------------------------------

    def take(self, now: float) -> tuple[ConnRecord[C] | None, list[Action] | tuple[Action, ...]]:
        """Lend without waiting, if possible: ``(record or None, actions)``.

        EXCLUSIVE / SINGLE_USE: the most recently used open idle connection. MULTIPLEXED: a
        stream on the least-loaded connection with room (``rec.seq`` is its stream id). The
        driver's inlined fast path does the idle case itself; this is for the other cases.
        """
        if self.mux:
            return self._take_stream(now)
        idle = self.idle
        out: list[Action] | None = None
        while idle:
            rec = idle.pop()
            if self.is_open(rec.conn):
                rec.state = _IN_USE
                self.n_acquired += 1
                return rec, NO_ACTIONS if out is None else self._end(now, out)
            if out is None:
                out = []
            rec.state = _IN_USE  # popped already: _retire must not search the deque
            self._lost(rec, "remote_closed", now, out, ping_others=False)
        return None, NO_ACTIONS if out is None else self._end(now, out)

    def _take_stream(
        self, now: float
    ) -> tuple[ConnRecord[C] | None, list[Action] | tuple[Action, ...]]:
        out: list[Action] | None = None
        while True:
            best: ConnRecord[C] | None = None
            load = 1 << 30
            free = 0
            for rec in self.mux_conns:
                room = rec.cap - rec.streams
                if room > 0 and not rec.suspect:
                    free += room
                    if rec.streams < load:
                        best, load = rec, rec.streams
            if best is None:
                return None, NO_ACTIONS if out is None else self._end(now, out)
            if not self.is_open(best.conn):
                if out is None:
                    out = []
                self._lost(best, "remote_closed", now, out, ping_others=False)
                continue
            best.streams += 1
            best.seq += 1
            self.n_acquired += 1
            if free == 1:  # that was the last free stream: open another while we still can
                if out is None:
                    out = []
                self._grow(now, out)
            return best, NO_ACTIONS if out is None else self._end(now, out)

    def wait(self, waiter: Waiter, now: float) -> list[Action] | tuple[Action, ...]:
        """Queue ``waiter`` (FIFO), or fail it at once (closed, circuit open, no retry in time)."""
        size = len(self.conns)
        if (
            size
            and size + self.opening >= self.max_size
            and self.quota is None
            and not self.closing
            and not self.circuit_open
            and waiter.deadline >= self._wake_at
        ):
            # The contended hand-off's case, without an action list: every slot is taken, so
            # no connect can start and (a connection exists) no fail-fast applies; the timer is
            # already armed for an earlier deadline, and queueing changes no state.
            self.waiters.push(waiter)
            self.n_exhausted += 1
            waiter.exhausted = True
            return NO_ACTIONS
        out: list[Action] = []
        if self.closing:
            waiter.state = 2
            out.append(Fail(waiter, PoolClosed(f"pool {self.name!r} is closed", pool=self.name)))
            return out
        if self.circuit_open or self._retry_too_late(waiter.deadline, now):
            waiter.state = 2
            out.append(Fail(waiter, self._unavailable()))
            return self._end(now, out)
        self.waiters.push(waiter)
        self._at(waiter.deadline)
        self._grow(now, out)
        q = self.quota
        if len(self.conns) + self.opening >= self.max_size or (q is not None and q.short):
            self.n_exhausted += 1
            waiter.exhausted = True
        return self._end(now, out)

    def give_up(self, waiter: Waiter, now: float) -> list[Action]:
        """The waiter's caller left (cancelled). A grant it never took passes to the next one."""
        out: list[Action] = []
        if waiter.state == 0:
            self.waiters.leave(waiter)
            return self._end(now, out)
        if waiter.state == 1:
            waiter.state = 2
            rec = waiter.rec
            assert rec is not None
            if self.mux:
                rec.streams -= 1
                self._stream_ended(rec, now, out)
            else:
                self._deliver(rec, now, out)
        return self._end(now, out)

    def served(self, waiter: Waiter, waited: float) -> None:
        """The granted waiter's caller resumed with its lease (counts the wait)."""
        waiter.state = 2
        self.window.record(waited)
        self.n_waited += 1
        self.n_acquired += 1

    def timed_out(self, waited: float) -> None:
        self.window.record(waited)

    # -- release ---------------------------------------------------------------------------------

    def released(self, rec: ConnRecord[C], now: float, how: str) -> list[Action]:
        """An EXCLUSIVE / SINGLE_USE lease ended. ``how``: ``"ok"`` (reset done, still open),
        ``"error"``, ``"discarded"``, ``"reset_failed"`` or ``"remote_closed"``."""
        out: list[Action] = []
        rec.last_used = now
        if rec.state is _CLOSED:
            return self._end(now, out)
        if how == "ok":
            self._prove(rec, now)
            if self.single_use:
                self._retire(rec, "used", now, out)
            elif rec.expires <= now:
                self._retire(rec, "expired", now, out)
            else:
                if self.use_proves_liveness:
                    rec.next_ping = max(rec.next_ping, now + rec.ping_period)
                self._deliver(rec, now, out)
            self._grow(now, out)  # a proof may have ended a backoff: waiters get connects
        elif how == "remote_closed":
            self._lost(rec, how, now, out)
        else:
            self._retire(rec, "error" if how == "reset_failed" else how, now, out)
        return self._end(now, out)

    def stream_released(
        self, rec: ConnRecord[C], now: float, keep: bool, why: str | None
    ) -> list[Action]:
        """A MULTIPLEXED lease ended. ``keep``: the adapter kept the shared connection;
        ``why``: None for a clean end, else ``"error"`` / ``"discarded"`` (the connection becomes
        suspect: no new streams until an immediate ping answers)."""
        out: list[Action] = []
        rec.streams -= 1
        rec.last_used = now
        if rec.state is _CLOSED:
            return self._end(now, out)
        if not keep:
            if why is None:  # a clean release the adapter refused: the peer closed or drained it
                self._lost(rec, "remote_closed", now, out)
            else:
                self._retire(rec, why, now, out)
            return self._end(now, out)
        if why is None:
            self._prove(rec, now)
            self._grow(now, out)
        elif not rec.suspect:
            rec.suspect = True
            if not rec.pinging:
                rec.pinging = True
                out.append(Ping(rec))
        self._stream_ended(rec, now, out)
        return self._end(now, out)

    # -- connects ---------------------------------------------------------------------------------

    def connected(self, attempt: Connect, conn: C, now: float, cap: int = 1) -> list[Action]:
        """A connect succeeded; ``cap`` is the adapter's stream capacity (MULTIPLEXED)."""
        out: list[Action] = []
        self.opening -= 1
        if self.closing:
            self._next_id += 1
            rec = ConnRecord(conn, self._next_id, now, now, 1.0, 0, attempt.started)
            rec.state = _CLOSED
            out.append(Close(rec, "shutdown"))
            return self._end(now, out)
        cap = min(self.max_streams, cap) if self.mux else 1
        s = self.settings
        self._next_id += 1
        # Jitter lifetimes and ping periods down by up to 10% so a pool opened at once does not
        # expire or ping at once.
        lifetime = s.max_lifetime
        expires = now + lifetime * (1 - 0.1 * self.rng.random()) if lifetime else math.inf
        if attempt.generation != self.generation:
            expires = -math.inf  # started before expire_all(): old credentials; serve, then retire
        period = self.ping_interval * (1 - 0.1 * self.rng.random())
        rec = ConnRecord(conn, self._next_id, now, expires, period, cap, attempt.started)
        if cap <= 0:
            # Usable capacity 0 (HTTP/2 MAX_CONCURRENT_STREAMS 0): a failed connect, not a
            # connection to retire and redial at once.
            rec.state = _CLOSED
            self.closed_by["no_capacity"] = self.closed_by.get("no_capacity", 0) + 1
            out.append(Close(rec, "no_capacity"))
            err = ConnectError(f"connect to {self.describe} gave a connection with no capacity")
            self._failed(err, False, attempt.started, now, out, reachable=True)
            self._check_warm(now)
            return self._end(now, out)
        self.n_connects += 1
        self.policy.connected(now - attempt.started)
        # The health pass schedules by what it saw: tell it about this one's ping and lifetime.
        self._health_due = min(self._health_due, rec.next_ping, rec.expires)
        if s.idle_timeout is not None and len(self.conns) >= self.min_size:
            self._health_due = min(self._health_due, now + s.idle_timeout)  # a surplus to watch
        self.conns[rec.id] = rec
        self.by_conn[id(conn)] = rec
        if self.circuit_open:
            self.circuit_open = False  # the probe's first success closes the circuit
        # Unproven until it survives min_healthy, answers a ping a whole ping period after it
        # opened, or a lease ends cleanly (not on the immediate ping's answer).
        self._young.append(rec)
        self._at(min(self._health_due, now + s.min_healthy))
        if self.mux:
            rec.state = _IN_USE
            self.mux_conns.append(rec)
        else:
            self._deliver(rec, now, out)
        self._check_warm(now)
        if self.steps or (self.warming and not self.opening):
            # Recovering (the probe), or a warm-up wave just completed short of the floor: ping
            # it at once, and start no other connect until it answers. A server that accepts
            # and hangs up is found in one round trip instead of drawing the next wave (or a
            # second probe) meanwhile.
            self._hold(rec, out)
        if self.mux:
            self._serve_streams(rec, out)
        self._grow(now, out)
        return self._end(now, out)

    def _hold(self, rec: ConnRecord[C], out: list[Action]) -> None:
        """Ping ``rec`` now and make it the gate of further connects (``_connects_wanted``).
        Not when a waiter took it (EXCLUSIVE / SINGLE_USE): that lease's end proves it."""
        if self.mux:
            if rec.pinging:
                return
        elif rec.state is _IDLE:
            popped = self.idle.pop()  # just delivered: the rightmost
            assert popped is rec
            rec.state = _PINGING
        else:
            return
        rec.pinging = True
        self._gate = rec
        out.append(Ping(rec))

    def connect_failed(
        self, attempt: Connect, error: BaseException, fatal: bool, now: float
    ) -> list[Action]:
        """A connect raised (``error`` already a ConnectError chaining the adapter's error)."""
        out: list[Action] = []
        self.opening -= 1
        if not self.closing:
            self._failed(error, fatal, attempt.started, now, out)
            self._check_warm(now)
            self._grow(now, out)
        return self._end(now, out)

    def connect_cancelled(self, attempt: Connect, now: float) -> list[Action]:
        """A connect task was cancelled (pool closing): its slot is free, nothing is counted."""
        out: list[Action] = []
        self.opening -= 1
        self._check_warm(now)
        return self._end(now, out)

    # -- health -----------------------------------------------------------------------------------

    def pinged(self, rec: ConnRecord[C], ok: bool, now: float, rtt: float) -> list[Action]:
        """A ping ended (``ok`` False on error, timeout, or a connection closed after it)."""
        out: list[Action] = []
        rec.pinging = False
        if rec is self._gate:
            self._gate = None
        if rec.state is _CLOSED:
            return self._end(now, out)
        if not ok:
            self._lost(rec, "ping_failed", now, out)
            return self._end(now, out)
        self.ping_rtt = (
            rtt if self.ping_rtt is None else self.ping_rtt + _RTT_WEIGHT * (rtt - self.ping_rtt)
        )
        rec.next_ping = now + rec.ping_period
        if now - rec.created >= min(self.settings.min_healthy, rec.ping_period):
            # It lived min_healthy, or a whole ping period (a provider closing idle sockets
            # within min_healthy shrinks the period: its recycled sockets are not failures).
            self._prove(rec, now)
        else:
            # A young connection answered: the provider is up again (not DEGRADED, waiters
            # wait for connects again). Not proof: its loss within min_healthy still counts
            # as a failed connect, and while failures are counted the floor waits for it.
            self.probing = False
        if self.mux:
            if rec.suspect:
                rec.suspect = False
                self._serve_streams(rec, out)
        elif rec.state is _PINGING:
            self._deliver(rec, now, out)
        self._grow(now, out)
        return self._end(now, out)

    def ping_cancelled(self, rec: ConnRecord[C], now: float) -> list[Action]:
        out: list[Action] = []
        rec.pinging = False
        if rec is self._gate:
            self._gate = None
        if rec.state is _PINGING:
            self._retire(rec, "shutdown", now, out)
        return self._end(now, out)

    def changed(self, conn: C, is_open: bool, cap: int, now: float) -> list[Action]:
        """The adapter says ``conn`` changed: closed by the peer, or a new stream capacity."""
        out: list[Action] = []
        rec = self.by_conn.get(id(conn))
        if rec is None or rec.state is _CLOSED:
            return out
        self._learn_error(rec, now, out)
        if not is_open:
            if rec.state is _IDLE or (self.mux and rec.streams == 0):
                self._lost(rec, "remote_closed", now, out)
            else:
                # Held: never interrupted, retired at its release (as expire_all marks it: the
                # release path then retires it, fast path included); look again soon.
                rec.expires = -math.inf
                self._health_due = now
                self._at(now)
            return self._end(now, out)
        if self.mux:
            old, rec.cap = rec.cap, min(self.max_streams, cap)
            if rec.cap == 0 and not rec.proven and now - rec.created < self.settings.min_healthy:
                # Zero capacity straight after the handshake: the server takes no streams at all.
                err = ConnectError(f"{self.describe} advertised no stream capacity")
                self._failed(err, False, rec.started, now, out, reachable=True)
            if rec.cap == 0 and rec.streams == 0:
                self._retire(rec, "expired", now, out)
            elif rec.cap > old:
                self._serve_streams(rec, out)
            if rec.cap < old:
                self._grow(now, out)
        return self._end(now, out)

    def tick(self, now: float, health: bool = False) -> list[Action]:
        """The pool timer: expire waiters, prove the young, refill, and (when due, or with
        ``health``) a health pass."""
        out: list[Action] = []
        self._wake_at = math.inf
        if self.lifecycle is PoolState.NEW or self.lifecycle is PoolState.CLOSED:
            return out
        self._expire_waiters(now, out)
        young = self._young
        while young and (
            young[0].state is _CLOSED
            or young[0].proven
            or young[0].created + self.settings.min_healthy <= now
        ):
            rec = young.popleft()
            if rec.state is not _CLOSED and not rec.proven:
                self._prove(rec, now)
        if now >= self.window.end:
            p95, count = self.window.rotate(now, self.n_acquired)
            limit = self.settings.alarm_wait_p95_ms / 1000.0
            if count and p95 > limit:
                self.alarm_firing = True
                out.append(Alarm(p95, True, count))
            elif self.alarm_firing:
                self.alarm_firing = False
                out.append(Alarm(p95, False, count))
        if (health or now >= self._health_due) and not self.closing:
            self._health_due = self._health_pass(now, out)
        if not self.closing:
            for _ in range(self.policy.surplus(self, now)):
                if not self.idle:
                    break
                rec = self.idle.popleft()  # the least recently used
                rec.state = _IN_USE  # out of the deque already: _retire must not look there
                self._retire(rec, "surplus", now, out)
        self._grow(now, out)
        q = self.quota
        if q is not None and not q.in_flight and now >= q.sync_due and not self.closing:
            out.append(self._quota_sync(q))  # the refresh: TTL, demand signal, give back
        self._soonest = self.next_due(now)
        return self._end(now, out)

    def _health_pass(self, now: float, out: list[Action]) -> float:
        """Retire expired, closed and (above the floor) long-idle connections; start due pings.

        Returns when the next pass is due. O(connections): it runs at most every quarter ping
        interval (or sooner for a lifetime or idle deadline), never on the acquire path.
        """
        due = now + _MAX_SLEEP
        idle_timeout = self.settings.idle_timeout
        surplus = len(self.conns) - self.min_size
        if self.mux:
            for rec in list(self.mux_conns):
                if rec.streams:
                    # Busy multiplexed connections are still pinged (a PING runs beside the
                    # streams): a black-holed connection under load is found by its ping.
                    if rec.expires <= now:
                        rec.cap = 0  # expired while busy: drain, close at the last stream's end
                    elif rec.next_ping <= now and not rec.pinging:
                        rec.pinging = True
                        out.append(Ping(rec))
                    else:
                        due = min(due, rec.next_ping, rec.expires)
                    continue
                verdict, nxt = self._judge(rec, now, surplus, idle_timeout)
                if verdict is None:
                    due = min(due, nxt)
                elif verdict == "ping":
                    if not rec.pinging:
                        rec.pinging = True
                        out.append(Ping(rec))
                else:
                    surplus -= 1
                    self._retire_or_lose(rec, verdict, now, out)
        else:
            # Judge a detached copy (oldest first: LIFO at the right) and rebuild idle in place
            # from what stays (the driver's fast path holds this deque); a loss found here pings
            # the others, which empties it.
            old = list(self.idle)
            self.idle.clear()
            for rec in old:
                verdict, nxt = self._judge(rec, now, surplus, idle_timeout)
                if verdict is None:
                    self.idle.append(rec)
                    due = min(due, nxt)
                elif verdict == "ping":
                    rec.state = _PINGING  # out of idle: no acquire takes it while it is pinged
                    rec.pinging = True
                    out.append(Ping(rec))
                else:
                    surplus -= 1
                    rec.state = _IN_USE  # out of the deque already: _retire must not look there
                    self._retire_or_lose(rec, verdict, now, out)
        # Connections in use are not scheduled (the release path stays free of timers), so look
        # at least every quarter ping interval: a ping is then at most 25% late.
        due = min(due, now + self.ping_interval / 4)
        if idle_timeout is not None and surplus > 0:
            due = min(due, now + idle_timeout / 4)
        return due

    def _judge(
        self, rec: ConnRecord[C], now: float, surplus: int, idle_timeout: float | None
    ) -> tuple[str | None, float]:
        """What an idle connection needs now: None (and when to look again), or a verdict."""
        if not self.is_open(rec.conn):
            return "remote_closed", 0.0
        if rec.expires <= now or (self.mux and rec.cap == 0):
            return "expired", 0.0
        if idle_timeout is not None and surplus > 0 and now - rec.last_used >= idle_timeout:
            return "idle", 0.0
        ping_at = rec.next_ping
        if self.use_proves_liveness:
            # A lease carried traffic over the connection: the ping waits a period after it.
            # Not when a lease does no I/O (a SIP registration leased back to back with zero
            # hold time would never be pinged).
            ping_at = max(ping_at, rec.last_used + rec.ping_period)
        if ping_at <= now:
            return "ping", 0.0
        nxt = min(ping_at, rec.expires)
        if idle_timeout is not None and surplus > 0:
            nxt = min(nxt, rec.last_used + idle_timeout)
        return None, nxt

    def _retire_or_lose(self, rec: ConnRecord[C], why: str, now: float, out: list[Action]) -> None:
        if why in _LOSSES:
            self._lost(rec, why, now, out)
        else:
            self._retire(rec, why, now, out)

    # -- decisions --------------------------------------------------------------------------------

    def _deliver(self, rec: ConnRecord[C], now: float, out: list[Action]) -> None:
        """An EXCLUSIVE / SINGLE_USE connection is free: the first live waiter, else idle."""
        if self.closing:
            self._retire(rec, "shutdown", now, out)
            return
        w = self.waiters.pop()
        if w is not None:
            w.state = 1
            w.rec = rec
            rec.state = _IN_USE
            out.append(Grant(w))
            return
        rec.state = _IDLE
        self.idle.append(rec)

    def _serve_streams(self, rec: ConnRecord[C], out: list[Action]) -> None:
        """A MULTIPLEXED connection has room: streams to waiters, FIFO."""
        if rec.suspect or rec.state is _CLOSED:
            return
        while rec.streams < rec.cap:
            w = self.waiters.pop()
            if w is None:
                return
            w.state = 1
            rec.streams += 1
            rec.seq += 1
            w.rec = rec
            w.stream_id = rec.seq
            out.append(Grant(w))

    def _stream_ended(self, rec: ConnRecord[C], now: float, out: list[Action]) -> None:
        if rec.state is _CLOSED:
            return
        if rec.streams == 0 and (self.closing or rec.cap == 0 or rec.expires <= now):
            self._retire(rec, "shutdown" if self.closing else "expired", now, out)
            return
        self._serve_streams(rec, out)

    def _prove(self, rec: ConnRecord[C], now: float) -> None:
        """``rec`` proved itself (min_healthy of life, a lease's clean end, or a routine ping a
        whole ping period after it opened): the failure count starts over. Not the circuit:
        only a successful connect closes it (a 401 learnt on a request must keep it open)."""
        if rec.proven:
            return
        rec.proven = True
        if self._discredited(rec):
            return  # open, but refused (a 401 on a request): the failure count stands
        self.probing = False
        if self.steps:
            self.steps = 0
            self._step_at = -math.inf
            self.retry_at = 0.0

    def _lost(
        self,
        rec: ConnRecord[C],
        reason: str,
        now: float,
        out: list[Action],
        ping_others: bool = True,
    ) -> None:
        """An unexpected loss (peer closed, ping failed): retire, account, ping the others.

        ``ping_others`` is False when the loss is found on the acquire path: the caller must not
        wait for the pings (the others are checked with ``is_open`` as they are taken).
        """
        young = not rec.proven and now - rec.created < self.settings.min_healthy
        # No replacement before the loss is accounted: a young loss is a failure (its retry
        # waits for the backoff), a mature one's replacement is paced (the jittered refill).
        self._retire(rec, reason, now, out, grow=False)
        if self.closing:
            return
        cause = self.connection_error(rec.conn) if young else None  # the adapter's account
        if young and cause is not None and self.is_fatal(cause):
            # A fatal account (a 403 on a refresh): _retire already counted it as a fatal
            # failed connect, with the adapter's own error (its status) as last_error.
            pass
        elif young:
            # It died before it proved itself: the connect did not really succeed. Counting
            # it as a failure is what stops a server that accepts and hangs up from storming.
            ms = (now - rec.created) * 1e3
            err = ConnectError(
                f"connection to {self.describe} lost {ms:.0f} ms after it opened ({reason})"
                + (f": {cause}" if cause is not None else ""),
                status=cause.status if isinstance(cause, ConnectError) else None,
            )
            err.__cause__ = cause
            self._failed(err, False, rec.started, now, out, reachable=True)
        else:
            # Replacements of lost connections start at jittered times, not in one burst.
            at = now + self.rng.uniform(0, self.settings.backoff_initial)
            heapq.heappush(self._refill, at)
            self._at(at)
        self._grow(now, out)  # what waiters need now (demand is never paced)
        # A network event rarely kills one socket: look at the others now.
        if not ping_others:
            return
        others = [r for r in self.mux_conns if not r.pinging] if self.mux else list(self.idle)
        if not self.mux:
            self.idle.clear()
        for other in others:
            if not self.is_open(other.conn):
                other.state = _IN_USE if not self.mux else other.state  # (out of idle already)
                self._lost(other, "remote_closed", now, out, ping_others=False)
                continue
            if not self.mux:
                other.state = _PINGING
            other.pinging = True
            out.append(Ping(other))

    def _failed(
        self,
        err: BaseException,
        fatal: bool,
        started: float,
        now: float,
        out: list[Action],
        *,
        reachable: bool = False,
    ) -> None:
        """One failed connect (or young loss). Overlapping failures are one backoff step.

        ``reachable``: the server accepted the connection and then failed it (a young loss, no
        stream capacity). It counts for the backoff like any failure, but it does not fail
        every waiter at once: the provider answers, so a waiter whose deadline is after the
        scheduled retry waits for it (a GOAWAY right after the handshake, whose refused
        streams are retried, must not fail them)."""
        self.n_connect_failures += 1
        self.last_error = err
        self._last_reachable = reachable
        self.probing = True
        if started >= self._step_at or not self.steps:
            self.steps += 1
            self._step_at = now
            s = self.settings
            cap = min(
                s.backoff_max,
                s.backoff_initial * s.backoff_multiplier ** min(self.steps - 1, self._max_step),
            )
            self.retry_at = now + self.rng.uniform(0, cap)  # full jitter
            self._at(self.retry_at)
        if self.warming:
            self._warm_failed = True
            self._check_warm(now)  # a failure found with no connect in flight ends it now
        if (fatal or self.steps >= self.settings.failure_threshold) and not self.circuit_open:
            self.circuit_open = True
            for w in self.waiters.clear():
                w.state = 2
                out.append(Fail(w, self._unavailable()))
            return
        if not self.conns and not self.opening:
            # No connection, nothing in flight, and the last connect failed: no waiter waits
            # for a *scheduled* retry (with backoff_initial under acquire_timeout it would
            # usually wait for a retry that then fails too); tell them now. The retry itself
            # keeps its backoff: nothing is dialled on demand, so a storm stays impossible.
            for w in self.waiters:
                if not reachable or w.deadline < self.retry_at:
                    self.waiters.leave(w)
                    out.append(Fail(w, self._unavailable()))

    def _retry_too_late(self, deadline: float, now: float) -> bool:
        """A new waiter fails at once: no connection, no connect in flight, the last connect
        failed and its retry is scheduled later (a dead provider costs a call microseconds,
        not ``acquire_timeout``; only an in-flight connect is worth waiting for)."""
        return (
            self.probing
            and not self.conns
            and not self.opening
            and self.retry_at > now
            and (not self._last_reachable or deadline < self.retry_at)
        )

    def _unavailable(self) -> PoolUnavailable:
        self.n_unavailable += 1
        if self.circuit_open:
            why = f"circuit open after {self.steps} failed connect steps"
        else:
            why = "no connection, and the next connect retry comes after the acquire deadline"
        err = PoolUnavailable(
            f"pool {self.name!r} is unavailable ({why}): {self.last_error}", pool=self.name
        )
        err.__cause__ = self.last_error
        return err

    def _retire(
        self, rec: ConnRecord[C], reason: str, now: float, out: list[Action], grow: bool = True
    ) -> None:
        """Take ``rec`` out of the pool for good; the driver closes it in the background.
        ``grow`` False: no replacement (the fleet quota took the slot back)."""
        if rec.state is _CLOSED:
            return
        if rec.state is _IDLE:
            try:
                self.idle.remove(rec)
            except ValueError:
                pass  # already popped by the caller
        if reason in _PEER_NAMED:
            reason = self.close_reason(rec.conn) or reason
        rec.state = _CLOSED
        rec.pinging = False
        if rec is self._gate:
            self._gate = None
        del self.conns[rec.id]
        self.by_conn.pop(id(rec.conn), None)
        if self.mux:
            try:
                self.mux_conns.remove(rec)
            except ValueError:
                pass
        self.closed_by[reason] = self.closed_by.get(reason, 0) + 1
        if self.quota is not None:
            self.quota.closing.add(rec.id)  # its token is in use until quota_closed
        out.append(Close(rec, reason))
        if not self.closing:
            self._learn_error(rec, now, out)
            if grow:
                self._grow(now, out)

    def _learn_error(self, rec: ConnRecord[C], now: float, out: list[Action]) -> None:
        """Record the adapter's account of what ended or drained ``rec`` (a protocol error, a
        credential refused on a request); a fatal one opens the circuit as a fatal connect
        would, once per error object (every connection a 401 drained reports the same one)."""
        err = self.connection_error(rec.conn)
        if err is None or err is self.last_error:
            return
        if self.is_fatal(err):
            self._failed(err, True, now, now, out)
        else:
            self.last_error = err

    def _grow(self, now: float, out: list[Action]) -> None:
        """Start the connects the pool needs now; a slot is counted before each one."""
        n = self._connects_wanted(now)
        if n > 0 and self.circuit_open and len(self.conns) + self.opening >= self.max_size:
            # The circuit's probe is due and every slot is taken: an idle connection gives
            # its slot up (see _spare). Only a successful connect closes the circuit.
            spare = self._spare()
            assert spare is not None  # _connects_wanted counted its slot
            if not self.mux:
                self.idle.remove(spare)
                spare.state = _IN_USE  # out of the deque already: _retire must not look there
            self._retire(spare, "probe", now, out, grow=False)
        while n > 0 and self._admit(now):
            self.opening += 1
            out.append(Connect(now, self.generation))
            n -= 1
        q = self.quota
        if q is not None:
            # What the quota refused: ask its backend for more (one ask in flight, paced).
            q.short = n if n > 0 and len(self.conns) + self.opening < self.max_size else 0
            if q.short:
                self._quota_ask(now, out)

    def _admit(self, now: float) -> bool:
        """May the pool open one more connection now? The one place that says so: below
        ``max_size``, and within the fleet quota's reservation when there is one."""
        held = len(self.conns) + self.opening
        if held >= self.max_size:
            return False
        q = self.quota
        return q is None or q.fits(held + len(q.closing))

    def _quota_held(self, q: QuotaGate) -> int:
        """Connections the quota counts: open, opening, and closing (the provider counts a
        stream until its close completes: a replacement must not overlap it)."""
        return len(self.conns) + self.opening + len(q.closing)

    # -- the fleet quota --------------------------------------------------------------------------

    def _quota_ask(self, now: float, out: list[Action]) -> None:
        """Ask the backend for the tokens the pool is short of, unless an ask is in flight or a
        refused one is not due again yet (then the timer comes back at ``retry_at``)."""
        q = self.quota
        assert q is not None
        if q.in_flight or self.closing or self.lifecycle is PoolState.NEW:
            return
        if q.yielding and q.closing:
            return  # giving spares away: the sync that hands them back follows their closes
        if now < q.retry_at:
            self._at(q.retry_at)
            return
        out.append(self._quota_sync(q))

    def _quota_sync(self, q: QuotaGate) -> QuotaSync:
        held = self._quota_held(q)
        waiting = self.waiters.count
        q.in_flight = True
        more = 0 if q.yielding else q.short  # a pool giving spares away asks for none
        want = (held + more) * q.per
        # Tokens this sync gives back are not usable while it is in flight: a connect admitted
        # on them meanwhile would be over the reservation the answer confirms.
        q.granted = min(q.granted, want)
        return QuotaSync(want, held * q.per, waiting, self._in_use()[0] + waiting)

    def quota_synced(self, grant: QuotaGrant, now: float) -> list[Action]:
        """The backend answered a :class:`QuotaSync`: the reservation is ``grant.granted`` now.

        Connects it covers start; a refused ask is retried after ``poll`` (callers waiting) or
        ``refresh``. When the account is at its limit and other workers have callers waiting,
        idle connections above this pool's fair share (in use plus an equal part of what the
        fleet does not use) are given up, and so are idle ones the reservation no longer covers
        (tokens lost while the backend was away): their tokens go back at once."""
        out: list[Action] = []
        q = self.quota
        assert q is not None
        asked = q.short
        q.in_flight = False
        q.online = True
        q.syncs += 1
        q.granted = grant.granted
        q.used, q.holders = grant.used, grant.holders
        q.others_waiting, q.busy, q.epoch = grant.others_waiting, grant.busy, grant.epoch
        # On a grid of the refresh period (never later than one period): the pools of a worker
        # refresh together, in one pipelined round trip.
        q.sync_due = (math.floor(now / q.refresh) + 1) * q.refresh
        if self.closing:
            return self._end(now, out)
        held = self._quota_held(q)
        if asked and q.granted < (held + asked) * q.per:
            q.retry_at = now + (q.poll if self.waiters.count else q.refresh)
        if q.yielding and (not grant.others_waiting or self.waiters.count):
            q.yielding = False  # the starved workers are served (or this one starves now)
        excess = held - q.covered()
        if grant.others_waiting and grant.used >= q.limit and not self.waiters.count:
            workers = max(1, grant.workers, grant.holders)
            share = max(0, q.limit - grant.busy) // workers // q.per
            excess = max(excess, held - (self._in_use()[0] + share))
        if excess > 0:
            spare = [r for r in self.mux_conns if not r.streams] if self.mux else list(self.idle)
            for rec in spare[:excess]:  # oldest first (the idle deque is LIFO at the right)
                if not self.mux:
                    self.idle.remove(rec)
                    rec.state = _IN_USE  # out of the deque already: _retire must not look there
                self._retire(rec, "quota", now, out, grow=False)
            # Given up: not usable here from now, whatever Redis says; the tokens go back as
            # soon as their closes complete (quota_closed), not at the next refresh, and
            # until the starved are served this pool asks for nothing more.
            q.granted = min(q.granted, (len(self.conns) + self.opening) * q.per)
            q.yielding = True
            if not q.closing:
                out.append(self._quota_sync(q))
        if not q.in_flight:
            self._grow(now, out)
        if self.warming and not self.opening:
            # Warm-up waits for no more than the quota gave: boot is ready with fewer spares.
            self.warming = False
            self.lifecycle = PoolState.READY
        self._at(q.sync_due)
        return self._end(now, out)

    def quota_closed(self, rec: ConnRecord[C], now: float) -> list[Action]:
        """The driver finished closing ``rec``: its token is free for a replacement now."""
        out: list[Action] = []
        q = self.quota
        if q is None or rec.id not in q.closing:
            return out
        q.closing.discard(rec.id)
        if not self.closing:
            if q.yielding and not q.closing and not q.in_flight:
                out.append(self._quota_sync(q))  # hand the given-up tokens back now
            self._grow(now, out)
        return self._end(now, out)

    def quota_cancelled(self) -> None:
        """A :class:`QuotaSync` was cancelled (the pool is closing): none is in flight now."""
        if self.quota is not None:
            self.quota.in_flight = False

    def quota_failed(self, now: float) -> list[Action]:
        """A :class:`QuotaSync` failed (backend down or slow). The pool keeps serving from its
        reservation and opens nothing beyond it; the next sync, after ``refresh``, reconciles.
        The driver logs the first failure of an outage (``quota.online`` is still True then)."""
        out: list[Action] = []
        q = self.quota
        assert q is not None
        q.in_flight = False
        q.online = False
        q.backend_errors += 1
        q.retry_at = q.sync_due = now + q.refresh
        if self.warming and not self.opening:
            self.warming = False
            self.lifecycle = PoolState.READY
        if not self.closing:
            self._grow(now, out)  # within the reservation still
            self._at(q.sync_due)
        return self._end(now, out)

    def _connects_wanted(self, now: float) -> int:
        """How many connects to start now: the sizing decision, in one method.

        Demand: waiters not covered by connects in flight, plus the warm floor (the policy;
        SINGLE_USE: spares), less replacements of lost connections still waiting for their
        jittered start. While connects fail: one at a time after the backoff (the probe, which
        runs whatever the demand while the circuit is open). During warm-up: one wave at a time.
        """
        size = len(self.conns)
        room = self.max_size - size - self.opening
        if (
            room <= 0
            and self.circuit_open
            and not self.opening
            and (not self.steps or now >= self.retry_at)  # (no O(n) look during the backoff)
            and self._spare() is not None
        ):
            room = 1  # the probe may replace an idle connection (_grow retires it first)
        if room <= 0 or self.closing or self.lifecycle is PoolState.NEW:
            return 0  # (full first: the contended hand-off asks this at every wait)
        if self.warming and self.opening:
            return 0  # warm-up dials in waves: a wave that fails ends it (see _check_warm)
        if self._gate is not None and (self.steps or self.warming):
            return 0  # a young connection's ping decides first (see connected)
        trial = False
        if self.steps:
            if now < self.retry_at or self.opening:
                return 0
            limit = 1
            trial = self._on_trial()
        elif self.warming:
            limit = self.settings.connect_concurrency
        else:
            limit = self.settings.connect_concurrency - self.opening
        if limit <= 0:
            return 0
        floor = max(0, min(self.max_size, self.policy.warm_floor(self, now)))
        self.warm_target = floor
        refill = self._refill
        while refill and refill[0] <= now:
            heapq.heappop(refill)
        paced = len(refill)
        waiting = self.waiters.count
        if self.mux:
            per = self.max_streams
            free = sum(max(0, r.cap - r.streams) for r in self.mux_conns if not r.suspect)
            free += self.opening * per
            short = waiting - free
            demand = need = -(-short // per) if short > 0 else 0
            if free == 0 and self.mux_conns:
                need = max(need, 1)  # saturated: one more before the next caller has to wait
            need = max(need, floor - size - self.opening - paced)
        elif self.single_use:
            # Spares being pinged are out of the idle deque but still spares.
            spares = len(self.idle) + sum(1 for r in self.conns.values() if r.state is _PINGING)
            demand = waiting - self.opening
            need = max(demand, floor + waiting - spares - self.opening - paced)
        else:
            demand = waiting - self.opening
            need = max(demand, floor - size - self.opening - paced)
        if paced > max(0, floor - size):
            del refill[max(0, floor - size) :]  # more replacements pending than missing
            heapq.heapify(refill)
        if trial:
            need = demand  # the floor waits for the unproven (see above)
        elif self.circuit_open:
            need = max(need, 1)  # the probe runs whatever the demand (min_size 0 included)
        return min(need, room, limit)

    def _spare(self) -> ConnRecord[C] | None:
        """The idle connection an open circuit's probe may replace when the pool is full.

        A circuit opened with nothing lost (a fatal error the adapter learnt on a connection
        it keeps open, a 401 on a request) leaves no free slot, and a surviving connection
        must not close the circuit (that 401 must keep it open): only a new connect shows
        that the provider accepts this pool again. The unproven first (it says the least),
        else the least recently used; never a held one (a lease is never interrupted: its
        release makes one idle). O(connections), asked only while the circuit is open."""
        if self.mux:
            idle = [r for r in self.mux_conns if not r.streams and not r.pinging]
        else:
            idle = list(self.idle)  # LIFO at the right: least recently used first
        best: ConnRecord[C] | None = None
        rank = 3
        for rec in idle:
            r = 0 if self._discredited(rec) else 1 if not rec.proven else 2
            if r < rank:
                best, rank = rec, r
        return best

    def _discredited(self, rec: ConnRecord[C]) -> bool:
        """The adapter reports a fatal error on ``rec`` (a 401 on a request): it proves
        nothing by staying open."""
        err = self.connection_error(rec.conn)
        return err is not None and self.is_fatal(err)

    def _on_trial(self) -> bool:
        """A connection dialled since the last counted failure is open and not proven yet.

        Until it proves itself (see _prove) or dies, the floor waits and only a waiter gets a
        connect: a server that answers the first ping and hangs up 50 ms later must draw one
        connect per backoff step, not one per ping round trip.
        (Connections dialled before the failure do not hold the retry: they say nothing new.)
        O(young connections), and only asked while failures are counted."""
        at = self._step_at
        return any(r.started >= at and r.state is not _CLOSED and not r.proven for r in self._young)

    def _check_warm(self, now: float) -> None:
        """Warm-up ends when a wave completes with the floor reached, or with a failure."""
        if not self.warming or self.opening:
            return
        floor = min(self.max_size, self.policy.warm_floor(self, now))
        if self._warm_failed or self.circuit_open or len(self.conns) >= floor:
            self.warming = False
            self.lifecycle = PoolState.READY

    def _expire_waiters(self, now: float, out: list[Action]) -> None:
        for w in self.waiters.expired(now):
            self.n_timeouts += 1
            err = PoolExhausted(self.exhausted_message(w.timeout, extra_waiter=1), pool=self.name)
            err.__cause__ = self.last_error
            out.append(Fail(w, err))

    # -- the transition point ---------------------------------------------------------------------

    def _end(self, now: float, out: list[Action]) -> list[Action]:
        """Every event ends here: report a state change once, and ask for the timer if due."""
        # Idle socket-seconds, what a provider bills: the idle count since the last event (the
        # fast path changes it unseen; the timer bounds how stale the count gets).
        if now > self._idle_at:
            idle = (
                len(self.idle) if not self.mux else sum(1 for r in self.mux_conns if not r.streams)
            )
            self.idle_time += idle * (now - self._idle_at)
            self._idle_at = now
        new = self.state
        if new is not self.reported:
            out.append(StateChanged(self.reported, new))
            self.reported = new
        due = self._soonest
        if due < self._wake_at and self.lifecycle is not PoolState.CLOSED:
            self._wake_at = due
            out.append(Wake(due))
        return out

    def _at(self, t: float) -> None:
        """Something is due at ``t``: the transition point arms the timer if that is sooner.

        O(1) on every event; the full :meth:`next_due` runs once per timer tick."""
        if t < self._soonest:
            self._soonest = t

    def next_due(self, now: float) -> float:
        """When :meth:`tick` must run next (O(1): heap tops and a few fields)."""
        if self.lifecycle is PoolState.NEW or self.lifecycle is PoolState.CLOSED:
            return math.inf
        due = self._health_due if not self.closing else math.inf
        first = self.waiters.earliest()
        if first is not None:
            due = min(due, first)
        if self.closing:
            return due
        if self._young:
            due = min(due, self._young[0].created + self.settings.min_healthy)
        refill = self._refill
        while refill and refill[0] <= now:
            heapq.heappop(refill)  # due: no longer pacing anything
        if refill:
            due = min(due, refill[0])
        if self.retry_at > now:
            due = min(due, self.retry_at)
        q = self.quota
        if q is not None and not q.in_flight:
            due = min(due, q.sync_due)
            if q.short and q.retry_at > now:
                due = min(due, q.retry_at)
        return min(due, self.window.end, self.policy.due(now))

    @property
    def state(self) -> PoolState:
        """The lifecycle while new/starting/closing, else the circuit's view."""
        if self.lifecycle is not PoolState.READY:
            return self.lifecycle
        if self.circuit_open:
            return PoolState.UNAVAILABLE
        if self.probing and len(self.conns) < self.min_size:
            return PoolState.DEGRADED
        return PoolState.READY

    # -- views ------------------------------------------------------------------------------------

    def exhausted_message(self, timeout: float, extra_waiter: int = 0) -> str:
        in_use, _streams = self._in_use()
        size = len(self.conns)
        cause = f"; last connect error: {self.last_error}" if self.last_error else ""
        extra = extra_waiter
        return (
            f"pool {self.name!r} exhausted: no connection within {timeout:g}s"
            f"{self.quota_limited()}"
            f" (size={size}/{self.max_size}, in_use={in_use}, idle={size - in_use},"
            f" opening={self.opening}, waiters={self.waiters.count + extra}){cause}"
        )

    def quota_limited(self) -> str:
        """Why the fleet quota holds this pool back, or "" when it does not."""
        q = self.quota
        if q is None or len(self.conns) + self.opening >= self.max_size:
            return ""
        if q.fits(self._quota_held(q)):
            return ""
        if not q.online:
            return (
                f": fleet quota {q.key!r} backend unreachable; serving from the reservation of"
                f" {q.granted} of limit {q.limit}, opening nothing beyond it"
            )
        return (
            f": fleet quota {q.key!r} at its limit ({q.used}/{q.limit} tokens held by"
            f" {q.holders} workers; this worker holds {q.granted})"
        )

    def _in_use(self) -> tuple[int, int]:
        conns = list(self.conns.values())  # a copy: exporters may call stats() from a thread
        if self.mux:
            return sum(1 for r in conns if r.streams), sum(r.streams for r in conns)
        n = sum(1 for r in conns if r.state is _IN_USE)
        return n, n

    def stats(self) -> PoolStats:
        """A snapshot; O(connections), never raises."""
        in_use, streams = self._in_use()
        size = len(self.conns)
        return PoolStats(
            name=self.name,
            state=self.state,
            size=size,
            idle=size - in_use,
            in_use=in_use,
            opening=self.opening,
            waiters=self.waiters.count,
            streams_in_use=streams,
            min_size=self.min_size,
            max_size=self.max_size,
            acquired=self.n_acquired,
            exhausted=self.n_exhausted,
            timeouts=self.n_timeouts,
            unavailable=self.n_unavailable,
            connects=self.n_connects,
            connect_failures=self.n_connect_failures,
            closed=dict(self.closed_by),
            wait_p95_ms=self.window.current(self.n_acquired) * 1000.0,
            last_error=None if self.last_error is None else scrub(str(self.last_error)),
            ping_rtt_ms=None if self.ping_rtt is None else self.ping_rtt * 1000.0,
            waited=self.n_waited,
            warm_target=self.warm_target,
            idle_time=self.idle_time,
            **self._quota_stats(),
        )

    def _quota_stats(self) -> dict[str, Any]:
        q = self.quota
        if q is None:
            return {}
        return {
            "quota_key": q.key,
            "quota_limit": q.limit,
            "quota_reserved": q.granted,
            "quota_used": self._quota_held(q) * q.per,
            "quota_fleet_used": q.used,
            "quota_holders": q.holders,
            "quota_backend_errors": q.backend_errors,
            "quota_blocked": bool(self.quota_limited()),
        }

    def check(self) -> None:
        """Assert every invariant of the bookkeeping (tests call it after each step)."""
        assert self.opening >= 0, self.opening
        assert len(self.conns) + self.opening <= self.max_size, (len(self.conns), self.opening)
        self.waiters.check()
        idle_ids = {id(r) for r in self.idle}
        assert len(idle_ids) == len(self.idle), "a record is twice in idle"
        for rec in self.conns.values():
            assert rec.state is not _CLOSED
            assert (rec.state is _IDLE) == (id(rec) in idle_ids), rec
            assert self.by_conn.get(id(rec.conn)) is rec
            if self.mux:
                assert rec.streams >= 0, rec
                assert rec.streams <= self.max_streams, rec
                assert 0 <= rec.cap <= self.max_streams, rec
        for rec in self.idle:
            assert self.conns.get(rec.id) is rec, "idle record not in the pool"
        assert self.steps or not self.probing, "probing with no failure counted"
        if self.mux:
            assert all(self.conns.get(r.id) is r for r in self.mux_conns)
            assert len(self.mux_conns) == len(self.conns)
        if self.closing:
            assert self.waiters.count == 0
        if self.circuit_open:
            assert self.waiters.count == 0, "waiters queued behind an open circuit"
        if self.waiters.count and not self.closing and self.lifecycle is PoolState.READY:
            # Someone waits: a connect runs, or one is scheduled, or every slot is busy.
            assert (
                self.opening
                or self.steps
                or self._refill
                or len(self.conns) >= self.max_size
                or (self.mux and any(r.suspect or r.pinging for r in self.mux_conns))
                or any(r.state is _PINGING for r in self.conns.values())
                or (self.quota is not None and (self.quota.in_flight or self.quota.short > 0))
            ), "a waiter waits for nothing"

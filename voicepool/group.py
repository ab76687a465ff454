"""`PoolGroup[C]`: member pools of one service (regions, a fallback provider, two SIP carriers).

A group lends from the member it currently *serves from* (its active member) and fails over
before any call pays for it: every member pool already knows, out of band, whether it is healthy
(its circuit: ``pool.state``) and how far away it is (its ping round trip), so the choice is made
from that, in the background, when a member reports a state change or a ping.

Choosing, per acquire (no await unless nothing is free):

1. The active member, then the others in policy order: the first that is not UNAVAILABLE and has
   a connection free right now lends it (``pool.lease_nowait()``). A free connection on a later
   member beats a handshake on an earlier one: a call never pays a connect a standby could spare.
   A member that just lost a connection or a ping (until a connect or ping succeeds again) is
   *suspect*: its idle connections are lent only when no other member has one free, so the calls
   between a provider's crash and its circuit opening do not get its other dead sockets.
2. Nothing free: if the first usable member can open a connection (below ``max_size``, its last
   connect did not fail), the caller waits on it alone; otherwise on every usable member at once
   (each member keeps its FIFO, and a group waiter is queued in all of them, so the group is FIFO
   too); the first grant wins and the other places in line are given back.
3. Every member UNAVAILABLE: :class:`~voicepool.PoolUnavailable` at once, whose ``__cause__`` is
   an :class:`ExceptionGroup` of each member's last error (in member order).

Which member is active (one place: :meth:`PoolGroup._reselect`, run on a member's state change,
ping, and the fail-back timer):

* ``priority``: the first member in order; ``lowest_rtt``: the lowest smoothed ping round trip
  (connect time until pings arrive), switching only for a gain of more than ``rtt_hysteresis``
  (a fraction) and ``rtt_margin`` seconds, so a 1 ms difference never flaps.
* Failover: the active member turned UNAVAILABLE (or closed): the best READY member, else the best
  DEGRADED one, takes over at once. Fail-back (or an RTT switch): a better member takes over only
  after it stayed READY for ``failback_after`` seconds and no switch happened in that time, for
  new leases only (leases in use never move). A member that goes up and down faster than that
  never takes traffic back, and round trips that cross back and forth switch at most once per
  ``failback_after``.
* The active member keeps its own warm floor (``min_size``); the others keep a *standby floor* of
  warm, pinged connections, so the first calls after a failover pay no handshake; on a switch the
  new active grows to its full floor in the background and the old one shrinks to its standby
  floor.
* The standby floor (``standby = "adaptive"``, the default) follows the group's traffic: the calls
  that arrive while a standby opens one connection are what it must hold warm, so each member
  keeps an :class:`~voicepool._engine.warm.AdaptiveWarm` estimator (the adaptive warm floor's:
  arrival rate with its trend, the member's observed connect time, the ``warm_target`` Poisson
  quantile of the pool's settings) fed with the group's lease arrivals, and once a second
  (:meth:`PoolGroup._size_standbys`) each standby's floor is set to
  ``max(standby_min, quantile(rate x its connect time))`` within its ``max_size``. It grows at
  once and shrinks by one connection per ``_STANDBY_WINDOW`` (20 s) at most, so it does not
  oscillate; idle, it comes down to ``standby_min``, the hard minimum. ``standby = "fixed"``:
  ``standby_min`` exactly (size it by hand to the arrivals within a connect time).

Telemetry goes through :class:`GroupObserver` hooks (the telemetry layer registers a factory; this
module never imports it): a switch is counted when it happens and reported as a span event on the
span of the first caller served by the new member.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, TypeVar

from voicepool._engine.observer import PoolObserver
from voicepool._engine.warm import AdaptiveWarm
from voicepool.adapter import Adapter, LeaseMode
from voicepool.errors import ConfigError, PoolClosed, PoolError, PoolExhausted, PoolUnavailable
from voicepool.lease import Lease
from voicepool.pool import Pool, PoolState

__all__ = [
    "GroupObserver",
    "GroupPolicy",
    "PoolGroup",
    "add_group_observer_factory",
    "compatible",
    "remove_group_observer_factory",
]

C = TypeVar("C")
log = logging.getLogger("voicepool.group")

_RTT_SMOOTHING = 0.3  # weight of a new sample in the smoothed round trip (EWMA)
_USABLE = (PoolState.READY, PoolState.DEGRADED)
_LOSSES = frozenset({"remote_closed", "ping_failed"})  # close reasons that make a member suspect
_TRIM_EVERY = 0.5  # seconds between closes of standby connections that came back from a lease
_SIZE_EVERY = 1.0  # seconds between updates of the adaptive standby floors (the estimator's bucket)
# The estimators' time constant: a standby must be sized for the traffic of the last seconds (a
# failover can come minutes after a worker boots, or seconds), and spares fall by one per window.
_STANDBY_WINDOW = 20.0
_STANDBY_MODES = ("adaptive", "fixed")


def compatible(a: type[Adapter[Any]], b: type[Adapter[Any]]) -> bool:
    """Whether pools of adapters ``a`` and ``b`` may be members of one group: the same adapter,
    or two adapters that declare the same :attr:`~voicepool.Adapter.service`."""
    return a is b or (a.service is not None and a.service == b.service)


def _lends(pool: Pool[Any]) -> bool:
    """Booted well enough to lend: READY, or DEGRADED with at least one connection open."""
    state = pool.state
    return state is PoolState.READY or (state is PoolState.DEGRADED and pool.stats().size > 0)


def _can_open(pool: Pool[Any]) -> bool:
    """READY with room: an acquire that finds nothing free opens a connection (slow path only)."""
    st = pool.stats()
    return st.state is PoolState.READY and st.size + st.opening < st.max_size


class GroupPolicy(enum.Enum):
    """How a group ranks its members."""

    PRIORITY = "priority"  # in the order given
    LOWEST_RTT = "lowest_rtt"  # lowest smoothed ping round trip, with hysteresis


class GroupObserver:
    """No-op base of the hooks a group calls (synchronously; observers must not raise or block)."""

    def on_switch(self, group: PoolGroup[Any], old: str, new: str, why: str, back: bool) -> None:
        """The active member changed (``back``: a fail-back or RTT switch, else a failover).

        Called where the change was decided: usually a member pool's background task.
        """

    def on_switch_served(self, group: PoolGroup[Any], old: str, new: str, why: str) -> None:
        """The first lease after a switch was served by ``new`` (called in the caller's task)."""

    def on_served(self, group: PoolGroup[Any], member: str, waited: float) -> None:
        """A group acquire that found nothing free right away got a lease from ``member``."""


GroupObserverFactory = Callable[["PoolGroup[Any]"], GroupObserver | None]
_factories: list[GroupObserverFactory] = []


def add_group_observer_factory(factory: GroupObserverFactory) -> None:
    """Call ``factory(group)`` for every group created from now on (idempotent per factory)."""
    if factory not in _factories:
        _factories.append(factory)


def remove_group_observer_factory(factory: GroupObserverFactory) -> None:
    """Undo :func:`add_group_observer_factory`; unknown factories are ignored."""
    if factory in _factories:
        _factories.remove(factory)


@dataclass(eq=False, slots=True)
class _Member(Generic[C]):
    pool: Pool[C]
    rank: int  # position in the group's member order
    full_min: int  # the pool's own warm floor, restored when it becomes active
    ready_since: float | None = None  # clock time it last turned READY (None: not READY now)
    rtt: float | None = None  # smoothed ping round trip, seconds
    connect: float | None = None  # smoothed connect time, seconds (ranks until pings arrive)
    # A connection was lost or failed its ping, and no connect or ping succeeded since: its other
    # idle connections may be dead too (a network event rarely kills one socket), so new leases
    # prefer the other members' free connections until it proves itself again.
    suspect: bool = False
    # standby = "adaptive": the estimator of the calls arriving within one of its connects.
    warm: AdaptiveWarm | None = None

    @property
    def name(self) -> str:
        return self.pool.name


class _MemberWatch(PoolObserver):
    """Attached to each member pool: state changes, pings and connects feed the group."""

    def __init__(self, group: PoolGroup[Any], member: _Member[Any]) -> None:
        self.group = group
        self.member = member

    def on_state(self, pool: Pool[Any], old: PoolState, new: PoolState) -> None:
        self.group._member_state(self.member, new)

    def on_ping(self, pool: Pool[Any], duration: float, error: BaseException | None) -> None:
        m = self.member
        if error is not None:
            m.suspect = True
            return
        m.suspect = False
        m.rtt = duration if m.rtt is None else m.rtt + _RTT_SMOOTHING * (duration - m.rtt)
        if self.group.policy is GroupPolicy.LOWEST_RTT:
            self.group._reselect()

    def on_closed(self, pool: Pool[Any], reason: str) -> None:
        if reason in _LOSSES:
            self.member.suspect = True

    def on_lost_in_use(self, pool: Pool[Any], reason: str) -> None:
        # A leased socket dropped: its idle neighbours may be dead too (a crash reaches the
        # sockets in use first when most are in use). SINGLE_USE sockets end with their call
        # (a Deepgram CloseStream is answered by the server's close): that is no news.
        if reason in _LOSSES and pool.lease_mode is not LeaseMode.SINGLE_USE:
            self.member.suspect = True

    def on_connected(
        self, pool: Pool[Any], token: object, duration: float, error: BaseException | None
    ) -> None:
        if error is None:
            m = self.member
            m.suspect = False
            if m.warm is not None:
                m.warm.connected(duration)
            m.connect = (
                duration
                if m.connect is None
                else m.connect + _RTT_SMOOTHING * (duration - m.connect)
            )


class PoolGroup(Generic[C]):
    """Member pools of one service, lent from as one: see the module docstring for the rules.

    ``async with PoolGroup([eu, us], name="tts") as group:`` starts the members (concurrently) and
    closes them; ``async with group.acquire() as lease:`` borrows from the serving member
    (``lease.pool`` says which: with adapters of two providers, the handler branches on it).
    Members share one lease mode and one adapter, or adapters of one ``Adapter.service``.
    ``standby``: ``"adaptive"`` (standby floors follow the traffic, never below ``standby_min``)
    or ``"fixed"`` (``standby_min`` exactly).
    Raises ConfigError for an empty or mixed member list, a repeated member, or a bad setting.
    """

    def __init__(
        self,
        members: Sequence[Pool[C]],
        *,
        name: str,
        policy: GroupPolicy | str = GroupPolicy.PRIORITY,
        standby_min: int = 1,
        standby: str = "adaptive",
        failback_after: float = 30.0,
        rtt_hysteresis: float = 0.2,
        rtt_margin: float = 0.002,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if not members:
            raise ConfigError(f"groups.{name}.members: a group needs at least one member pool")
        names = [p.name for p in members]
        if len(set(names)) != len(names):
            raise ConfigError(f"groups.{name}.members: a pool is listed twice: {names}")
        first = members[0]
        for p in members[1:]:
            if not compatible(type(first.adapter), type(p.adapter)) or (
                p.lease_mode is not first.lease_mode
            ):
                raise ConfigError(
                    f"groups.{name}.members: {p.name!r} ({type(p.adapter).__name__},"
                    f" {p.lease_mode.value}) is not compatible with {first.name!r}"
                    f" ({type(first.adapter).__name__}, {first.lease_mode.value}): members of a"
                    " group must use one lease mode and the same adapter (or adapters of one"
                    " service, Adapter.service)"
                )
        if standby_min < 0:
            raise ConfigError(f"groups.{name}.standby_min: must be >= 0, got {standby_min}")
        if standby not in _STANDBY_MODES:
            raise ConfigError(
                f"groups.{name}.standby: {standby!r} is not one of {', '.join(_STANDBY_MODES)}"
            )
        if failback_after < 0:
            raise ConfigError(f"groups.{name}.failback_after: must be >= 0, got {failback_after}")
        try:
            self.policy = GroupPolicy(policy)
        except ValueError:
            allowed = ", ".join(p.value for p in GroupPolicy)
            raise ConfigError(f"groups.{name}.policy: {policy!r} is not one of {allowed}") from None
        self.name = name
        self.standby_min = standby_min
        self.standby = standby
        self.failback_after = failback_after
        self.rtt_hysteresis = rtt_hysteresis
        self.rtt_margin = rtt_margin
        self._clock = clock or time.monotonic
        self._members: list[_Member[C]] = [_Member(p, i, p.min_size) for i, p in enumerate(members)]
        if standby == "adaptive":
            for m in self._members:
                # No slack: a standby that takes over grows at once; no burst memory: it counts
                # whole buckets, longer than a connect (see AdaptiveWarm).
                m.warm = AdaptiveWarm(
                    m.pool.settings.warm_target, _STANDBY_WINDOW, slack=0.0, bursts=False
                )
        self._arrivals = 0  # group leases asked for (the standby estimators' arrival count)
        self._size_timer: asyncio.TimerHandle | None = None
        self._watches = [_MemberWatch(self, m) for m in self._members]
        for m, watch in zip(self._members, self._watches, strict=True):
            m.pool.add_observer(watch)
        self._active = self._members[0]
        self._order: tuple[_Member[C], ...] = tuple(self._members)
        self._announce: tuple[str, str, str] | None = None  # a switch no caller has seen yet
        self._switched_at = -float("inf")  # clock time of the last switch (not the boot choice)
        self._failback_timer: asyncio.TimerHandle | None = None
        self._trim_timer: asyncio.TimerHandle | None = None
        self._releasers: set[asyncio.Task[None]] = set()
        self._started = False
        self._chosen = False  # the first choice (after boot) was made
        self._closed = False
        self.failovers = 0
        self.failbacks = 0
        if self.policy is GroupPolicy.PRIORITY:
            # The order is known before boot: standbys warm only their standby floor.
            for m in self._members[1:]:
                m.pool.set_min_size(self._standby_floor(m))
        self._observers: list[GroupObserver] = [
            obs for obs in (f(self) for f in _factories) if obs is not None
        ]

    # -- public API -------------------------------------------------------------------------------

    @property
    def members(self) -> tuple[Pool[C], ...]:
        """The member pools, in the order given."""
        return tuple(m.pool for m in self._members)

    @property
    def active(self) -> Pool[C]:
        """The member new leases are served from (unless it has nothing free right now)."""
        return self._active.pool

    @property
    def state(self) -> PoolState:
        """The best member state: READY if one member is, else DEGRADED, else the first's."""
        states = [m.pool.state for m in self._members]
        for good in _USABLE:
            if good in states:
                return good
        return states[0]

    def rtt(self, member: str) -> float | None:
        """The smoothed ping round trip (seconds) the group measured for ``member``, if any."""
        for m in self._members:
            if m.name == member:
                return m.rtt
        raise KeyError(f"group {self.name!r} has no member {member!r}")

    def acquire(self, timeout: float | None = None) -> _GroupAcquire[C]:
        """``async with group.acquire() as lease:``; ``lease.pool`` is the member that served it.

        ``timeout`` (default: each member's ``acquire_timeout``) bounds the whole wait. Raises on
        entry PoolUnavailable at once when every member is unavailable (``__cause__``: an
        ExceptionGroup of each member's last error), PoolExhausted when no member had a
        connection within the timeout, PoolClosed when the group is closed. Cancellation-safe:
        a cancelled acquire holds no place in any member's queue and leaks no connection.
        """
        return _GroupAcquire(self, timeout)

    async def lease(self, timeout: float | None = None) -> Lease[C]:
        """The member's lease without ``async with``; give it back with ``await lease.release()``.

        Raises as :meth:`acquire` does; cancellation-safe.
        """
        got = self._take()
        if got is not None:
            return got
        return await self._lease_slow(timeout)

    def _take(self) -> Lease[C] | None:
        """Step 1 of choosing (module docstring): a connection free right now, or None.

        Synchronous on purpose: an acquire that finds a connection free completes without
        yielding to the event loop, so no other call's callbacks run inside its wait. Raises
        PoolError when the group is closed.
        """
        if self._closed:
            raise PoolError(f"group {self.name!r} is closed", pool=self.name)
        self._arrivals += 1
        suspects = None
        for m in self._order:
            pool = m.pool
            if m.suspect:
                suspects = [m] if suspects is None else [*suspects, m]
                continue
            if pool.state is PoolState.UNAVAILABLE:
                continue
            got = pool.lease_nowait()
            if got is not None:
                if self._announce is not None:
                    self._served(m, None)
                return got
        for m in suspects or ():  # nothing free elsewhere: a suspect's connection, if any
            if m.pool.state is not PoolState.UNAVAILABLE:
                got = m.pool.lease_nowait()
                if got is not None:
                    if self._announce is not None:
                        self._served(m, None)
                    return got
        return None

    async def start(self, *, require_ready: bool = True) -> None:
        """Start every member that is not started yet, concurrently, and choose the active one.

        The group is ready when one member is. If none could open a connection: with
        ``require_ready`` the members are closed and PoolUnavailable is raised (cause: an
        ExceptionGroup of each member's error); without it the group starts unavailable and its
        members recover in the background. Cancelling start closes the members.
        """
        if self._started:
            raise PoolError(f"group {self.name!r} was already started", pool=self.name)
        self._started = True
        fresh = [m.pool for m in self._members if m.pool.state is PoolState.NEW]
        try:
            await asyncio.gather(*(p.start(require_ready=False) for p in fresh))
        except BaseException:
            await asyncio.shield(self.aclose(0))
            raise
        now = self._clock()
        for m in self._members:
            m.ready_since = now if m.pool.state is PoolState.READY else None
        if require_ready and not any(_lends(m.pool) for m in self._members):
            err = self._unavailable()
            await self.aclose(0)
            raise err
        self._reselect(initial=True)
        if self.standby == "adaptive":
            self._size_timer = asyncio.get_running_loop().call_later(
                _SIZE_EVERY, self._size_standbys
            )

    async def aclose(self, timeout: float | None = None) -> None:
        """Close every member (see :meth:`voicepool.Pool.aclose`) and stop choosing. Idempotent."""
        self._closed = True
        for timer in (self._failback_timer, self._trim_timer, self._size_timer):
            if timer is not None:
                timer.cancel()
        self._failback_timer = self._trim_timer = self._size_timer = None
        for m, watch in zip(self._members, self._watches, strict=True):
            m.pool.remove_observer(watch)
        await asyncio.gather(
            *(m.pool.aclose(timeout) for m in self._members), return_exceptions=True
        )

    async def __aenter__(self) -> PoolGroup[C]:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        members = ", ".join(f"{m.name}:{m.pool.state.value}" for m in self._members)
        return (
            f"<PoolGroup {self.name!r} {self.policy.value} active={self._active.name} [{members}]>"
        )

    # -- acquire, slow path ---------------------------------------------------------------------

    async def _lease_slow(self, timeout: float | None) -> Lease[C]:
        usable = [m for m in self._order if m.pool.state in _USABLE]
        if not usable:
            raise self._unavailable()
        t0 = self._clock()
        first = usable[0]
        got: Lease[C] | None = None
        errors: list[Exception] = []
        if _can_open(first.pool):
            # A healthy member that will open a connection for us: no need to queue elsewhere.
            try:
                got = await first.pool.lease(timeout)
            except PoolUnavailable as exc:  # its circuit opened while we waited: try the rest
                errors.append(exc)
                usable = [m for m in usable[1:] if m.pool.state in _USABLE]
                if not usable:
                    raise self._unavailable() from None
        if got is None:
            if timeout is not None:
                timeout = max(0.0, timeout - (self._clock() - t0))
            got = await self._wait_all(usable, timeout, errors)
        member = next(m for m in self._members if m.pool is got.pool)
        self._served(member, self._clock() - t0)
        return got

    async def _wait_all(
        self, usable: list[_Member[C]], timeout: float | None, errors: list[Exception]
    ) -> Lease[C]:
        """Queue in every usable member at once; the first grant wins, the rest are given back."""
        loop = asyncio.get_running_loop()
        tasks = {loop.create_task(m.pool.lease(timeout)): m for m in usable}
        winner: Lease[C] | None = None
        try:
            pending = set(tasks)
            while pending and winner is None:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task.cancelled():
                        continue
                    exc = task.exception()
                    if exc is None:
                        if winner is None:
                            winner = task.result()
                    elif isinstance(exc, Exception):
                        errors.append(exc)
        finally:
            # Losers (and, when we were cancelled, everything): cancel the waits, and give back
            # any lease granted in the same loop iteration, in the background.
            for task in tasks:
                if (
                    winner is not None
                    and task.done()
                    and not task.cancelled()
                    and task.exception() is None
                    and task.result() is winner
                ):
                    continue
                task.cancel()
                task.add_done_callback(self._give_back)
        if winner is not None:
            return winner
        cause = ExceptionGroup(f"members of group {self.name!r}", errors) if errors else None
        if len(errors) == len(tasks) and all(isinstance(e, PoolClosed) for e in errors):
            raise PoolClosed(f"group {self.name!r} is closing", pool=self.name) from cause
        if len(errors) == len(tasks) and all(isinstance(e, PoolUnavailable) for e in errors):
            raise PoolUnavailable(
                f"group {self.name!r}: every member became unavailable while waiting",
                pool=self.name,
            ) from cause
        raise PoolExhausted(
            f"group {self.name!r}: no member had a connection free within the timeout"
            f" ({', '.join(f'{m.name} {m.pool.state.value}' for m in usable)})",
            pool=self.name,
        ) from cause

    def _give_back(self, task: asyncio.Task[Lease[C]]) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        release = asyncio.get_running_loop().create_task(task.result().release())
        self._releasers.add(release)
        release.add_done_callback(self._releasers.discard)

    def _served(self, member: _Member[C], waited: float | None) -> None:
        announce = self._announce
        if announce is not None and member is self._active:
            self._announce = None
            for obs in self._observers:
                obs.on_switch_served(self, *announce)
        if waited is not None:
            for obs in self._observers:
                obs.on_served(self, member.name, waited)

    def _unavailable(self) -> PoolUnavailable:
        errors: list[Exception] = []
        for m in self._members:
            last = m.pool.last_error
            if isinstance(last, Exception):
                errors.append(last)
            else:
                errors.append(
                    PoolUnavailable(f"pool {m.name!r} is {m.pool.state.value}", pool=m.name)
                )
        err = PoolUnavailable(
            f"group {self.name!r}: every member is unavailable ("
            + ", ".join(f"{m.name} {m.pool.state.value}" for m in self._members)
            + ")",
            pool=self.name,
        )
        err.__cause__ = ExceptionGroup(f"last errors of group {self.name!r}", errors)
        return err

    # -- choosing the active member (the one place it changes) ----------------------------------

    def _member_state(self, member: _Member[C], new: PoolState) -> None:
        if new is PoolState.READY:
            if member.ready_since is None:
                member.ready_since = self._clock()
        else:
            member.ready_since = None
        self._reselect()

    def _score(self, m: _Member[C], by_ping: bool) -> float:
        value = m.rtt if by_ping else m.connect
        return float("inf") if value is None else value

    def _ranked(self) -> list[_Member[C]]:
        if self.policy is GroupPolicy.PRIORITY:
            return list(self._members)
        by_ping = all(m.rtt is not None for m in self._members if m.pool.state in _USABLE)
        return sorted(self._members, key=lambda m: (self._score(m, by_ping), m.rank))

    def _beats(self, m: _Member[C], cur: _Member[C]) -> bool:
        if self.policy is GroupPolicy.PRIORITY:
            return m.rank < cur.rank
        by_ping = m.rtt is not None and cur.rtt is not None
        a, b = self._score(m, by_ping), self._score(cur, by_ping)
        return a * (1 + self.rtt_hysteresis) < b and b - a > self.rtt_margin

    def _reselect(self, *, initial: bool = False) -> None:
        """Decide the active member from the members' states and round trips (synchronous)."""
        if (not self._chosen and not initial) or self._closed:
            return  # members report states while they boot: the first choice is made after
        self._chosen = True
        now = self._clock()
        cur = self._active
        ranked = self._ranked()
        new: _Member[C] | None = None
        why = ""
        if initial or cur.pool.state not in _USABLE:
            new = next((m for m in ranked if m.pool.state is PoolState.READY), None) or next(
                (m for m in ranked if m.pool.state in _USABLE), None
            )
            why = "boot" if initial else f"{cur.name} {cur.pool.state.value}"
        else:
            wake_at = None
            for m in ranked:
                if m is cur:
                    break
                if m.pool.state is not PoolState.READY or m.ready_since is None:
                    continue
                if not self._beats(m, cur):
                    continue
                # READY for failback_after, and no other switch in that time: two healthy
                # members whose round trips cross back and forth (a loaded loop inflates pings)
                # trade traffic at most once per failback_after.
                due = max(m.ready_since, self._switched_at) + self.failback_after
                if now >= due:
                    new = m
                    why = "failback" if self.policy is GroupPolicy.PRIORITY else "lower_rtt"
                    break
                wake_at = due if wake_at is None else min(wake_at, due)
            if new is None and wake_at is not None:
                self._arm_failback(wake_at - now)
        if new is None or (new is cur and not initial):
            return
        self._switch(cur, new, why, initial)

    def _trim_standbys(self) -> None:
        """Bring every standby to its standby floor: idle connections above it close now; those
        still leased close as they come back (checked every _TRIM_EVERY while any is left)."""
        self._trim_timer = None
        if self._closed:
            return
        left = False
        for m in self._members:
            if m is self._active:
                continue
            floor = self._standby_floor(m)
            m.pool.set_min_size(floor)
            if m.pool.state not in (PoolState.CLOSING, PoolState.CLOSED):
                left = left or m.pool.stats().size > floor
        if left:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._trim_timer = loop.call_later(_TRIM_EVERY, self._trim_standbys)

    def _standby_floor(self, m: _Member[C]) -> int:
        """Warm connections ``m`` keeps while it is a standby: ``standby_min`` (at most its own
        floor), or with ``standby = "adaptive"`` its estimator's spare target if that is more,
        within its ``max_size``."""
        floor = min(self.standby_min, m.full_min)
        if m.warm is not None:
            floor = min(max(floor, m.warm.spares), m.pool.max_size)
        return floor

    def _size_standbys(self) -> None:
        """Adaptive standby floors, once per _SIZE_EVERY (timer): feed the group's arrivals to
        every member's estimator (the active one's too: it is a standby after the next switch)
        and move each standby's floor to its new target. Synchronous; growing opens in the
        member's background, shrinking closes only idle connections."""
        if self._size_timer is not None:
            self._size_timer.cancel()  # called out of turn (a test): one timer at a time
        self._size_timer = None
        if self._closed:
            return
        now = self._clock()
        for m in self._members:
            if m.warm is not None:
                m.warm.observe(self._arrivals, now)
            if m is self._active or m.pool.state in (PoolState.CLOSING, PoolState.CLOSED):
                continue
            floor = self._standby_floor(m)
            # Also when unchanged but larger: connections that served calls during a failover
            # came back idle above the floor (set_min_size retires idle ones only).
            if m.pool.min_size != floor or m.pool.stats().size > floor:
                m.pool.set_min_size(floor)
        self._size_timer = asyncio.get_running_loop().call_later(_SIZE_EVERY, self._size_standbys)

    def _arm_failback(self, delay: float) -> None:
        if self._failback_timer is not None:
            self._failback_timer.cancel()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        # A hair late rather than early: the check compares against failback_after exactly.
        self._failback_timer = loop.call_later(max(0.0, delay) + 1e-3, self._reselect)

    def _switch(self, cur: _Member[C], new: _Member[C], why: str, initial: bool) -> None:
        self._active = new
        rest = [m for m in self._ranked() if m is not new]
        self._order = (new, *rest)
        # Grow the new active first, then shrink the others: capacity never dips on a switch.
        new.pool.set_min_size(new.full_min)
        self._trim_standbys()
        if initial or new is cur:
            return
        self._switched_at = self._clock()
        back = why in ("failback", "lower_rtt")
        if back:
            self.failbacks += 1
        else:
            self.failovers += 1
        log.warning(
            "group %s: %s from %s to %s (%s)",
            self.name,
            "fail-back" if back else "failover",
            cur.name,
            new.name,
            why,
            extra={"voicepool.group.name": self.name},
        )
        self._announce = (cur.name, new.name, why)
        for obs in self._observers:
            obs.on_switch(self, cur.name, new.name, why, back)


class _GroupAcquire(Generic[C]):
    """What ``group.acquire()`` returns: enter to get the member's lease, exit to release it."""

    __slots__ = ("_group", "_lease", "_timeout")

    def __init__(self, group: PoolGroup[C], timeout: float | None) -> None:
        self._group = group
        self._timeout = timeout
        self._lease: Lease[C] | None = None

    async def __aenter__(self) -> Lease[C]:
        if self._lease is not None:
            raise RuntimeError("a group acquire can be entered only once; call acquire() again")
        group = self._group
        # The hit without the coroutine of group.lease() (one frame less on every acquire).
        lease = group._take()
        if lease is None:
            lease = await group._lease_slow(self._timeout)
        self._lease = lease
        return lease

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._lease is not None:
            await self._lease.__aexit__(exc_type, exc, tb)

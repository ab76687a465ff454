"""Hooks the engine calls on slow paths (waits, connects, pings, closes, state changes).

The telemetry layer registers a factory here (imports point downward: the engine never imports
telemetry). Every hook is called synchronously from the task that did the work, so a span event
lands on the caller's current span. Observers must not raise and must not block.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from voicepool._engine.state import PoolState

# The hooks receive the Pool (and, for on_acquire_end, the Lease). They are typed Any here, not
# Pool[Any], so this module never imports pool.py, which imports it: subclasses annotate them as
# ``pool: Pool[Any]`` (an override may narrow Any) and are type-checked against the real class.
_Pool = Any
_Lease = Any


class PoolObserver:
    """No-op base. Subclass and override what you need."""

    def on_exhausted(self, pool: _Pool) -> None:
        """An acquire queued while the pool was at max_size (called in the acquiring task)."""

    def on_waited(self, pool: _Pool, waited: float) -> None:
        """An acquire was served after waiting ``waited`` seconds (called in the acquiring task)."""

    def on_timeout(self, pool: _Pool, waited: float, error: BaseException) -> None:
        """An acquire timed out; ``error`` is the PoolExhausted about to be raised."""

    def on_unavailable(self, pool: _Pool, error: BaseException) -> None:
        """An acquire failed fast because the circuit is open."""

    def on_wait_failed(self, pool: _Pool, waited: float, error: BaseException) -> None:
        """A queued acquire ended after ``waited`` seconds without a lease and without timing out.

        ``error`` is what is about to propagate: the CancelledError of a cancelled caller (or of a
        timeout the caller put around the acquire), the PoolUnavailable set on every waiter when
        the circuit opens, or PoolClosed. Called in the acquiring task, before re-raising.
        """

    def acquire_started(self, pool: _Pool) -> object:
        """Only with ``trace_acquire``: an acquire begins; the result goes to on_acquire_end."""
        return None

    def on_acquire_end(
        self, pool: _Pool, token: object, lease: _Lease, error: BaseException | None
    ) -> None:
        """Only with ``trace_acquire``: the acquire ended (``error`` None when a lease was got)."""

    def connect_started(self, pool: _Pool) -> object:
        """A connect begins (background task); the return value is passed to on_connected."""
        return None

    def on_connected(
        self, pool: _Pool, token: object, duration: float, error: BaseException | None
    ) -> None:
        """A connect ended, with ``error`` None on success."""

    def on_ping(self, pool: _Pool, duration: float, error: BaseException | None) -> None:
        """A health ping ended."""

    def on_closed(self, pool: _Pool, reason: str) -> None:
        """A connection was retired for ``reason``."""

    def on_lost_in_use(self, pool: _Pool, reason: str) -> None:
        """A leased connection (or one with streams) was closed by its peer (``reason``: the
        adapter's close reason, else ``remote_closed``). The pool retires it when its lease
        ends, which is when :meth:`on_closed` is called; this is the news, as it happens."""

    def on_state(self, pool: _Pool, old: PoolState, new: PoolState) -> None:
        """The pool's circuit or lifecycle state changed."""

    def on_alarm(self, pool: _Pool, p95: float, firing: bool) -> None:
        """End of an alarm window: the p95 (seconds) is above threshold (firing) or recovered."""

    def on_flush(self, pool: _Pool, use_times: list[float], zero_waits: int) -> None:
        """Background flush: hold times since the last flush, and the no-wait acquire count."""

    def wants_use_times(self, pool: _Pool) -> bool:
        """Whether :meth:`on_flush` uses its ``use_times``: the pool times each lease only while
        some observer says yes (timing costs two clock reads per lease on the hot path).

        Asked when the observer is attached and at each flush (about once a second), so an
        answer that changes takes effect within a second. The default is yes for an observer
        that overrides :meth:`on_flush`. Must not raise.
        """
        return type(self).on_flush is not PoolObserver.on_flush

    def on_pool_closed(self, pool: _Pool) -> None:
        """The pool is closed; drop references to it."""


ObserverFactory = Callable[[_Pool], PoolObserver | None]
_factories: list[ObserverFactory] = []


def add_observer_factory(factory: ObserverFactory) -> None:
    """Call ``factory(pool)`` for every pool created from now on (idempotent per factory)."""
    if factory not in _factories:
        _factories.append(factory)


def remove_observer_factory(factory: ObserverFactory) -> None:
    """Undo :func:`add_observer_factory`; unknown factories are ignored."""
    if factory in _factories:
        _factories.remove(factory)


def observers_for(pool: _Pool) -> list[PoolObserver]:
    """The observers every registered factory wants attached to ``pool``."""
    found = []
    for factory in _factories:
        obs = factory(pool)
        if obs is not None:
            found.append(obs)
    return found

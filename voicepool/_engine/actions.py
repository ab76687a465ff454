"""What :class:`~voicepool._engine.core.PoolCore` asks its driver to do, in order.

Every core event returns a sequence of these; the driver (``voicepool.pool.Pool``) performs them
and decides nothing. They are frozen and slotted: cheap to build, impossible to alter on the way.

A reset is not an action: the releasing caller awaits it itself (it must finish before the
connection is lent again), then reports the outcome with ``core.released``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from voicepool._engine.record import ConnRecord
    from voicepool._engine.state import PoolState
    from voicepool._engine.waitqueue import Waiter

__all__ = [
    "Action",
    "Alarm",
    "Close",
    "Connect",
    "Fail",
    "Grant",
    "Ping",
    "QuotaSync",
    "StateChanged",
    "Wake",
]


@dataclass(frozen=True, slots=True)
class Connect:
    """Open one connection into a slot the core has already counted (``opening``).

    Hand this object back to ``core.connected``, ``core.connect_failed`` or
    ``core.connect_cancelled``: ``started`` places the attempt in time (failures that overlap
    are one backoff step) and ``generation`` says whether it began before an ``expire_all()``.
    """

    started: float
    generation: int


@dataclass(frozen=True, slots=True)
class Close:
    """Close ``rec.conn`` politely in the background; the core has already forgotten it."""

    rec: ConnRecord[Any]
    reason: str


@dataclass(frozen=True, slots=True)
class Ping:
    """Ping ``rec.conn`` under ``ping_timeout``, then report ``core.pinged``."""

    rec: ConnRecord[Any]


@dataclass(frozen=True, slots=True)
class Grant:
    """Wake ``waiter``: it holds ``waiter.rec`` (and ``waiter.stream_id``) now."""

    waiter: Waiter


@dataclass(frozen=True, slots=True)
class Fail:
    """Fail ``waiter`` with ``error`` (its ``__cause__`` is already set)."""

    waiter: Waiter
    error: BaseException


@dataclass(frozen=True, slots=True)
class StateChanged:
    """The pool's state changed: log it and tell the observers (the one transition point)."""

    old: PoolState
    new: PoolState


@dataclass(frozen=True, slots=True)
class Wake:
    """Call ``core.tick`` at ``at`` (the core's clock) or earlier: the one timer of the pool."""

    at: float


@dataclass(frozen=True, slots=True)
class Alarm:
    """An alarm window closed with acquire-wait p95 ``p95`` seconds: ``firing`` or recovered."""

    p95: float
    firing: bool
    count: int


@dataclass(frozen=True, slots=True)
class QuotaSync:
    """Tell the fleet quota's backend what this pool holds and wants, then report
    ``core.quota_synced`` (or ``core.quota_failed``): reserve more, refresh the TTL, give back.

    ``want``: tokens wanted; ``claimed``: tokens the pool believes it holds; ``waiting``: callers
    waiting now (the demand signal); ``busy``: leases in use plus those callers.
    """

    want: int
    claimed: int
    waiting: int
    busy: int


Action = Connect | Close | Ping | Grant | Fail | StateChanged | Wake | Alarm | QuotaSync

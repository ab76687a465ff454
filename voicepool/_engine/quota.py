"""The local side of a fleet quota: the tokens this pool holds in the fleet's backend (Redis).

Pure, like the core that owns it (no clock, no loop, no I/O). The core counts a token for every
connection it holds or opens (``per`` tokens each: ``max_streams`` for a MULTIPLEXED pool whose
quota counts streams), and admits a connect only when ``granted`` covers it. The warm path (an
idle hit, a release back to idle) never looks here: an idle connection holds its token already.

When demand is above the reservation the core emits :class:`~voicepool._engine.actions.QuotaSync`
asking for more; the driver performs it on the backend and reports :meth:`PoolCore.quota_synced`
or :meth:`PoolCore.quota_failed`. The same action refreshes the tokens' TTL every ``refresh``
seconds, publishes the demand signal (callers waiting), and gives back what is no longer needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

__all__ = ["QuotaBackend", "QuotaGate", "QuotaGrant"]


@dataclass(frozen=True, slots=True)
class QuotaGrant:
    """What the backend answered to one sync of one holder (a pool in one worker).

    ``granted``: tokens this holder holds now. ``used``: tokens held fleet-wide (<= ``limit``).
    ``holders``: holders with tokens; ``workers``: those plus holders only waiting for some
    (what a fair share divides by). ``others_waiting``: callers waiting
    in the other holders. ``busy``: leases in use plus callers waiting, summed over the fleet.
    ``epoch``: the backend state's identity (it changes when Redis lost its data).
    ``recovering``: new tokens are refused while holders re-register after such a loss.
    """

    granted: int
    used: int
    holders: int
    others_waiting: int
    busy: int
    epoch: str = ""
    recovering: bool = False
    workers: int = 0


class QuotaBackend(Protocol):
    """What the driver needs of a fleet quota's backend (``voicepool.quota.FleetQuota``)."""

    def holder(self, pool: str) -> str: ...

    async def sync(
        self,
        key: str,
        holder: str,
        *,
        want: int,
        claimed: int,
        waiting: int,
        busy: int,
        limit: int,
        ttl: float,
        step: int = 1,
        recover: float | None = None,
        urgent: bool = False,
    ) -> QuotaGrant:
        """One round trip (see ``voicepool.quota.FleetQuota.sync``). With ``urgent`` the pool
        drives the coroutine up to its first suspension in the step that asked (so the request
        goes out in that step) and resumes it in a task under the quota's timeout: that first
        step must not need a task of its own (no ``asyncio.timeout``, nothing that cancels the
        current task)."""
        ...

    async def aclose(self) -> None: ...


class QuotaGate:
    """The reservation of one pool; the core reads and writes it, the driver never decides."""

    __slots__ = (
        "backend_errors",
        "busy",
        "closing",
        "epoch",
        "granted",
        "holders",
        "in_flight",
        "key",
        "limit",
        "online",
        "others_waiting",
        "per",
        "poll",
        "refresh",
        "retry_at",
        "short",
        "sync_due",
        "syncs",
        "used",
        "yielding",
    )

    def __init__(self, key: str, limit: int, per: int, refresh: float, poll: float) -> None:
        self.key = key
        self.limit = limit
        self.per = per  # tokens one connection holds
        self.refresh = refresh
        self.poll = poll
        self.granted = 0  # tokens the backend confirmed for this pool (the reservation)
        self.closing: set[int] = set()  # ids of retired connections whose close still runs
        self.short = 0  # connects the pool wanted at its last growth that the quota refused
        self.in_flight = False  # one sync at a time
        self.retry_at = 0.0  # no new ask before this (a refused ask waits, it does not spin)
        self.sync_due = 0.0  # the next refresh
        self.online = True  # the last sync reached the backend
        self.backend_errors = 0
        self.syncs = 0
        self.used = 0
        self.holders = 0
        self.others_waiting = 0
        self.busy = 0
        self.epoch = ""
        self.yielding = False  # gave idle spares to starved workers; asks for nothing meanwhile

    def fits(self, held: int) -> bool:
        """Whether one more connection fits in the reservation beside ``held`` ones."""
        return (held + 1) * self.per <= self.granted

    def covered(self) -> int:
        """How many connections the reservation covers."""
        return self.granted // self.per

    def __repr__(self) -> str:
        return (
            f"<QuotaGate {self.key!r} granted={self.granted} used={self.used}/{self.limit}"
            f" holders={self.holders} online={self.online}>"
        )

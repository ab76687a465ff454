"""`PoolState` (lifecycle and circuit) and `PoolStats` (a snapshot), re-exported by voicepool."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["PoolState", "PoolStats"]


class PoolState(enum.Enum):
    """Lifecycle and circuit state of a pool, as reported by ``stats().state``."""

    NEW = "new"
    STARTING = "starting"
    READY = "ready"  # circuit closed and at least min_size open
    DEGRADED = "degraded"  # circuit closed, below min_size after failures; refilling with backoff
    UNAVAILABLE = "unavailable"  # circuit open: acquire fails fast, a probe retries in background
    CLOSING = "closing"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class PoolStats:
    """A cheap snapshot of one pool, for health endpoints, metrics and tests."""

    name: str
    state: PoolState
    size: int  # open connections, in use or not (opening excluded)
    idle: int  # open and not leased (MULTIPLEXED: no stream open)
    in_use: int  # leased (MULTIPLEXED: at least one stream open)
    opening: int  # connects in flight (slots already counted)
    waiters: int
    streams_in_use: int
    min_size: int
    max_size: int
    acquired: int
    exhausted: int
    timeouts: int
    unavailable: int
    connects: int
    connect_failures: int
    closed: Mapping[str, int] = field(default_factory=dict)
    wait_p95_ms: float = 0.0
    last_error: str | None = None
    ping_rtt_ms: float | None = None  # smoothed (EWMA) round trip of recent successful pings
    waited: int = 0  # acquires that queued (for a handshake or a release); the rest were warm
    warm_target: int = 0  # the warm floor last computed (adaptive: in use plus spares)
    idle_time: float = 0.0  # socket-seconds open while idle (what a time-billed provider bills)
    # Fleet quota (None / 0 without one): its key and limit, the tokens this pool reserved, those
    # its connections use, those the fleet uses, workers holding, failed backend round trips, and
    # whether the quota is what holds a connect back now.
    quota_key: str | None = None
    quota_limit: int = 0
    quota_reserved: int = 0
    quota_used: int = 0
    quota_fleet_used: int = 0
    quota_holders: int = 0
    quota_backend_errors: int = 0
    quota_blocked: bool = False

    @property
    def warm_share(self) -> float:
        """The share of acquires served at once from a warm connection (1.0 before any)."""
        return 1.0 - self.waited / self.acquired if self.acquired else 1.0

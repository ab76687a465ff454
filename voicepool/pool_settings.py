"""`PoolSettings`: the sizing, timeout and health knobs of one pool, and the sizing rule.

Sizing (DESIGN.md): ``max_size = ceil(concurrency * per_call * (1 + headroom) / max_streams)``
unless given; ``min_size`` defaults to ``max_size`` (a warm floor) for EXCLUSIVE and MULTIPLEXED,
and to a few spares, ``ceil(concurrency * per_call * headroom)``, for SINGLE_USE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from voicepool.adapter import LeaseMode

if TYPE_CHECKING:
    from voicepool.adapter import Adapter

__all__ = ["PoolSettings", "ResolvedSizing"]


class PoolSettings(BaseModel):
    """Settings of one pool. Every bad value raises a pydantic ``ValidationError`` naming the field.

    Durations are seconds. ``None`` on an optional duration turns that feature off.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    concurrency: int = Field(10, ge=1, description="Concurrent calls this worker serves.")
    per_call: float = Field(1.0, gt=0, description="Leases one call holds at once on this pool.")
    headroom: float = Field(
        0.25, ge=0, le=4, description="Spare capacity above the need (0.25=25%)."
    )
    min_size: int | None = Field(
        None, ge=0, description="Warm floor; default from the sizing rule."
    )
    max_size: int | None = Field(
        None, ge=1, description="Hard bound; default from the sizing rule."
    )
    lease_mode: LeaseMode | None = Field(None, description="Override the adapter's lease mode.")
    max_streams: int | None = Field(
        None, ge=1, description="Override the adapter's streams per connection (MULTIPLEXED)."
    )
    acquire_timeout: float = Field(3.0, gt=0, description="Longest wait for a lease.")
    connect_timeout: float = Field(10.0, gt=0, description="Longest connect + handshakes.")
    connect_concurrency: int = Field(16, ge=1, description="Connects in flight at once.")
    ping_interval: float = Field(30.0, gt=0, description="Health ping period of idle connections.")
    ping_timeout: float = Field(5.0, gt=0, description="A ping slower than this fails.")
    max_lifetime: float | None = Field(
        1800.0, gt=0, description="Retire connections older than this (jittered 10% down)."
    )
    idle_timeout: float | None = Field(
        600.0, gt=0, description="Close connections above min_size idle this long."
    )
    failure_threshold: int = Field(
        5, ge=1, description="Consecutive connect failures that open the circuit."
    )
    min_healthy: float = Field(
        2.0,
        ge=0,
        description="A connection lost this soon after opening (unproven) is a failed connect.",
    )
    backoff_initial: float = Field(1.0, gt=0, description="First retry delay cap after a failure.")
    backoff_multiplier: float = Field(1.6, ge=1, description="Growth of the retry delay cap.")
    backoff_max: float = Field(30.0, gt=0, description="Largest retry delay.")
    drain_timeout: float = Field(10.0, ge=0, description="aclose() waits this long for leases.")
    leak_threshold: float | None = Field(
        None, gt=0, description="Warn once when a lease is held longer than this."
    )
    alarm_wait_p95_ms: float = Field(5.0, gt=0, description="Acquire-wait p95 alarm threshold.")
    alarm_window: float = Field(60.0, gt=0, description="Rolling window of the p95 alarm.")
    trace_acquire: bool = Field(False, description="A span per acquire (debugging; costly).")

    @field_validator("max_size")
    @classmethod
    def _max_not_below_min(cls, value: int | None, info: ValidationInfo) -> int | None:
        low = info.data.get("min_size")
        if value is not None and low is not None and low > value:
            raise ValueError(f"max_size ({value}) must be >= min_size ({low})")
        return value

    @field_validator("backoff_max")
    @classmethod
    def _backoff_order(cls, value: float, info: ValidationInfo) -> float:
        first = info.data.get("backoff_initial")
        if first is not None and value < first:
            raise ValueError(f"backoff_max ({value}) must be >= backoff_initial ({first})")
        return value

    @field_validator("ping_timeout")
    @classmethod
    def _ping_timeout_fits(cls, value: float, info: ValidationInfo) -> float:
        interval = info.data.get("ping_interval")
        if interval is not None and value > interval:
            raise ValueError(f"ping_timeout ({value}) must be <= ping_interval ({interval})")
        return value

    def resolve(self, adapter: Adapter[Any]) -> ResolvedSizing:
        """Apply the sizing rule for ``adapter``. Raises ValueError when min_size > max_size."""
        mode = self.lease_mode or adapter.lease_mode
        streams = self.max_streams or (adapter.max_streams if mode is LeaseMode.MULTIPLEXED else 1)
        if mode is not LeaseMode.MULTIPLEXED:
            streams = 1
        need = self.concurrency * self.per_call
        max_size = self.max_size
        if max_size is None:
            max_size = max(1, math.ceil(need * (1 + self.headroom) / streams - 1e-9))
            if self.min_size is not None:
                max_size = max(max_size, self.min_size)
        min_size = self.min_size
        if min_size is None:
            if mode is LeaseMode.SINGLE_USE:
                min_size = min(max_size, max(1, math.ceil(need * self.headroom - 1e-9)))
            else:
                min_size = max_size
        if min_size > max_size:
            raise ValueError(f"min_size ({min_size}) must be <= max_size ({max_size})")
        return ResolvedSizing(mode, streams, min_size, max_size)


@dataclass(frozen=True, slots=True)
class ResolvedSizing:
    """The outcome of the sizing rule for one pool."""

    lease_mode: LeaseMode
    max_streams: int
    min_size: int
    max_size: int

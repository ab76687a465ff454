"""`PoolSettings`: the sizing, timeout and health knobs of one pool, and the sizing rule.

Sizing (DESIGN.md): ``max_size = ceil(concurrency * per_call * (1 + headroom) / max_streams)``
unless given; ``min_size`` defaults to ``max_size`` (a warm floor) for EXCLUSIVE and MULTIPLEXED,
and to a few spares, ``ceil(concurrency * per_call * headroom)``, for SINGLE_USE; with
``warm = "adaptive"`` it defaults to 1 (the policy keeps what the traffic needs above it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from voicepool._validation import format_errors
from voicepool.adapter import LeaseMode
from voicepool.errors import ConfigError

if TYPE_CHECKING:
    from voicepool.adapter import Adapter

__all__ = ["MAX_POOL_SIZE", "PoolSettings", "QuotaSettings", "ResolvedSizing"]

MAX_POOL_SIZE = 100_000
"""The most connections one pool may hold (given or from the sizing rule): far above what one
worker process can serve, low enough that a typo (``concurrency = 1e12``) is an error, not a
boot that tries to open a trillion sockets."""
MAX_SECONDS = 365 * 86400.0  # durations: finite and at most a year (inf/nan are refused too)


_QUOTA_SCHEMES = ("redis://", "rediss://", "unix://")


def _ordered(name: str, op: Literal["<=", ">="], other: str) -> Any:
    """A field validator for ``name``: ``name op other``, when both are set. ``other`` must be
    declared before ``name`` (pydantic validates in order); an invalid ``other`` is not compared:
    its own error is reported."""

    def check(cls: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
        bound = info.data.get(other)
        if value is None or bound is None:
            return value
        if value < bound if op == ">=" else value > bound:
            raise ValueError(f"{name} ({value}) must be {op} {other} ({bound})")
        return value

    return field_validator(name)(classmethod(check))


class QuotaSettings(BaseModel):
    """A fleet quota (``[pools.<name>.quota]``): pools of many workers naming one ``key`` share
    ``limit`` on Redis (voicepool.quota, extra ``voicepool[fleet]``; DESIGN.md, "Beyond one pool").

    ``unit``: what the provider counts. ``connection``: each open (or opening) connection holds
    one token. ``stream``: the same for EXCLUSIVE / SINGLE_USE pools (one stream a connection);
    a MULTIPLEXED connection holds ``max_streams`` tokens (it may carry that many streams).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    key: str = Field(
        min_length=1,
        max_length=200,
        pattern=r"^[A-Za-z0-9_.:/-]+$",
        description="The provider account these pools share (letters, digits, _.:/-).",
    )
    limit: int = Field(ge=1, le=MAX_POOL_SIZE, description="The account's concurrency limit.")
    unit: Literal["connection", "stream"] = Field(
        default="connection", description="What the provider counts: connections or streams."
    )
    backend: str = Field(
        default="redis://127.0.0.1:6379/0",
        min_length=1,
        description="Redis (6.2+) or Valkey URL: redis://, rediss:// or unix://.",
    )
    ttl: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="Tokens of a worker that stops refreshing expire after this (s).",
    )
    refresh: float = Field(
        default=1.0,
        gt=0,
        le=3600,
        description="Refresh period (s): TTL, demand signal, spares given to starved workers.",
    )
    poll: float = Field(
        default=0.1,
        gt=0,
        le=60,
        description="While callers wait for quota: how often to ask again (s).",
    )
    timeout: float = Field(
        default=0.5, gt=0, le=60, description="Longest Redis round trip before it counts as down."
    )

    @field_validator("backend")
    @classmethod
    def _backend_scheme(cls, value: str) -> str:
        if not value.startswith(_QUOTA_SCHEMES):
            # Only the scheme is echoed: the rest of the URL may carry a password.
            got = f"{value.split('://', 1)[0]}://..." if "://" in value else "no scheme"
            raise ValueError(f"must be a redis://, rediss:// or unix:// URL (got {got})")
        return value

    @field_validator("refresh")
    @classmethod
    def _refresh_under_ttl(cls, value: float, info: ValidationInfo) -> float:
        ttl = info.data.get("ttl")
        if ttl is not None and value * 2 > ttl:
            raise ValueError(
                f"refresh ({value:g}) must be at most half the ttl ({ttl:g}): one late refresh"
                " must not let a live worker's tokens expire"
            )
        return value

    _timeout_under_refresh = _ordered("timeout", "<=", "refresh")


class PoolSettings(BaseModel):
    """Settings of one pool. Every bad value is refused with an error naming the field.

    Durations are seconds, finite, at most a year. ``None`` on an optional duration turns that
    feature off. ``inf`` and ``nan`` are refused everywhere. Constructing one in code
    (``PoolSettings(per_call=...)``) raises :class:`~voicepool.ConfigError` listing every problem
    as ``field: reason``; ``PoolSettings.model_validate`` raises pydantic's ``ValidationError``.
    """

    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False
    )

    if not TYPE_CHECKING:  # type checkers keep the field-by-field signature of the model

        def __init__(self, **data: Any) -> None:
            try:
                super().__init__(**data)
            except ValidationError as exc:
                message = format_errors(
                    exc, None, echo=frozenset(type(self).model_fields), head="invalid PoolSettings"
                )
                raise ConfigError(message) from None

        # Only a wrapper of BaseModel.__init__ (as pydantic's RootModel marks its own): validation
        # (model_validate, nested models) keeps building instances without it, raising
        # ValidationError with full paths for the settings layer.
        __init__.__pydantic_base_init__ = True

    concurrency: int = Field(
        default=10, ge=1, le=MAX_POOL_SIZE, description="Concurrent calls this worker serves."
    )
    per_call: float = Field(
        default=1.0, gt=0, le=1000, description="Leases one call holds at once on this pool."
    )
    headroom: float = Field(
        default=0.25, ge=0, le=4, description="Spare capacity above the need (0.25=25%)."
    )
    min_size: int | None = Field(
        default=None,
        ge=0,
        le=MAX_POOL_SIZE,
        description="Warm floor; default from the sizing rule.",
    )
    max_size: int | None = Field(
        default=None,
        ge=1,
        le=MAX_POOL_SIZE,
        description="Hard bound; default from the sizing rule.",
    )
    lease_mode: LeaseMode | None = Field(
        default=None, description="Override the adapter's lease mode."
    )
    max_streams: int | None = Field(
        default=None,
        ge=1,
        le=2**31 - 1,
        description="Override the adapter's streams per connection (MULTIPLEXED).",
    )
    acquire_timeout: float = Field(
        default=3.0, gt=0, le=MAX_SECONDS, description="Longest wait for a lease."
    )
    connect_timeout: float = Field(
        default=10.0, gt=0, le=MAX_SECONDS, description="Longest connect + handshakes."
    )
    connect_concurrency: int = Field(
        default=16, ge=1, le=MAX_POOL_SIZE, description="Connects in flight at once."
    )
    ping_interval: float = Field(
        default=30.0, gt=0, le=MAX_SECONDS, description="Health ping period of idle connections."
    )
    ping_timeout: float = Field(
        default=5.0, gt=0, le=MAX_SECONDS, description="A ping slower than this fails."
    )
    max_lifetime: float | None = Field(
        default=1800.0,
        gt=0,
        le=MAX_SECONDS,
        description="Retire connections older than this (jittered 10% down).",
    )
    idle_timeout: float | None = Field(
        default=600.0,
        gt=0,
        le=MAX_SECONDS,
        description="Close connections above min_size idle this long.",
    )
    failure_threshold: int = Field(
        default=5,
        ge=1,
        le=1_000_000,
        description="Consecutive connect failures that open the circuit.",
    )
    min_healthy: float = Field(
        default=2.0,
        ge=0,
        le=MAX_SECONDS,
        description=(
            "A connection lost this soon after opening, before a clean lease end or a routine"
            " ping proved it, is a failed connect."
        ),
    )
    backoff_initial: float = Field(
        default=1.0, gt=0, le=MAX_SECONDS, description="First retry delay cap after a failure."
    )
    backoff_multiplier: float = Field(
        default=1.6, ge=1, le=100, description="Growth of the retry delay cap."
    )
    backoff_max: float = Field(
        default=30.0, gt=0, le=MAX_SECONDS, description="Largest retry delay."
    )
    drain_timeout: float = Field(
        default=10.0, ge=0, le=MAX_SECONDS, description="aclose() waits this long for leases."
    )
    leak_threshold: float | None = Field(
        default=None,
        gt=0,
        le=MAX_SECONDS,
        description="Warn once when a lease is held longer than this.",
    )
    alarm_wait_p95_ms: float = Field(
        default=5.0, gt=0, le=MAX_SECONDS * 1000, description="Acquire-wait p95 alarm threshold."
    )
    alarm_window: float = Field(
        default=60.0, gt=0, le=MAX_SECONDS, description="Rolling window of the p95 alarm."
    )
    trace_acquire: bool = Field(
        default=False, description="A span per acquire (debugging; costly)."
    )
    warm: Literal["fixed", "adaptive"] = Field(
        default="fixed",
        description="Warm floor: `fixed` keeps min_size; `adaptive` sizes it from the traffic"
        " (in use plus the warm_target Poisson quantile of arrivals within a connect time):"
        " far fewer idle sockets, more handshakes, needs traffic to learn from (see Lease modes).",
    )
    warm_target: float = Field(
        default=0.999,
        gt=0,
        lt=1,
        description="Adaptive: probability that arrivals within a connect time find a warm one.",
    )
    warm_window: float = Field(
        default=300.0,
        ge=10,
        le=MAX_SECONDS,
        description="Adaptive: estimation horizon (s); spares fall by one per window at most.",
    )

    quota: QuotaSettings | None = Field(
        default=None,
        description="Fleet quota shared with other workers through Redis (docs/fleet.md).",
    )

    _max_not_below_min = _ordered("max_size", ">=", "min_size")
    _backoff_order = _ordered("backoff_max", ">=", "backoff_initial")
    _ping_timeout_fits = _ordered("ping_timeout", "<=", "ping_interval")

    def resolve(self, adapter: Adapter[Any]) -> ResolvedSizing:
        """Apply the sizing rule for ``adapter``. Raises ConfigError (a ValueError) when
        min_size > max_size or the rule gives more than :data:`MAX_POOL_SIZE` connections."""
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
            if self.warm == "adaptive":
                min_size = 1  # one warm connection whatever the traffic; the policy adds the rest
            elif mode is LeaseMode.SINGLE_USE:
                min_size = min(max_size, max(1, math.ceil(need * self.headroom - 1e-9)))
            else:
                min_size = max_size
        if min_size > max_size:
            raise ConfigError(f"min_size ({min_size}) must be <= max_size ({max_size})")
        if max_size > MAX_POOL_SIZE:
            raise ConfigError(
                f"max_size from the sizing rule would be {max_size} (concurrency"
                f" {self.concurrency} x per_call {self.per_call:g} x (1 + headroom"
                f" {self.headroom:g}) / {streams} streams); at most {MAX_POOL_SIZE} a pool"
            )
        return ResolvedSizing(mode, streams, min_size, max_size)


@dataclass(frozen=True, slots=True)
class ResolvedSizing:
    """The outcome of the sizing rule for one pool."""

    lease_mode: LeaseMode
    max_streams: int
    min_size: int
    max_size: int

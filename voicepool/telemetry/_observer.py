"""The OpenTelemetry pool observer: span events, background spans, histograms.

The engine calls these hooks synchronously, on slow paths only, in the task that did the work:
an acquire that queued or failed (the caller's task, so events land on the caller's current span),
a connect or ping (pool tasks), the health task's once-a-second flush. Every hook is guarded: a bug
here is logged once and never breaks an acquire.
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
import weakref
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.util.types import AttributeValue

from voicepool._engine.observer import PoolObserver
from voicepool._redact import get_logger, record_exception
from voicepool.errors import PoolUnavailable
from voicepool.telemetry import names as n
from voicepool.telemetry._instruments import Instruments, PoolRegistry, records, safe_stats

if TYPE_CHECKING:
    from voicepool.lease import Lease
    from voicepool.pool import Pool, PoolState

log = get_logger("voicepool.telemetry")

P = ParamSpec("P")
R = TypeVar("R")
_Attrs = dict[str, AttributeValue]

_rng = random.Random()  # our own stream: sampling must not perturb the application's seeding
_ROOT = Context()  # an empty context: start_span(context=_ROOT) starts a new trace
_STALE = 0.1  # seconds; a pending exhaustion older than its acquire's wait is a leftover
_failed_hooks: set[str] = set()


def _guard(
    fn: Callable[Concatenate[OtelObserver, P], R],
) -> Callable[Concatenate[OtelObserver, P], R | None]:
    """Run a hook; log its first failure (with traceback) and swallow it: telemetry never raises."""

    @functools.wraps(fn)
    def hook(self: OtelObserver, /, *args: P.args, **kwargs: P.kwargs) -> R | None:
        if not self.registry.active:
            return None
        try:
            return fn(self, *args, **kwargs)
        except Exception:
            if fn.__name__ not in _failed_hooks:
                _failed_hooks.add(fn.__name__)
                log.exception(
                    "pool %s: telemetry hook %s failed (reported once)",
                    self._name,
                    fn.__name__,
                    extra={"voicepool.pool.name": self._name},
                )
            return None

    return hook


def _parent() -> Context | None:
    """Context for a background span: the current one, unless it holds an ended span.

    Pool tasks inherit the context of whoever spawned them; the health task's is the one current at
    ``pool.start()``, whose span ended long ago. A span that is not recording but was sampled has
    ended (or is remote): start a new trace rather than hang refills and pings off a finished boot
    span. An unsampled parent is kept, so a ParentBased sampler still drops its children.
    """
    span = trace.get_current_span()
    if span.is_recording():
        return None
    ctx = span.get_span_context()
    if ctx.is_valid and ctx.trace_flags.sampled:
        return _ROOT
    return None


def _ns_ago(seconds: float) -> int:
    return time.time_ns() - max(0, int(seconds * 1e9))


def _error_type(err: BaseException) -> str:
    return type(err).__qualname__


class _Reservoir:
    """A uniform sample of at most ``cap`` values and how many were offered (Algorithm R)."""

    __slots__ = ("cap", "seen", "values")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.values: list[float] = []
        self.seen = 0

    def add(self, value: float) -> None:
        self.seen += 1
        if len(self.values) < self.cap:
            self.values.append(value)
        else:
            slot = _rng.randrange(self.seen)
            if slot < self.cap:
                self.values[slot] = value

    def drain(self) -> tuple[list[float], int]:
        values, seen = self.values, self.seen
        self.values, self.seen = [], 0
        return values, seen


def _round_random(x: float) -> int:
    """Round up with probability frac(x): unbiased in expectation."""
    whole = int(x)
    return whole + (1 if _rng.random() < x - whole else 0)


@dataclass(slots=True, frozen=True)
class _Pending:
    """An exhaustion seen at queue time, waiting for its wait time (on_waited / on_timeout)."""

    owner: OtelObserver
    span: Span
    attrs: _Attrs
    at_ns: int
    at_mono: float


_pending: ContextVar[tuple[_Pending, ...]] = ContextVar("voicepool_telemetry_pending", default=())

# Span events go to the caller's span whatever the observer's tracer provider, so with two
# instrumentations on one pool (the default one and an explicit one) only one may add them.
_event_owner: weakref.WeakKeyDictionary[Pool[Any], OtelObserver] = weakref.WeakKeyDictionary()


def pool_attrs(pool: Pool[Any]) -> _Attrs:
    """Pool name and occupancy for a span event. Secret-free: numbers and the pool's name."""
    s = safe_stats(pool)
    if s is None:
        return {n.ATTR_POOL_NAME: pool.name}
    attrs: _Attrs = {
        n.ATTR_POOL_NAME: s.name,
        n.ATTR_SIZE: s.size,
        n.ATTR_MAX_SIZE: s.max_size,
        n.ATTR_IN_USE: s.in_use,
        n.ATTR_IDLE: s.idle,
        n.ATTR_OPENING: s.opening,
        n.ATTR_WAITERS: s.waiters,
    }
    if s.quota_blocked and s.quota_key is not None:
        # The fleet quota, not this pool's max_size, is what the caller waits for.
        attrs[n.ATTR_EXHAUSTED_BY] = "fleet_quota"
        attrs[n.ATTR_QUOTA_KEY] = s.quota_key
        attrs[n.ATTR_QUOTA_LIMIT] = s.quota_limit
    return attrs


class OtelObserver(PoolObserver):
    """One pool's OpenTelemetry observer (made by :meth:`Instrumentation._factory`)."""

    def __init__(
        self,
        pool: Pool[Any],
        instruments: Instruments,
        tracer: Tracer,
        registry: PoolRegistry,
        budget: int,
    ) -> None:
        self.registry = registry
        self._m = instruments
        self._tracer = tracer
        self._name = pool.name
        self._attrs: _Attrs = {n.ATTR_POOL_NAME: pool.name}
        self._adapter = type(pool.adapter).__name__
        self._budget = budget
        self._waits = _Reservoir(budget)
        _event_owner.setdefault(pool, self)

    def _owns_events(self, pool: Pool[Any]) -> bool:
        owner = _event_owner.get(pool)
        if owner is self:
            return True
        if owner is None or not owner.registry.active:  # the owner was removed: take over
            _event_owner[pool] = self
            return True
        return False

    # -- the caller's acquire ---------------------------------------------------------------------

    @_guard
    def on_exhausted(self, pool: Pool[Any]) -> None:
        span = trace.get_current_span()
        if not span.is_recording() or not self._owns_events(pool):
            return
        # The event is added when the wait ends, so it can carry the wait time; its timestamp is
        # now, when the acquire queued.
        entry = _Pending(self, span, pool_attrs(pool), time.time_ns(), time.monotonic())
        _pending.set((*(p for p in _pending.get() if p.owner is not self), entry))

    def _take_pending(self, waited: float) -> _Pending | None:
        entries = _pending.get()
        if not entries:
            return None
        mine = next((p for p in entries if p.owner is self), None)
        if mine is None:
            return None
        _pending.set(tuple(p for p in entries if p is not mine))
        if abs(time.monotonic() - waited - mine.at_mono) > _STALE:
            return None  # left by an earlier acquire in this task that was cancelled
        return mine

    def _emit_exhausted(self, waited: float) -> None:
        pending = self._take_pending(waited)
        if pending is not None and pending.span.is_recording():
            attrs = {**pending.attrs, n.ATTR_WAIT_TIME: waited}
            pending.span.add_event(n.EVENT_EXHAUSTED, attrs, timestamp=pending.at_ns)

    @_guard
    def on_waited(self, pool: Pool[Any], waited: float) -> None:
        self._waits.add(waited)
        self._emit_exhausted(waited)

    @_guard
    def on_timeout(self, pool: Pool[Any], waited: float, error: BaseException) -> None:
        self._waits.add(waited)
        self._emit_exhausted(waited)
        span = trace.get_current_span()
        if span.is_recording() and self._owns_events(pool):
            span.add_event(n.EVENT_TIMEOUT, {**pool_attrs(pool), n.ATTR_WAIT_TIME: waited})
            record_exception(span, error)

    @_guard
    def on_wait_failed(self, pool: Pool[Any], waited: float, error: BaseException) -> None:
        self._emit_exhausted(waited)
        if isinstance(error, PoolUnavailable):
            self._unavailable(pool, waited)

    @_guard
    def on_unavailable(self, pool: Pool[Any], error: BaseException) -> None:
        self._unavailable(pool, 0.0)

    def _unavailable(self, pool: Pool[Any], waited: float) -> None:
        span = trace.get_current_span()
        if not span.is_recording() or not self._owns_events(pool):
            return
        attrs = pool_attrs(pool)
        attrs[n.ATTR_POOL_STATE] = pool.state.value
        attrs[n.ATTR_WAIT_TIME] = waited
        last = pool.last_error
        if last is not None:
            attrs[n.ATTR_ERROR_TYPE] = _error_type(last.__cause__ or last)
        span.add_event(n.EVENT_UNAVAILABLE, attrs)

    @_guard
    def acquire_started(self, pool: Pool[Any]) -> object:
        return self._tracer.start_span(
            n.SPAN_ACQUIRE,
            attributes={**self._attrs, n.ATTR_LEASE_MODE: pool.lease_mode.value},
        )

    @_guard
    def on_acquire_end(
        self, pool: Pool[Any], token: object, lease: Lease[Any], error: BaseException | None
    ) -> None:
        if not isinstance(token, Span):
            return
        if error is not None:
            token.set_attribute(n.ATTR_ERROR_TYPE, _error_type(error))
            token.set_status(Status(StatusCode.ERROR, _error_type(error)))
        elif lease.stream_id is not None:
            token.set_attribute(n.ATTR_STREAM_ID, lease.stream_id)
        token.end()

    # -- background work --------------------------------------------------------------------------

    @_guard
    def connect_started(self, pool: Pool[Any]) -> object:
        return self._tracer.start_span(
            n.SPAN_CONNECT,
            context=_parent(),
            kind=SpanKind.CLIENT,
            attributes={**self._attrs, n.ATTR_ADAPTER: self._adapter},
        )

    @_guard
    def on_connected(
        self, pool: Pool[Any], token: object, duration: float, error: BaseException | None
    ) -> None:
        cancelled = isinstance(error, asyncio.CancelledError)
        if error is None:
            self._m.create_time.record(duration, self._attrs)
        elif not cancelled:
            attrs = {**self._attrs, n.ATTR_ERROR_TYPE: _error_type(error)}
            self._m.create_time.record(duration, attrs)
        if not isinstance(token, Span):
            return
        token.set_attribute(n.ATTR_CONNECT_DURATION, duration)
        if cancelled:
            token.set_attribute(n.ATTR_CONNECT_CANCELLED, True)
        elif error is not None:
            token.set_attribute(n.ATTR_ERROR_TYPE, _error_type(error))
            record_exception(token, error)
            token.set_status(Status(StatusCode.ERROR, _error_type(error)))
        token.end()

    @_guard
    def on_ping(self, pool: Pool[Any], duration: float, error: BaseException | None) -> None:
        if error is None:
            self._m.ping_duration.record(duration, self._attrs)
            return
        attrs = {**self._attrs, n.ATTR_ERROR_TYPE: _error_type(error)}
        self._m.ping_duration.record(duration, attrs)
        span = self._tracer.start_span(
            n.SPAN_PING,
            context=_parent(),
            kind=SpanKind.CLIENT,
            attributes={**attrs, n.ATTR_ADAPTER: self._adapter, n.ATTR_PING_DURATION: duration},
            start_time=_ns_ago(duration),
        )
        record_exception(span, error)
        span.set_status(Status(StatusCode.ERROR, _error_type(error)))
        span.end()

    @_guard
    def on_closed(self, pool: Pool[Any], reason: str) -> None:
        if reason == "used":
            return  # SINGLE_USE's normal end of life: one span per call would be noise and cost
        span = self._tracer.start_span(
            n.SPAN_RETIRE,
            context=_parent(),
            attributes={**self._attrs, n.ATTR_CLOSE_REASON: reason},
        )
        span.end()

    @_guard
    def on_state(self, pool: Pool[Any], old: PoolState, new: PoolState) -> None:
        """Nothing to do: ``voicepool.pool.state`` reads the state at collection time."""

    @_guard
    def on_alarm(self, pool: Pool[Any], p95: float, firing: bool) -> None:
        # The engine has already logged the warning (or the recovery); we add the counter and
        # a span carrying the event, once per alarm window.
        s = pool.settings
        attrs: _Attrs = {
            **self._attrs,
            n.ATTR_ALARM_P95: p95,
            n.ATTR_ALARM_THRESHOLD: s.alarm_wait_p95_ms / 1000.0,
            n.ATTR_ALARM_WINDOW: s.alarm_window,
            n.ATTR_ALARM_FIRING: firing,
        }
        if firing:
            self._m.alarm.add(1, self._attrs)
        span = self._tracer.start_span(n.SPAN_ALARM, context=_parent(), attributes=attrs)
        span.add_event(n.EVENT_ALARM if firing else n.EVENT_ALARM_CLEARED, attrs)
        span.end()

    @_guard
    def on_flush(self, pool: Pool[Any], use_times: list[float], zero_waits: int) -> None:
        self._flush(use_times, zero_waits)

    def wants_use_times(self, pool: Pool[Any]) -> bool:
        # Without an SDK (the API alone, as imported) the use_time histogram drops every value:
        # the pool then times no lease. Asked again each flush, so an SDK installed later counts.
        return self.registry.active and records(self._m.use_time)

    def _flush(self, use_times: list[float], zero_waits: int) -> None:
        """Record hold and wait times, sampled down to ``budget`` values per histogram.

        A histogram record costs ~6 us with the SDK: recording every acquire of a busy pool would
        cost more than the acquires. Above the budget the values recorded are a uniform sample, in
        which zero waits keep their share, so quantiles stay unbiased; ``_count`` then undercounts
        (``voicepool.connection.acquires`` is exact).
        """
        attrs = self._attrs
        budget = self._budget
        uses = use_times if len(use_times) <= budget else _rng.sample(use_times, budget)
        record = self._m.use_time.record
        for value in uses:
            record(value, attrs)
        waits, seen = self._waits.drain()
        total = zero_waits + seen
        if total > budget:
            zero_waits = _round_random(budget * zero_waits / total)
            waits = _rng.sample(waits, min(len(waits), budget - zero_waits))
        record = self._m.wait_time.record
        for _ in range(zero_waits):
            record(0.0, attrs)
        for value in waits:
            record(value, attrs)

    @_guard
    def on_pool_closed(self, pool: Pool[Any]) -> None:
        self._flush([], 0)
        self.registry.retire(pool)

    def __repr__(self) -> str:
        return f"<OtelObserver pool={self._name!r}>"

"""The instruments of one :class:`~voicepool.telemetry.Instrumentation`, and the pools they read.

Gauges and counters are *observable*: their callbacks read ``pool.stats()`` when a reader collects,
so the acquire fast path never calls an instrument. Collection may run on an exporter's thread
(PeriodicExportingMetricReader, the Prometheus HTTP server) while the event loop mutates the pool;
callbacks therefore copy the pool list under a lock, retry a snapshot that raced a mutation, and
never raise.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from opentelemetry.metrics import CallbackOptions, Histogram, Meter, NoOpHistogram, Observation

from voicepool._redact import get_logger
from voicepool.pool import PoolState, PoolStats
from voicepool.telemetry import names as n

if TYPE_CHECKING:
    from voicepool.pool import Pool

log = get_logger("voicepool.telemetry")

_MAX_RETIRED = 256  # closed pools whose final counters are still reported (bounded memory)

# Bucket boundaries in seconds (the SDK's default boundaries are meant for milliseconds).
WAIT_BUCKETS = (0.0, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                2.5, 5.0, 10.0)  # fmt: skip
CONNECT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
USE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)

_Attrs = tuple[tuple[str, str], ...]
_Callback = Callable[[CallbackOptions], Iterable[Observation]]


def records(histogram: Histogram) -> bool:
    """Whether a value recorded into ``histogram`` reaches an SDK (False for the API's no-op, and
    for its proxy while no MeterProvider is set: ``metrics.set_meter_provider`` later makes the
    same proxy live). The proxy's ``_real_instrument`` is private to opentelemetry-api: if it is
    ever missing, the answer is yes (recording then costs what it always did)."""
    if isinstance(histogram, NoOpHistogram):
        return False
    real = getattr(histogram, "_real_instrument", histogram)
    return real is not None and not isinstance(real, NoOpHistogram)


def safe_stats(pool: Pool[Any]) -> PoolStats | None:
    """``pool.stats()``, retried when another thread's read raced a mutation; None if it fails."""
    for _ in range(3):
        try:
            return pool.stats()
        except RuntimeError:
            # "dictionary changed size during iteration": the loop thread mutated the pool while
            # an exporter thread took the snapshot. The next try almost always succeeds.
            continue
        except Exception:
            log.debug("voicepool telemetry: stats() of pool %r failed", pool.name, exc_info=True)
            return None
    return None


class PoolRegistry:
    """Live pools (weakly held) plus the final snapshot of recently closed ones. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: weakref.WeakSet[Pool[Any]] = weakref.WeakSet()
        self._retired: dict[str, PoolStats] = {}
        self.active = True

    def add(self, pool: Pool[Any]) -> None:
        with self._lock:
            self._live.add(pool)
            # A new pool under an old name takes over its series (counters restart, as after a
            # process restart); reporting both would double count.
            self._retired.pop(pool.name, None)

    def retire(self, pool: Pool[Any]) -> None:
        """The pool closed: keep its final counters so the last collection still sees them."""
        final = safe_stats(pool)
        with self._lock:
            self._live.discard(pool)
            if final is None or any(p.name == pool.name for p in self._live):
                return
            self._retired.pop(final.name, None)
            self._retired[final.name] = final
            while len(self._retired) > _MAX_RETIRED:
                del self._retired[next(iter(self._retired))]

    def snapshots(self) -> list[PoolStats]:
        if not self.active:
            return []
        with self._lock:
            live = list(self._live)
            retired = list(self._retired.values())
        found = [s for s in map(safe_stats, live) if s is not None]
        return found + retired


def _observe(values: Iterable[tuple[float, _Attrs]]) -> Iterator[Observation]:
    """Sum values per attribute set: two live pools with one name report as one series."""
    summed: dict[_Attrs, float] = {}
    for value, attrs in values:
        summed[attrs] = summed.get(attrs, 0) + value
    for attrs, value in summed.items():
        yield Observation(value, dict(attrs))


def _name(s: PoolStats) -> _Attrs:
    return ((n.ATTR_POOL_NAME, s.name),)


class Instruments:
    """Creates every voicepool instrument on ``meter``; observable ones read ``registry``."""

    def __init__(self, meter: Meter, registry: PoolRegistry) -> None:
        self.registry = registry
        snap = registry.snapshots

        def gauge_cb(
            fn: Callable[[PoolStats], Iterable[tuple[float, _Attrs]]],
        ) -> list[_Callback]:
            def callback(_options: CallbackOptions) -> Iterable[Observation]:
                try:
                    pairs = [pair for s in snap() for pair in fn(s)]
                except Exception:  # a callback must never break the reader's collection
                    log.debug("voicepool telemetry: observable callback failed", exc_info=True)
                    return []
                return list(_observe(pairs))

            return [callback]

        def each(
            get: Callable[[PoolStats], float],
        ) -> list[_Callback]:
            return gauge_cb(lambda s: [(get(s), _name(s))])

        def counts(s: PoolStats) -> list[tuple[float, _Attrs]]:
            name = (n.ATTR_POOL_NAME, s.name)
            return [
                (s.idle, (name, (n.ATTR_STATE, "idle"))),
                (s.in_use, (name, (n.ATTR_STATE, "used"))),
                (s.opening, (name, (n.ATTR_STATE, "opening"))),
            ]

        def closed(s: PoolStats) -> list[tuple[float, _Attrs]]:
            name = (n.ATTR_POOL_NAME, s.name)
            return [(count, (name, (n.ATTR_REASON, why))) for why, count in s.closed.items()]

        def state(s: PoolStats) -> list[tuple[float, _Attrs]]:
            name = (n.ATTR_POOL_NAME, s.name)
            return [(int(st is s.state), (name, (n.ATTR_STATE, st.value))) for st in PoolState]

        up_down = meter.create_observable_up_down_counter
        counter = meter.create_observable_counter
        up_down(
            n.CONNECTION_COUNT,
            gauge_cb(counts),
            unit="{connection}",
            description="Open and opening connections, by state (idle, used, opening).",
        )
        up_down(
            n.CONNECTION_MAX,
            each(lambda s: s.max_size),
            unit="{connection}",
            description="The pool's max_size.",
        )
        up_down(
            n.CONNECTION_IDLE_MIN,
            each(lambda s: s.min_size),
            unit="{connection}",
            description="The pool's warm floor, min_size.",
        )
        up_down(
            n.PENDING_REQUESTS,
            each(lambda s: s.waiters),
            unit="{request}",
            description="Acquires waiting for a connection now.",
        )
        counter(
            n.TIMEOUTS,
            each(lambda s: s.timeouts),
            unit="{timeout}",
            description="Acquires that timed out (PoolExhausted).",
        )
        counter(
            n.EXHAUSTED,
            each(lambda s: s.exhausted),
            unit="{acquire}",
            description="Acquires that had to queue because the pool was at max_size.",
        )
        counter(
            n.UNAVAILABLE,
            each(lambda s: s.unavailable),
            unit="{acquire}",
            description="Acquires failed fast because the circuit was open (PoolUnavailable).",
        )
        counter(
            n.ACQUIRES,
            each(lambda s: s.acquired),
            unit="{acquire}",
            description="Leases handed out (exact; wait_time and use_time may be sampled).",
        )
        counter(
            n.CLOSED,
            gauge_cb(closed),
            unit="{connection}",
            description="Connections retired, by reason.",
        )
        meter.create_observable_gauge(
            n.WAIT_P95,
            each(lambda s: s.wait_p95_ms / 1000.0),
            unit="s",
            description="Acquire-wait p95 over the alarm's rolling window (what the alarm sees).",
        )
        counter(
            n.IDLE_TIME,
            each(lambda s: s.idle_time),
            unit="s",
            description="Socket-seconds open while idle (what a time-billed provider bills).",
        )
        up_down(
            n.WARM_TARGET,
            each(lambda s: s.warm_target),
            unit="{connection}",
            description="The warm floor last computed (adaptive: in use plus spares).",
        )
        counter(
            n.ACQUIRES_WAITED,
            each(lambda s: s.waited),
            unit="{acquire}",
            description="Acquires that queued; warm share = 1 - waited / acquires.",
        )

        def quota(get: Callable[[PoolStats], float]) -> list[_Callback]:
            return gauge_cb(
                lambda s: (
                    [(get(s), ((n.ATTR_POOL_NAME, s.name), (n.ATTR_QUOTA_KEY, s.quota_key)))]
                    if s.quota_key is not None
                    else []
                )
            )

        up_down(
            n.QUOTA_RESERVED,
            quota(lambda s: s.quota_reserved),
            unit="{token}",
            description="Fleet quota tokens this pool holds in the backend (its reservation).",
        )
        up_down(
            n.QUOTA_USED,
            quota(lambda s: s.quota_used),
            unit="{token}",
            description="Fleet quota tokens backing this pool's open and opening connections.",
        )
        up_down(
            n.QUOTA_LIMIT,
            quota(lambda s: s.quota_limit),
            unit="{token}",
            description="The fleet quota's limit (the provider account's concurrency).",
        )
        up_down(
            n.QUOTA_FLEET_USED,
            quota(lambda s: s.quota_fleet_used),
            unit="{token}",
            description="Fleet quota tokens held by every worker, as of this pool's last sync.",
        )
        counter(
            n.QUOTA_BACKEND_ERRORS,
            quota(lambda s: s.quota_backend_errors),
            unit="{error}",
            description="Fleet quota round trips that failed (backend down or slow).",
        )
        up_down(
            n.POOL_STATE,
            gauge_cb(state),
            unit="{state}",
            description="1 for the pool's current state (unavailable = circuit open), else 0.",
        )

        self.create_time = meter.create_histogram(
            n.CREATE_TIME,
            unit="s",
            description="Time to open a connection, handshakes included.",
            explicit_bucket_boundaries_advisory=CONNECT_BUCKETS,
        )
        self.wait_time = meter.create_histogram(
            n.WAIT_TIME,
            unit="s",
            description="Time an acquire waited for a connection (0 when served from idle).",
            explicit_bucket_boundaries_advisory=WAIT_BUCKETS,
        )
        self.use_time = meter.create_histogram(
            n.USE_TIME,
            unit="s",
            description="Time a lease was held.",
            explicit_bucket_boundaries_advisory=USE_BUCKETS,
        )
        self.ping_duration = meter.create_histogram(
            n.PING_DURATION,
            unit="s",
            description="Health ping round trip.",
            explicit_bucket_boundaries_advisory=CONNECT_BUCKETS,
        )
        self.alarm = meter.create_counter(
            n.ALARM,
            unit="{alarm}",
            description="Alarm windows whose acquire-wait p95 was above alarm_wait_p95_ms.",
        )
        self.group_failovers = meter.create_counter(
            n.GROUP_FAILOVERS,
            unit="{switch}",
            description="A group's serving member changed because it became unusable.",
        )
        self.group_failbacks = meter.create_counter(
            n.GROUP_FAILBACKS,
            unit="{switch}",
            description="A group went back to a recovered (or nearer) member after failback_after.",
        )
        self.group_wait_time = meter.create_histogram(
            n.GROUP_WAIT_TIME,
            unit="s",
            description="Wait of a group acquire that found nothing free at once, by member.",
            explicit_bucket_boundaries_advisory=WAIT_BUCKETS,
        )

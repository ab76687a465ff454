"""`AdaptiveWarm`: the warm floor of ``warm = "adaptive"``, sized from the traffic the pool sees.

A pure policy behind :class:`~voicepool._engine.core.SizingPolicy` (no clock, no I/O): the core
calls it with ``now`` and it answers from counters the core already keeps.

What it estimates, once per second (a bucket):

- the lease arrival rate: acquires per one-second bucket (``n_acquired + n_timeouts``: the
  driver's fast path counts them, so nothing is added to it), smoothed by an exponentially
  decayed mean with time constant ``warm_window``, plus its trend (Holt's linear smoothing), so
  a rising rate raises the floor before the level catches up;
- the connect time it observes (``connected``): a decayed mean and deviation; the horizon is
  ``mean + 2 deviations`` plus one bucket, because a spare taken on the fast path is replaced
  only at the next event or timer tick (at most a bucket later);
- bursts: the most arrivals seen within one connect time (the sum of the last buckets that
  span it: a burst straddles a bucket boundary), remembered for 24 windows (two hours at the
  default) and then let go of one connection per window (a dialer that fires ten calls at once
  will do it again).

The spare target is the larger of the ``warm_target`` Poisson quantile of arrivals within that
horizon (at the forecast rate) and the remembered burst. It rises at once and falls by one per
``warm_window`` at most, so in steady traffic it changes at most once a window. The floor is
what is in use plus that target (SINGLE_USE: the target itself, spares being what the core
counts there), clamped by the core to ``[min_size, max_size]``.

Shrinking (:meth:`surplus`) retires one idle connection at a time, the least recently used, and
only one that has been idle for a tenth of the window, and never below the floor: a connection
released a moment ago is the one the next call takes.

A group's standbys (``voicepool.group``, ``standby = "adaptive"``) reuse this estimator without a
core: the group feeds its own lease count to :meth:`AdaptiveWarm.observe` once a second and the
standby's connects to :meth:`AdaptiveWarm.connected`, with ``slack=0`` (a standby that takes over
grows at once, no tick to wait for) and ``bursts=False`` (the burst count is per whole bucket,
several times a standby's horizon), and keeps :attr:`AdaptiveWarm.spares` warm.

Default: ``warm = "fixed"``, decided from ``benchmarks/warm_floor.py``. On a simulated day (peak
50 calls, bursts of 10; measured on day two) adaptive keeps 66-72% fewer idle socket-seconds at
the same handshake-wait share as fixed sized for the peak (0-0.07%, every wait at ``max_size``),
and ``--real`` confirms the simulator over real sockets on the same calls (idle within 1.3%, waits
to the call). But it makes about four times the connects (a surplus retired after its linger is
reopened for the next rise), and a cold worker has learnt nothing: it starts from ``min_size`` 1
and meets its first bursts short (the simulated day's first hour: up to 10 of 64 acquires
waited, fixed none; a two-minute real day: 0.26% to 0.42%, fixed 0%).
So adaptive is the choice of a long-running worker on a time-billed provider, not the default.
"""

from __future__ import annotations

import math
from collections import deque
from typing import TYPE_CHECKING, Any

from voicepool._engine.core import SizingPolicy
from voicepool.pool_settings import PoolSettings

if TYPE_CHECKING:
    from voicepool._engine.core import PoolCore

__all__ = ["AdaptiveWarm", "poisson_quantile"]

_BUCKET = 1.0  # seconds per arrival-count bucket (and the policy's tick)
_PRIOR_CONNECT = 1.0  # assumed connect time (s) until one has been observed
_CONNECT_WEIGHT = 0.2
# A burst (a dialer's batch, a campaign) is kept in mind this many windows, then let go of one
# connection per window: bursts recur, and one met cold costs a handshake per call in it.
_BURST_MEMORY = 24  # EWMA weight of the latest observed connect time


def poisson_quantile(mean: float, p: float) -> int:
    """The smallest ``k`` with ``P(X <= k) >= p`` for ``X ~ Poisson(mean)``. O(k)."""
    if mean <= 0:
        return 0
    term = math.exp(-mean) if mean < 700 else 0.0
    if term == 0.0:  # too large for the direct sum: the normal approximation is exact enough
        z = math.sqrt(2) * _erfinv(2 * p - 1)
        return math.ceil(mean + z * math.sqrt(mean))
    k, cdf = 0, term
    while cdf < p:
        k += 1
        term *= mean / k
        cdf += term
        if term < 1e-300:
            break
    return k


def _erfinv(y: float) -> float:
    # Bisection on math.erf: called once per second at most, precision 1e-9 is plenty.
    lo, hi = -6.0, 6.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if math.erf(mid) < y:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


class AdaptiveWarm(SizingPolicy):
    """The adaptive warm floor. ``target``: the probability that arrivals within one connect
    time find a warm connection; ``window``: the estimation horizon (seconds).

    Read-only views for telemetry and tests: :attr:`rate` (arrivals/s, forecast),
    :attr:`connect_time` (the horizon used), :attr:`spares` (the current spare target),
    :attr:`changes` (times the spare target changed).
    """

    def __init__(
        self, target: float, window: float, *, slack: float = _BUCKET, bursts: bool = True
    ) -> None:
        self.target = target
        self.window = window
        # Added to the observed connect time to make the horizon. A pool's own floor: one
        # bucket (a spare taken on the fast path is replaced at the next tick). A group's
        # standby (voicepool.group) grows the moment it takes over: 0.
        self.slack = slack
        # Whether the burst memory is kept. Its count is per whole bucket: a group's standby,
        # whose horizon (a connect time, no slack) is well under a bucket, would overcount.
        self.bursts = bursts
        self.linger = window / 10  # a connection idle this long is a candidate to retire
        self._alpha = 1 - math.exp(-_BUCKET / window)  # per-bucket decay of level and trend
        self.level = 0.0  # arrivals per bucket, decayed mean
        self.trend = 0.0  # change of level per bucket, decayed
        self.rate = 0.0  # forecast arrivals per second
        self._count_at = 0  # arrival counter at the start of the current bucket
        self._bucket_end = -math.inf
        self._burst = 0  # the most arrivals within one connect time, remembered
        self._recent: deque[int] = deque()  # the last buckets' counts (one connect time's)
        self._burst_until = -math.inf
        self._connect_mean: float | None = None
        self._connect_dev = 0.0
        self.connect_time = _PRIOR_CONNECT + slack
        self.spares = 0
        self._lower_since = math.inf  # since when the computed target stayed below `spares`
        self.changes = 0
        self._retired_at = -math.inf

    # -- the seam -------------------------------------------------------------------------------

    def warm_floor(self, core: PoolCore[Any], now: float) -> int:
        if now >= self._bucket_end:
            self._roll(core, now)
        if core.single_use:
            floor = self.spares
        elif core.mux:
            streams = sum(r.streams for r in core.mux_conns)
            floor = -(-(streams + self.spares) // core.max_streams)
        else:
            # In use: open and not idle (one being pinged counts as in use: conservative).
            floor = len(core.conns) - len(core.idle) + self.spares
        return max(core.min_size, floor)

    def due(self, now: float) -> float:
        return self._bucket_end

    def connected(self, duration: float) -> None:
        mean = self._connect_mean
        if mean is None:
            self._connect_mean = duration
            self._connect_dev = duration / 2
        else:
            self._connect_mean = mean + _CONNECT_WEIGHT * (duration - mean)
            self._connect_dev += _CONNECT_WEIGHT * (abs(duration - mean) - self._connect_dev)
        assert self._connect_mean is not None
        self.connect_time = self._connect_mean + 2 * self._connect_dev + self.slack

    def surplus(self, core: PoolCore[Any], now: float) -> int:
        """Idle connections to retire now: 0 or 1 (the least recently used one)."""
        if now >= self._bucket_end:
            self._roll(core, now)  # every tick rolls (the floor is not asked at max_size)
        if core.mux or core.single_use or not core.idle or now - self._retired_at < _BUCKET:
            return 0
        floor = self.warm_floor(core, now)
        if len(core.conns) + core.opening - 1 < floor:
            return 0
        if now - core.idle[0].last_used < self.linger:
            return 0
        self._retired_at = now
        return 1

    # -- estimation ------------------------------------------------------------------------------

    def _roll(self, core: PoolCore[Any], now: float) -> None:
        self.observe(core.n_acquired + core.n_timeouts, now)

    def observe(self, count: int, now: float) -> int:
        """Feed the cumulative arrival count at ``now``; returns the spare target.

        Closes the bucket(s) up to ``now`` when one is due (else only returns the target): a
        driver without a core (a group sizing its standbys) calls this about once a bucket.
        """
        if now < self._bucket_end:
            return self.spares
        self._roll_count(count, now)
        return self.spares

    def _roll_count(self, count: int, now: float) -> None:
        """Close the bucket(s) up to ``now`` and recompute the spare target."""
        if self._bucket_end == -math.inf:  # first call: start counting
            self._count_at = count
            self._bucket_end = now + _BUCKET
            self._recompute(now)
            return
        arrived = count - self._count_at
        self._count_at = count
        # Buckets skipped with no call (no event and no tick) had nothing we counted: the
        # arrivals all go to the first, the rest decay as empty buckets.
        missed = max(1, int((now - self._bucket_end) / _BUCKET) + 1)
        a = self._alpha
        for i in range(min(missed, 4 * int(self.window) + 1)):
            x = arrived if i == 0 else 0
            level = self.level + a * (x - self.level)
            self.trend += a * ((level - self.level) - self.trend)
            self.level = level
        recent = self._recent
        recent.append(arrived)
        span = max(1, math.ceil(self.connect_time / _BUCKET))
        while len(recent) > span:
            recent.popleft()
        within = sum(recent) if self.bursts else 0
        if within >= self._burst or 2 * within > self._burst:
            # A burst as large, or a comparable one (more than half: how it fell across the
            # buckets varies), renews the memory.
            self._burst = max(self._burst, within)
            self._burst_until = now + _BURST_MEMORY * self.window
        elif now >= self._burst_until and self._burst > 0:
            self._burst -= 1  # let go of an old burst one connection per window
            self._burst_until = now + self.window
        self._bucket_end = now + _BUCKET - (now - self._bucket_end) % _BUCKET
        self._recompute(now)

    def _recompute(self, now: float) -> None:
        # Forecast one window ahead: the decayed mean lags a ramp by about one window.
        per_bucket = max(self.level, self.level + self.trend * self.window / _BUCKET)
        self.rate = per_bucket / _BUCKET
        want = max(poisson_quantile(self.rate * self.connect_time, self.target), self._burst)
        if want > self.spares:
            self.spares = want
            self.changes += 1
            self._lower_since = math.inf
        elif want < self.spares:
            if self._lower_since == math.inf:
                self._lower_since = now
            elif now - self._lower_since >= self.window:
                self.spares -= 1  # one connection at a time, at most once a window
                self.changes += 1
                self._lower_since = now if want < self.spares else math.inf
        else:
            self._lower_since = math.inf


def sizing_for(settings: PoolSettings) -> SizingPolicy | None:
    """The warm-floor policy ``settings.warm`` names: AdaptiveWarm, or None (the core's fixed
    floor). Drivers of a PoolCore (the Pool, the traffic simulator) call this."""
    if settings.warm == "adaptive":
        return AdaptiveWarm(settings.warm_target, settings.warm_window)
    return None

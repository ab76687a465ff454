"""Acquire-wait percentiles over tumbling windows, at the cost of a counter on the fast path.

An acquire served from idle does not wait; the pool only counts it (``acquired``). Acquires that
waited record their wait here. The p95 of a window is then computed from "N zeros plus these
samples" without ever storing the zeros.
"""

from __future__ import annotations

import math
import random

_MAX_SAMPLES = 10_000  # reservoir bound: memory stays flat under a storm of waits


class WaitWindow:
    """Tumbling windows of acquire waits. Not thread-safe; used on the event loop only."""

    __slots__ = (
        "_cache_key",
        "_cache_value",
        "_next",
        "_prev_samples",
        "_prev_total",
        "_rng",
        "_seen",
        "_w",
        "length",
        "samples",
        "start",
        "start_count",
    )

    def __init__(self, length: float, now: float, rng: random.Random | None = None) -> None:
        self.length = length
        self._rng = rng or random.Random()
        self.start = now
        self.start_count = 0  # pool's acquired counter at the window start
        self.samples: list[float] = []
        self._seen = 0
        self._w = 1.0  # Algorithm L's running weight, once the reservoir is full
        self._next = 0  # the index (in _seen) of the next wait that enters a full reservoir
        self._prev_samples: list[float] = []
        self._prev_total = 0
        self._cache_key: tuple[int, int, float, float] | None = None
        self._cache_value = 0.0

    def record(self, waited: float) -> None:
        """Record one acquire that waited ``waited`` seconds (slow path only).

        Past ``_MAX_SAMPLES`` waits in a window the samples are a uniform reservoir. Li's
        Algorithm L draws how many waits to skip before the next replacement, so a storm of
        waits (every hand-off of a contended pool is one) costs a counter and a comparison per
        wait, not a random draw: about k * ln(n / k) draws for n waits.
        """
        seen = self._seen
        self._seen = seen + 1
        if seen < _MAX_SAMPLES:
            self.samples.append(waited)
            if seen == _MAX_SAMPLES - 1:
                self._w = 1.0
                self._skip(seen)
        elif seen == self._next:
            self.samples[self._rng.randrange(_MAX_SAMPLES)] = waited
            self._skip(seen)

    def _skip(self, seen: int) -> None:
        """Draw the index of the next wait to enter the full reservoir (Algorithm L)."""
        rng = self._rng
        # 1 - random() is in (0, 1]: log() never sees 0. The weight shrinks by about 1/k per
        # replacement; the gap is capped so it stays an int however small the weight gets.
        self._w *= math.exp(math.log(1.0 - rng.random()) / _MAX_SAMPLES)
        w = self._w
        gap = math.log(1.0 - rng.random()) / math.log1p(-w) if 0.0 < w < 1.0 else 0.0
        self._next = seen + 1 + int(min(gap, 1e18))

    @property
    def end(self) -> float:
        return self.start + self.length

    def rotate(self, now: float, acquired: int) -> tuple[float, int]:
        """Close the current window; return its (p95 seconds, acquire count) and start a new one."""
        total = acquired - self.start_count
        p95 = percentile(self.samples, total, 0.95)
        self._prev_samples, self._prev_total = self.samples, total
        self.samples = []
        self._seen = 0
        self._next = 0
        self.start_count = acquired
        # Skip whole empty windows so a long quiet spell does not trigger many rotations.
        elapsed = now - self.start
        self.start += self.length * max(1, math.floor(elapsed / self.length))
        return p95, total

    def current(self, acquired: int, q: float = 0.95) -> float:
        """Quantile of the wait over the previous and the current window (rolling view), seconds.

        Cached until a wait or an acquire changes it: stats() is called by metric collection
        and span events, and sorting thousands of samples each time would add up.
        """
        key = (acquired, self._seen, self.start, q)
        if key != self._cache_key:
            total = acquired - self.start_count + self._prev_total
            self._cache_value = percentile(self.samples + self._prev_samples, total, q)
            self._cache_key = key
        return self._cache_value


def percentile(waited: list[float], total: int, q: float) -> float:
    """The q-quantile of ``total`` waits of which all but ``waited`` were zero (nearest rank)."""
    if total <= 0:
        return 0.0
    rank = max(1, math.ceil(q * total))
    zeros = total - len(waited)
    if rank <= zeros:
        return 0.0
    ordered = sorted(waited)
    return ordered[min(len(ordered) - 1, rank - zeros - 1)]

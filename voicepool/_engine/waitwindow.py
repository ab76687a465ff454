"""Acquire-wait percentiles over tumbling windows, at the cost of a counter on the fast path.

An acquire served from idle does not wait; the pool only counts it (``acquired``). Acquires that
waited record their wait here. The p95 of a window is then computed from "N zeros plus these
samples" without ever storing the zeros.

Memory stays bounded under a storm of waits (every hand-off of a contended pool is one): past
``_MAX_SAMPLES`` waits in a window the samples are a *stratified* sample. The waits are cut into
blocks of ``stride`` and one wait at a random place in each block is kept; when the samples fill
up, neighbouring blocks merge (one of their two samples kept at random) and the stride doubles.
Every wait is then kept with the same probability, 1 / stride, so each sample stands for
``seen / len(samples)`` waits, which the percentile weighs. A wait that is not kept costs a
decrement and a comparison; no random number is drawn until the first merge.
"""

from __future__ import annotations

import math
import random

_MAX_SAMPLES = 10_000  # samples kept per window at most (a halving leaves half of them)


class WaitWindow:
    """Tumbling windows of acquire waits. Not thread-safe; used on the event loop only."""

    __slots__ = (
        "_cache_key",
        "_cache_value",
        "_left",
        "_prev_samples",
        "_prev_seen",
        "_prev_total",
        "_rest",
        "_rng",
        "_seen",
        "_stride",
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
        self._seen = 0  # waits recorded in this window (kept or not)
        self._stride = 1  # one wait kept per block of this many
        self._left = 1  # waits until the next one kept (that one included)
        self._rest = 0  # waits of the current block after the kept one
        self._prev_samples: list[float] = []
        self._prev_seen = 0
        self._prev_total = 0
        self._cache_key: tuple[int, int, float, float] | None = None
        self._cache_value = 0.0

    def record(self, waited: float) -> None:
        """Record one acquire that waited ``waited`` seconds (slow path only)."""
        self._seen += 1
        left = self._left - 1
        if left:
            self._left = left
            return
        samples = self.samples
        samples.append(waited)
        stride = self._stride
        if len(samples) >= _MAX_SAMPLES:
            # Merge neighbouring blocks: of each pair of samples (in arrival order) keep one at
            # random, so each new block of 2 * stride waits keeps one wait at a random place. The
            # current block's other waits (``_rest``) belong to the last merged block.
            # (A few hundred microseconds, log2(waits / _MAX_SAMPLES) times a window.)
            draw = self._rng.random
            samples[:] = [
                samples[i] if draw() < 0.5 else samples[i + 1]
                for i in range(0, len(samples) - 1, 2)
            ]
            stride *= 2
            self._stride = stride
        if stride == 1:
            self._left = 1
            return
        # The next kept wait: the rest of this block, then a random place in the next one.
        rest = self._rest
        offset = int(self._rng.random() * stride)
        self._left = rest + offset + 1
        self._rest = stride - offset - 1

    @property
    def end(self) -> float:
        return self.start + self.length

    def rotate(self, now: float, acquired: int) -> tuple[float, int]:
        """Close the current window; return its (p95 seconds, acquire count) and start a new one."""
        total = acquired - self.start_count
        p95 = percentile([(self.samples, self._seen)], total, 0.95)
        self._prev_samples, self._prev_seen, self._prev_total = self.samples, self._seen, total
        self.samples = []
        self._seen = 0
        self._stride, self._left, self._rest = 1, 1, 0
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
            groups = [(self.samples, self._seen), (self._prev_samples, self._prev_seen)]
            self._cache_value = percentile(groups, total, q)
            self._cache_key = key
        return self._cache_value


def percentile(groups: list[tuple[list[float], int]], total: int, q: float) -> float:
    """The q-quantile (nearest rank) of ``total`` acquire waits, all zero but those sampled.

    ``groups``: (samples, waits they stand for): each sample of a group weighs
    ``waits / len(samples)`` (1 while nothing was dropped: then this is the exact nearest rank).
    """
    if total <= 0:
        return 0.0
    groups = [(s, n) for s, n in groups if s]
    seen = sum(n for _, n in groups)
    rank = max(1, math.ceil(q * total))
    zeros = total - seen  # (negative if timed-out waits, not acquires, were recorded)
    if rank <= zeros:
        return 0.0
    need = rank - max(0, zeros)  # the rank among the waits that were recorded
    if all(len(s) == n for s, n in groups):
        ordered = sorted(v for s, _ in groups for v in s)
        return ordered[min(len(ordered) - 1, need - 1)]
    weighted = sorted((v, n / len(s)) for s, n in groups for v in s)
    reached = 0.0
    for value, weight in weighted:
        reached += weight
        if reached >= need - 1e-9:
            return value
    return weighted[-1][0]

"""The acquire-wait window: exact below its sample bound, unbiased and cheap above it."""

from __future__ import annotations

import random

import pytest

from voicepool._engine import waitwindow
from voicepool._engine.waitwindow import WaitWindow, percentile

K = waitwindow._MAX_SAMPLES


class CountingRandom(random.Random):
    """Counts the draws the window makes."""

    draws = 0

    def random(self) -> float:
        self.draws += 1
        return super().random()


@pytest.mark.parametrize("n", [K - 1, K, 3 * K + 17, 40 * K])
def test_the_p95_of_a_storm_of_waits_is_the_p95_of_all_of_them(n: int) -> None:
    """Waits uniform in [0, 1), every acquire waited: the p95 is 0.95 however many there are.

    (Past the bound the old reservoir counted the waits it had not kept as zero waits: it
    reported 0.50 here for 100,000 waits, so the alarm missed the storms it exists for.)
    """
    rng = CountingRandom(7)
    window = WaitWindow(60.0, 0.0, rng)
    values = random.Random(3)
    for _ in range(n):
        window.record(values.random())
    assert len(window.samples) <= K
    assert window.current(n) == pytest.approx(0.95, abs=0.01)
    p95, count = window.rotate(60.0, n)
    assert count == n
    assert p95 == pytest.approx(0.95, abs=0.01)
    # Cheap: no draw at all below the bound, then one per kept wait and one per merged pair,
    # about 3 * K per doubling: far fewer than one per wait.
    assert rng.draws <= max(0, 3 * K * (n // K).bit_length())


def test_the_waits_are_a_uniform_sample_of_the_stream() -> None:
    n = 37 * K + 5
    window = WaitWindow(60.0, 0.0, random.Random(11))
    for i in range(n):
        window.record(float(i))  # the wait is its arrival index: uniformity shows as even tenths
    tenths = [0] * 10
    for v in window.samples:
        tenths[int(v * 10 // n)] += 1
    share = len(window.samples) / 10
    assert all(abs(t - share) < 0.05 * share for t in tenths), tenths


def test_zero_waits_are_counted_not_stored() -> None:
    window = WaitWindow(60.0, 0.0, random.Random(1))
    for _ in range(3 * K):
        window.record(2.0)
    # 3K waits of 2 s among 100K acquires: 97% waited nothing, so the p95 is 0 and the p99 2 s.
    assert window.current(100 * K) == 0.0
    assert window.current(100 * K, 0.99) == 2.0


def test_exact_nearest_rank_below_the_bound() -> None:
    assert percentile([([0.3, 0.1, 0.2], 3)], 3, 0.5) == 0.2
    assert percentile([([0.3, 0.1, 0.2], 3)], 10, 0.95) == 0.3  # 7 zeros, then 0.1, 0.2, 0.3
    assert percentile([([0.3, 0.1, 0.2], 3)], 10, 0.5) == 0.0
    assert percentile([], 0, 0.95) == 0.0


def test_the_rolling_view_weighs_each_window_by_what_its_samples_stand_for() -> None:
    window = WaitWindow(1.0, 0.0, random.Random(5))
    for _ in range(8 * K):  # a storm of 1 s waits, sampled 1 in 8...
        window.record(1.0)
    window.rotate(1.0, 8 * K)
    for _ in range(K // 10):  # ...then a quiet window of short waits, all kept
        window.record(0.001)
    # Of 8.1K waits, 8K were 1 s: the p95 is 1 s, although most samples held are 1 ms.
    assert window.current(8 * K + K // 10) == 1.0


def test_a_new_window_keeps_every_wait_again() -> None:
    window = WaitWindow(1.0, 0.0, random.Random(1))
    for _ in range(3 * K):
        window.record(0.5)
    window.rotate(1.0, 3 * K)
    for _ in range(10):
        window.record(0.25)
    assert window.samples == [0.25] * 10

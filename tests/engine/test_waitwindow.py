"""The acquire-wait window's reservoir: bounded, uniform, and cheap under a storm of waits."""

from __future__ import annotations

import math
import random
import statistics

from voicepool._engine import waitwindow
from voicepool._engine.waitwindow import WaitWindow


class CountingRandom(random.Random):
    """Counts the draws the window makes (the cost Algorithm L saves)."""

    draws = 0

    def random(self) -> float:
        self.draws += 1
        return super().random()

    def randrange(self, *args: int) -> int:  # type: ignore[override]
        self.draws += 1
        return super().randrange(*args)


def test_a_storm_of_waits_keeps_a_bounded_uniform_sample_with_few_draws() -> None:
    k = waitwindow._MAX_SAMPLES
    n = 100 * k
    rng = CountingRandom(7)
    window = WaitWindow(60.0, 0.0, rng)
    for i in range(n):
        window.record(float(i))  # the wait is its arrival index: uniformity shows in the mean
    assert len(window.samples) == k
    # A uniform sample of 0..n-1: mean n/2, and every tenth of the stream holds about k/10.
    assert abs(statistics.fmean(window.samples) / n - 0.5) < 0.01
    deciles = [0] * 10
    for v in window.samples:
        deciles[int(v * 10 // n)] += 1
    assert all(abs(d - k / 10) < 0.08 * k for d in deciles), deciles
    # About k * ln(n / k) replacements (46,000 for these 1,000,000 waits), 4 draws each (two
    # for the skip, and randrange calls random() in a subclass that overrides it): ~185,000.
    # One draw per wait past k, as before, was 990,000.
    assert rng.draws < 4 * k * math.log(n / k) * 1.1


def test_a_new_window_fills_again_before_sampling() -> None:
    k = waitwindow._MAX_SAMPLES
    window = WaitWindow(1.0, 0.0, random.Random(1))
    for _ in range(k + 5):
        window.record(0.5)
    window.rotate(1.0, k + 5)
    for _ in range(10):
        window.record(0.25)
    assert window.samples == [0.25] * 10

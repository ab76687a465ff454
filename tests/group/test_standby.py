"""Adaptive standby floors (``standby = "adaptive"``): the sizing in virtual time, then a group on
fake adapters with a scripted clock (the group's own 1 s timer only repeats the scripted step)."""

from __future__ import annotations

import asyncio
import itertools
import random
from typing import Any

import pytest

from voicepool import ConfigError, Pool, PoolGroup, PoolSettings
from voicepool._engine.observer import PoolObserver
from voicepool._engine.warm import AdaptiveWarm, poisson_quantile
from voicepool.group import _STANDBY_WINDOW
from voicepool.testing.fake import FakeNoResetAdapter

CONNECT = 0.12  # seconds: a standby's handshake


def estimator(connect: float = CONNECT) -> AdaptiveWarm:
    """The group's estimator for one standby (group.py builds it the same way)."""
    warm = AdaptiveWarm(0.999, _STANDBY_WINDOW, slack=0.0, bursts=False)
    for _ in range(10):
        warm.connected(connect)
    return warm


def run(
    warm: AdaptiveWarm, rate: float, seconds: int, t0: float, count: int, rng: random.Random
) -> tuple[float, int, list[int]]:
    """Poisson arrivals at ``rate``, the estimator observed once a second (as the group's
    timer does); returns the clock, the arrival count and the spare target each second."""
    spares = []
    for s in range(seconds):
        t = t0 + s
        n, at = 0, rng.expovariate(rate) if rate else 2.0
        while at < 1.0:
            n, at = n + 1, at + rng.expovariate(rate)
        count += n
        spares.append(warm.observe(count, t + 1.0))
    return t0 + seconds, count, spares


def test_rate_up_grows_the_standby_within_seconds() -> None:
    rng = random.Random(4)
    warm = estimator()
    t, count, _ = run(warm, 0.0, 5, 0.0, 0, rng)
    assert warm.spares == 0  # no traffic: the floor is standby_min
    t, count, spares = run(warm, 25.0, 20, t, count, rng)
    # The horizon is the connect time alone (no slack): a standby grows the moment it serves.
    assert CONNECT < warm.connect_time < CONNECT * 1.2  # mean + 2 deviations, no bucket
    full = poisson_quantile(25.0 * CONNECT, 0.999)  # 10
    assert spares[4] >= full // 2  # the trend carries the forecast ahead of the level
    assert spares[-1] >= full - 1, spares
    assert max(spares) <= poisson_quantile(40.0 * CONNECT, 0.999)  # not the 1 s bucket's count


def test_idle_shrinks_to_zero_slowly_one_per_window() -> None:
    rng = random.Random(5)
    warm = estimator()
    t, count, _ = run(warm, 25.0, 60, 0.0, 0, rng)
    peak = warm.spares
    assert peak >= 8
    t, count, spares = run(warm, 0.0, int(_STANDBY_WINDOW * (peak + 3)), t, count, rng)
    assert spares[-1] == 0  # idle: the group keeps standby_min only
    drops = [i for i in range(1, len(spares)) if spares[i] < spares[i - 1]]
    assert all(spares[i - 1] - spares[i] == 1 for i in drops)  # one connection at a time
    assert all(b - a >= _STANDBY_WINDOW for a, b in itertools.pairwise(drops))
    assert len([d for d in drops if d < _STANDBY_WINDOW]) <= 1  # slowly from the start


def test_steady_traffic_does_not_flap() -> None:
    """Ten minutes at a steady 25 calls/s after a minute of learning: the target holds (it rises
    at once to the noise's upper envelope and falls one per window at most)."""
    rng = random.Random(6)
    warm = estimator()
    t, count, _ = run(warm, 25.0, 60, 0.0, 0, rng)
    before = warm.changes
    t, count, spares = run(warm, 25.0, 600, t, count, rng)
    # Measured over seeds 0-7: 10-16 changes, all within 10..12 connections.
    assert warm.changes - before <= 600 / _STANDBY_WINDOW * 2 / 3, warm.changes - before
    assert max(spares) - min(spares) <= 2, (min(spares), max(spares))


def test_pool_policy_keeps_its_slack_and_bursts() -> None:
    """The pool's own adaptive floor is unchanged: one bucket of slack, burst memory on."""
    warm = AdaptiveWarm(0.999, 300.0)
    warm.connected(CONNECT)
    assert warm.connect_time == pytest.approx(CONNECT * 2 + 1.0)
    assert warm.bursts


def test_standby_setting_is_validated_naming_the_field() -> None:
    pools = [Pool(FakeNoResetAdapter(), PoolSettings(), name=n) for n in ("eu", "us")]
    with pytest.raises(ConfigError, match=r"groups\.tts\.standby: 'sometimes'"):
        PoolGroup(pools, name="tts", standby="sometimes")


class Connects(PoolObserver):
    """Lets the test await a pool's background connects (no sleeps)."""

    def __init__(self) -> None:
        self.changed = asyncio.Event()

    def on_connected(
        self, pool: Pool[Any], token: object, duration: float, error: BaseException | None
    ) -> None:
        self.changed.set()

    async def until(self, pool: Pool[Any], size: int, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while pool.stats().size < size:
                self.changed.clear()
                await self.changed.wait()


@pytest.mark.parametrize("mode", ["adaptive", "fixed"])
async def test_group_standby_follows_traffic_and_comes_back_to_standby_min(mode: str) -> None:
    now = [1000.0]
    primary, standby = FakeNoResetAdapter(), FakeNoResetAdapter(connect_delay=0.02)
    base = {"concurrency": 4, "headroom": 0.0, "acquire_timeout": 2.0}
    eu = Pool(primary, PoolSettings.model_validate(base), name="eu")
    us = Pool(standby, PoolSettings.model_validate({**base, "concurrency": 40}), name="us")
    connects = Connects()
    us.add_observer(connects)
    group = PoolGroup([eu, us], name="tts", standby=mode, clock=lambda: now[0])
    async with group:
        assert us.min_size == 1
        assert us.stats().size == 1
        warm = group._members[1].warm
        assert (warm is None) is (mode == "fixed")
        group._size_standbys()  # starts the estimators' first bucket
        for _ in range(8):  # 8 s of 300 calls a second, all served by the primary
            for _ in range(300):
                lease = await group.lease()
                assert lease.pool is eu
                await lease.release()
            now[0] += 1.0
            group._size_standbys()
        if mode == "fixed":
            assert us.min_size == 1
            assert us.stats().size == 1
            return
        assert warm is not None
        # Its connects (~20 ms here; more on a loaded machine) x 300/s: the 99.9% quantile
        # of the calls arriving within one (about 6-9 here), within its max_size.
        grown = us.min_size
        assert grown == min(warm.spares, us.max_size)
        assert warm.spares >= poisson_quantile(warm.rate * warm.connect_time, 0.999)
        assert grown >= 3
        await connects.until(us, grown)  # the standby opened them in the background
        # The connects just awaited reported their durations: slow ones (a loaded machine) raise
        # the floor once more at the next bucket. Let that settle, its connects opened, before
        # going idle (bounded).
        for _ in range(5):
            now[0] += 1.0
            group._size_standbys()
            if us.stats().size >= us.min_size:
                break
            await connects.until(us, us.min_size)
        # Idle: one connection let go per window, down to standby_min and no lower (bounded by
        # max_size: the floor may have risen above grown).
        sizes = []
        for _ in range(int(_STANDBY_WINDOW) * (us.max_size + 2)):
            now[0] += 1.0
            group._size_standbys()
            sizes.append(us.min_size)
        assert sizes[-1] == 1
        assert us.stats().size == 1
        drops = [i for i in range(1, len(sizes)) if sizes[i] < sizes[i - 1]]
        assert all(b - a >= _STANDBY_WINDOW for a, b in itertools.pairwise(drops))
        assert all(a - b in (0, 1) for a, b in itertools.pairwise(sizes))

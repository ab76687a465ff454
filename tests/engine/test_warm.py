"""The adaptive warm floor (issue 16) on the real core, in virtual time (voicepool.testing.traffic).

No event loop, no sleeps: hours of traffic in a second; reproducible from the seed.
"""

from __future__ import annotations

import math
from typing import Any, cast

import pydantic
import pytest

from voicepool import LeaseMode, PoolSettings
from voicepool._engine.actions import Close
from voicepool._engine.warm import AdaptiveWarm, poisson_quantile
from voicepool.testing.traffic import Traffic, TrafficSim


def adaptive(**kw: Any) -> PoolSettings:
    return PoolSettings.model_validate({"warm": "adaptive", **kw})


def steady(concurrency: float, **kw: Any) -> Traffic:
    return Traffic(
        concurrency=lambda t: concurrency, max_concurrency=concurrency, bursts_per_hour=0, **kw
    )


def test_poisson_quantile() -> None:
    assert poisson_quantile(0.0, 0.999) == 0
    assert poisson_quantile(0.1, 0.999) == 2  # P(X<=1) = 0.9953, P(X<=2) = 0.99985
    assert poisson_quantile(10.0, 0.5) == 10
    big = poisson_quantile(1000.0, 0.999)  # the normal approximation path
    assert 1090 <= big <= 1110


def test_settings_are_validated_naming_the_field() -> None:
    for bad, field in (
        ({"warm": "sometimes"}, "warm"),
        ({"warm_target": 1.0}, "warm_target"),
        ({"warm_window": 0}, "warm_window"),
    ):
        with pytest.raises(pydantic.ValidationError, match=field):
            PoolSettings.model_validate(bad)
    assert PoolSettings().warm == "fixed"  # the default, decided from the benchmark (warm.py)


def test_adaptive_min_size_defaults_to_one_and_max_stays_the_bound() -> None:
    s = adaptive(concurrency=50)
    sizing = s.resolve(cast(Any, _Exclusive()))
    assert (sizing.min_size, sizing.max_size) == (1, 63)


def test_shrinks_only_idle_connections_and_never_below_in_use_plus_spares() -> None:
    """Every surplus retire takes a connection idle for the linger, and leaves at least what is
    in use plus the spare target (the floor)."""
    sim = TrafficSim(adaptive(concurrency=50), _ramp_down(), seed=3, sample_every=600)
    core = sim.core
    policy = core.policy
    assert isinstance(policy, AdaptiveWarm)
    retired = 0
    apply = sim._apply

    def checked(actions: Any) -> None:
        nonlocal retired
        for a in actions:
            if isinstance(a, Close) and a.reason == "surplus":
                retired += 1
                assert sim.now - a.rec.last_used >= policy.linger
                in_use = len(core.conns) - len(core.idle)
                assert in_use >= sim._held  # nothing held was taken
                assert len(core.conns) + core.opening >= in_use + policy.spares
        apply(actions)

    sim._apply = checked  # type: ignore[method-assign]
    result = sim.run(4 * 3600)
    assert retired > 20  # it did shrink as the calls went away
    assert result.samples[-1][2] < 20  # from ~40 calls to ~3: the pool followed


def test_grows_ahead_of_a_rising_rate() -> None:
    """On a ramp the forecast leads the decayed level: the floor rises before the peak."""
    ramp = 3600.0

    def concurrency(t: float) -> float:
        return 2 + 198 * min(1.0, t / ramp)

    traffic = Traffic(concurrency=concurrency, max_concurrency=200, bursts_per_hour=0)
    sim = TrafficSim(adaptive(concurrency=200, max_size=400), traffic, seed=2)
    policy = sim.core.policy
    assert isinstance(policy, AdaptiveWarm)
    sim.run(ramp * 0.75)
    true_rate = concurrency(sim.now) / traffic.mean_duration
    assert policy.level < true_rate  # the level alone lags the ramp
    assert policy.rate > true_rate  # the trend brings the forecast ahead of it
    level_only = poisson_quantile(policy.level * policy.connect_time, policy.target)
    assert policy.spares >= level_only


def test_stable_in_steady_traffic() -> None:
    """Steady Poisson traffic: at most one spare-target change per warm_window once learnt."""
    window = 300.0
    sim = TrafficSim(adaptive(concurrency=60, warm_window=window), steady(40.0), seed=5)
    policy = sim.core.policy
    assert isinstance(policy, AdaptiveWarm)
    learn, windows = 2 * 3600.0, 20  # learn: the decayed level's time constant is one window
    marks: list[int] = []
    sim._at(learn, lambda: marks.append(policy.changes))
    result = sim.run(learn + windows * window, measure_from=learn)
    assert policy.changes - marks[0] <= windows, policy.changes - marks[0]
    assert result.wait_share <= 0.001


def test_waits_are_rare_and_idle_far_below_fixed_with_bursts() -> None:
    """A short version of benchmarks/warm_floor.py: three hours at a steady 20 calls with
    bursts of 10, measured after an hour of learning."""
    traffic = Traffic(
        concurrency=lambda t: 20.0, max_concurrency=20.0, bursts_per_hour=4.0, burst=10
    )
    # (Seed 7's trace piles a burst onto a crest beyond max_size: fixed waits there too.)
    fixed = TrafficSim(PoolSettings(concurrency=40), traffic, seed=1).run(4 * 3600, 3600)
    adapt = TrafficSim(adaptive(concurrency=40), traffic, seed=1).run(4 * 3600, 3600)
    assert adapt.wait_share <= 0.002, adapt.waited
    assert adapt.waited <= fixed.waited
    assert adapt.idle_time < 0.7 * fixed.idle_time
    stats = adapt.core.stats()
    assert stats.idle_time > 0
    assert stats.warm_target >= 1
    assert 0.99 <= stats.warm_share <= 1.0
    assert not math.isnan(adapt.open_time)


def _ramp_down() -> Traffic:
    return Traffic(
        concurrency=lambda t: 40.0 if t < 3600 else 3.0,
        max_concurrency=40.0,
        bursts_per_hour=0,
    )


class _Exclusive:
    lease_mode = LeaseMode.EXCLUSIVE
    max_streams = 1


def test_observe_without_a_core_rolls_once_a_bucket() -> None:
    """The feed a group's standbys use (voicepool.group): a cumulative count, no core."""
    warm = AdaptiveWarm(0.999, 20.0, slack=0.0, bursts=False)
    warm.connected(0.1)
    assert warm.connect_time == 0.2  # mean + 2 deviations, no slack
    assert warm.observe(0, 0.0) == 0  # the first call starts the first bucket
    count = 0
    for s in range(1, 11):
        count += 30
        assert warm.observe(count, s - 0.5) == warm.spares  # within the bucket: no roll
        warm.observe(count, float(s))
    assert warm.rate > 10
    assert warm.spares == poisson_quantile(warm.rate * warm.connect_time, 0.999)
    assert warm._burst == 0  # bursts=False keeps no burst memory

"""Issue 11's failure goals over real sockets, scaled down to seconds (the full-size figures are
``benchmarks/faults.py``). Each test runs one scenario of :mod:`tests.faults.scenarios`."""

from __future__ import annotations

from tests.faults import scenarios

NOISE_FLOOR = 0.002  # seconds of event-loop lag a loaded 2-core CI machine adds to any p99 run


async def test_a_server_that_hangs_up_after_the_upgrade_draws_few_handshakes() -> None:
    result = await scenarios.reconnect_storm(16, window=2.0, baseline=1.0)
    assert result.handshakes <= 40
    # A p99 of a few hundred samples below 1 ms is scheduler noise on a shared CI machine (it
    # moved 3x between idle runs here); the storm this guards against took it to 13 ms.
    assert result.storm_p99 <= 3 * max(result.baseline_p99, NOISE_FLOOR)


async def test_a_server_with_zero_streams_draws_few_handshakes() -> None:
    assert await scenarios.zero_stream_handshakes(2, window=2.0) <= 20


async def test_a_pool_is_full_again_soon_after_a_short_outage() -> None:
    result = await scenarios.outage(8, length=0.5, limit=5.0)
    assert result.refill is not None, "not full again within 5 s of the provider's return"


async def test_a_pool_dials_little_during_an_outage() -> None:
    result = await scenarios.outage(8, length=2.0, limit=20.0)
    assert result.attempts_per_s <= 5


async def test_a_min_size_0_pool_recovers_after_its_circuit_opened() -> None:
    backoff_max = 1.0
    recovered = await scenarios.circuit_recovery(backoff_max=backoff_max, limit=backoff_max + 2)
    assert recovered is not None, "no acquire succeeded within backoff_max + 2 s"


async def test_a_full_pool_whose_fresh_connections_died_young_recovers() -> None:
    """The circuit opened while every connection was young and the pool was full: it closes
    within backoff_max + 2 s of the provider's return, and the floor (held while the probe
    proves itself: min_healthy, 2 s) is full min_healthy later."""
    backoff_max = 1.0
    r = await scenarios.full_pool_circuit_recovery(4, hang_for=2.0, backoff_max=backoff_max)
    assert r.opened, "the circuit never opened while the provider hung up"
    assert r.closed is not None
    assert r.closed <= backoff_max + 2
    assert r.full is not None
    assert r.full <= backoff_max + 2 + 2.0


# Not met by PoolCore either (engine 6325495): a waiter stays while a retry is due before its
# deadline, and that retry fails too (median 2 s at full size, benchmarks/faults.py fail-fast).
async def test_a_one_connection_pool_fails_callers_fast_while_its_provider_is_down() -> None:
    assert await scenarios.caller_failure_latency(5, spacing=0.1) <= 0.1


async def test_boot_against_a_black_hole_costs_about_one_connect_timeout() -> None:
    connect_timeout = 0.5
    assert await scenarios.boot_time(40, connect_timeout) <= 1.5 * connect_timeout


async def test_ready_degraded_ready_reach_the_debug_log() -> None:
    result = await scenarios.degraded_reported(2)
    assert result.state_during.value == "degraded"
    assert result.missing == []

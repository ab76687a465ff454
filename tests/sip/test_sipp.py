"""SIP pools against scripted SIPp registrars: failures back off, and nothing storms.

A retry storm is what happens when every component retries on its own (pjsua's retry timer plus
the pool's, or no backoff at all): hundreds of REGISTERs a second. Here pjsua's own retry is off
and the pool probes one attempt at a time with a jittered, capped backoff.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
from collections import Counter

import pytest
from pydantic import SecretStr

from tests.peers.sipp import Sipp, sipp_available
from tests.sip.conftest import fast, sip_adapter
from voicepool import ConnectError, Pool, PoolState, PoolUnavailable
from voicepool.adapters.sip import SipRegistration

pytest.importorskip("pjsua2", reason="pjsua2 (voicepool[sip]) is not installed")

pytestmark = [
    pytest.mark.needs_bin,
    pytest.mark.skipif(not sipp_available(), reason="sipp (sip-tester) is not installed"),
]

WINDOW = 3.0  # seconds of failure observed per test
PROBING = fast(min_size=2, max_size=2, failure_threshold=2, backoff_initial=0.1, backoff_max=0.5)


def per_second(times: list[float]) -> list[int]:
    """REGISTERs in each second of the window, from the first one."""
    start = min(times)
    buckets = Counter(int(t - start) for t in times)
    return [buckets.get(i, 0) for i in range(max(buckets) + 1)]


async def observe_failing_pool(
    sipp: Sipp, *, connect_timeout: float = 1.0
) -> Pool[SipRegistration]:
    adapter = sip_adapter(sipp.uri, transport=sipp.transport)
    settings = PROBING.model_copy(update={"connect_timeout": connect_timeout})
    pool = Pool(adapter, settings, name="sip")
    await pool.start(require_ready=False)
    await asyncio.sleep(WINDOW)  # the window being measured, not a synchronisation
    return pool


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_503_backs_off_without_a_retry_storm(transport: str) -> None:
    async with Sipp("reg503", transport=transport) as sipp:
        pool = await observe_failing_pool(sipp)
        try:
            assert pool.state is PoolState.UNAVAILABLE
            with pytest.raises(PoolUnavailable) as info:
                async with pool.acquire():
                    pass
            cause = info.value.__cause__
            assert isinstance(cause, ConnectError)
            assert cause.status == 503
            assert not cause.fatal
        finally:
            await pool.aclose()
        registers = sipp.registers()
    times = [t for t, _, _ in registers]
    per_call = Counter(call_id for _, call_id, _ in registers)
    # pjsua never retried by itself: each attempt is one REGISTER on a fresh account.
    assert set(per_call.values()) == {1}, per_call
    rates = per_second(times)
    # Warm-up opens 2 at once, then one probe at a time, each after uniform(0, cap) with the
    # cap growing from 0.1 s to 0.5 s: ~2-10 a second. A storm would be hundreds.
    assert len(times) >= 4, "the circuit must keep probing"
    assert len(times) <= 45, rates
    assert max(rates) <= 25, rates
    late = sorted(times)
    gaps = [b - a for a, b in itertools.pairwise(late) if b - late[0] > 1.0]
    assert statistics.median(gaps) >= 0.02, gaps  # backed off, not looping


async def test_no_answer_backs_off_and_stops_retransmitting() -> None:
    async with Sipp("regdrop", transport="udp") as sipp:
        pool = await observe_failing_pool(sipp, connect_timeout=0.5)
        try:
            assert pool.state is PoolState.UNAVAILABLE
            with pytest.raises(PoolUnavailable):
                async with pool.acquire():
                    pass
        finally:
            await pool.aclose()
        registers = sipp.registers()
    attempts = Counter(call_id for _, call_id, _ in registers)
    # Each attempt waits connect_timeout (0.5 s) and then a backoff: at most ~8 in 3 s.
    assert 2 <= len(attempts) <= 14, attempts
    # UDP retransmits an unanswered REGISTER (0.5 s, 1 s, 2 s...) only until the transaction
    # timeout (3 s in these tests), even after the pool gave up on it.
    assert max(attempts.values()) <= 4, attempts
    assert max(per_second([t for t, _, _ in registers])) <= 30


async def test_sipp_digest_registrar() -> None:
    async with Sipp("regauth", transport="udp") as sipp:
        adapter = sip_adapter(sipp.uri)
        async with Pool(adapter, fast(min_size=2, max_size=2), name="sip") as pool:
            assert pool.state is PoolState.READY
            async with pool.acquire() as lease:
                assert lease.conn.registered
                await adapter.ping(lease.conn)
        wrong = sip_adapter(sipp.uri, password=SecretStr("nope"))
        with pytest.raises(ConnectError) as info:
            await wrong.connect()
        assert info.value.status == 403
        assert info.value.fatal

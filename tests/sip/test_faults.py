"""The SIP fault matrix (issue 12): the pool's view of a registrar that fails, over real sockets.

Kamailio down and back, a lost TCP connection, a flapping registrar (accepts, then 503s), a 503
storm, a restart under load. The figures of the same matrix: ``benchmarks/sip.py --faults``.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.peers.kamailio import Kamailio
from tests.sip.conftest import eventually, fast, sip_adapter
from voicepool import Pool, PoolState
from voicepool.testing.sip_registrar import SipRegistrar

pytest.importorskip("pjsua2", reason="pjsua2 (voicepool[sip]) is not installed")

pytestmark = pytest.mark.needs_bin

# The shipped ping interval (30 s) and more: what is seen here is not the pool's ping.
QUIET = fast(min_size=2, max_size=2, ping_interval=60, ping_timeout=5)


async def test_tcp_connection_loss_marks_registrations_lost_at_once(kamailio: Kamailio) -> None:
    adapter = sip_adapter(kamailio.uri, transport="tcp", expires=60)
    async with Pool(adapter, QUIET, name="sip") as pool:
        async with pool.acquire() as lease:
            reg = lease.conn
        assert reg.registered
        await kamailio.stop()
        t0 = time.monotonic()
        took = await eventually(lambda: not reg.registered, timeout=5)
        assert took < 1.0, took
        await eventually(lambda: pool.state is PoolState.UNAVAILABLE, timeout=2)
        assert time.monotonic() - t0 < 2.0
    assert kamailio.registers(), "Kamailio.registers() reads the REGISTERs from its log"


async def test_kamailio_registers_counts_each_transaction(kamailio: Kamailio) -> None:
    adapter = sip_adapter(kamailio.uri)
    conn = await adapter.connect()
    await adapter.close(conn)
    registers = kamailio.registers()
    # REGISTER -> 401, authenticated REGISTER -> 200, un-REGISTER -> 401, authenticated -> 200.
    assert len(registers) == 4, registers
    assert len({call_id for _, call_id, _ in registers}) == 1
    assert [cseq for _, _, cseq in registers] == sorted(cseq for _, _, cseq in registers)
    assert all(abs(t - time.time()) < 30 for t, _, _ in registers)


async def test_registration_leased_back_to_back_is_still_pinged(registrar: SipRegistrar) -> None:
    # Zero hold time, a lease every 50 ms (10x more often than ping_interval): a lease does no
    # I/O over a registration, so it must not postpone the ping (the refresh REGISTER).
    adapter = sip_adapter(registrar.uri, expires=60)
    settings = fast(ping_interval=0.5, ping_timeout=0.4)
    async with Pool(adapter, settings, name="sip") as pool:
        async with pool.acquire() as lease:
            reg = lease.conn
        first = reg.registers
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2.0:  # bounded: 40 leases
            async with pool.acquire():
                pass
            await asyncio.sleep(0.05)
        # pjsua's own refresh comes 30 s before a 60 s expiry: every REGISTER here is a ping.
        assert reg.registers - first >= 2, (first, reg.registers)

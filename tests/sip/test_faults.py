"""The SIP fault matrix (issue 12): the pool's view of a registrar that fails, over real sockets.

Kamailio down and back, a lost TCP connection, a flapping registrar (accepts, then 503s), a 503
storm, a restart under load. The figures of the same matrix: ``benchmarks/sip.py --faults``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter

import pytest

from tests.peers.kamailio import Kamailio
from tests.sip.conftest import fast, sip_adapter
from voicepool import Pool, PoolError, PoolState
from voicepool.adapters.sip import SipRegistration
from voicepool.testing import wait_until
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
        took = await wait_until(lambda: not reg.registered, timeout=5)
        assert took < 1.0, took
        await wait_until(lambda: pool.state is PoolState.UNAVAILABLE, timeout=2)
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
            await asyncio.sleep(0.05)  # lease pacing (the traffic), not synchronisation
        # pjsua's own refresh comes 30 s before a 60 s expiry: every REGISTER here is a ping.
        assert reg.registers - first >= 2, (first, reg.registers)


class Leases:
    """Zero-hold leases every 10 ms in the background: (time, registration) or (time, None)."""

    def __init__(self, pool: Pool[SipRegistration]) -> None:
        self.pool = pool
        self.taken: list[tuple[float, SipRegistration | None]] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            t = time.monotonic()
            try:
                async with self.pool.acquire(timeout=0.2) as lease:
                    self.taken.append((t, lease.conn))
            except PoolError:
                self.taken.append((t, None))
            await asyncio.sleep(0.01)  # lease pacing (the traffic), not synchronisation

    async def __aenter__(self) -> Leases:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    def granted(self, since: float = 0.0) -> list[tuple[float, SipRegistration]]:
        return [(t, reg) for t, reg in self.taken if reg is not None and t >= since]


async def test_flapping_registrar_never_lends_an_unregistered_binding(
    registrar: SipRegistrar,
) -> None:
    # Accepts for 1 s, then answers 503 for 1 s, twice: refreshes fail, registrations are
    # replaced when it accepts again. The registrar's own table is the truth for every lease.
    unbound: list[float] = []
    adapter = sip_adapter(registrar.uri, expires=10)
    async with Pool(adapter, fast(min_size=2, max_size=2), name="sip") as pool:
        async with Leases(pool) as leases:
            t_start = time.monotonic()
            for _ in range(2):
                await asyncio.sleep(1.0)  # the phases being measured, not a synchronisation
                registrar.mode = "503"
                await asyncio.sleep(1.0)
                registrar.mode = "ok"
            healed = time.monotonic()
            await wait_until(lambda: leases.granted(healed), timeout=3)
        for t, reg in leases.granted(t_start):
            if not any(f"vpl={reg.contact_tag}" in b.contact for b in registrar.bindings()):
                unbound.append(t - t_start)
    assert not unbound, unbound
    assert len(leases.granted(t_start)) > 50
    rates = Counter(int(t - t_start) for t in registrar.register_times if t >= t_start)
    assert max(rates.values()) <= 30, rates  # backed off: no storm while it answers 503


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_restart_under_load(kamailio: Kamailio, transport: str) -> None:
    # Kamailio keeps its location table in memory: after a restart it holds no binding until
    # each registration REGISTERs again. TCP notices at once (the connection drops); UDP only
    # at the next refresh, which the ping (every ping_interval) sends.
    settings = fast(min_size=3, max_size=3, ping_interval=0.5, ping_timeout=0.4)
    adapter = sip_adapter(kamailio.uri, transport=transport)
    async with Pool(adapter, settings, name="sip") as pool:
        async with Leases(pool) as leases:
            await asyncio.sleep(0.5)  # load before the fault
            await kamailio.restart()
            restarted = time.monotonic()
            await wait_until(lambda: len(leases.granted(restarted)) > 20, timeout=5)
            took = await wait_until(
                lambda: all(
                    reg.registered_at >= restarted
                    for _, reg in leases.granted(time.monotonic() - 0.1)
                ),
                timeout=5,
            )
        stale = [
            t - restarted for t, reg in leases.granted(restarted) if reg.registered_at < restarted
        ]
        await wait_until(lambda: _count(kamailio, 3), timeout=5)
    if transport == "tcp":
        assert not stale, stale  # every lease after the restart is a fresh registration
    else:
        bound = settings.ping_interval + settings.ping_timeout + 0.5
        assert not stale or max(stale) < bound, (max(stale), took)


async def _count(kamailio: Kamailio, expected: int) -> bool:
    return await kamailio.binding_count("alice") == expected

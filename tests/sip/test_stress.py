"""200 boot/close cycles of a SIP pool in one process: no crash, no hang, nothing left over.

One engine for the whole run (held), so only accounts churn: 2 registrations per cycle, a lease
that runs a function on the owner thread, un-REGISTER on close; every 5th boot is cancelled
half-way. Takes about 5-10 s here (it prints its own timing with -s).
"""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest

from tests.sip.conftest import fast, sip_adapter
from voicepool import Pool
from voicepool.adapters.sip import OwnerContext, SipEngine
from voicepool.testing.sip_registrar import SipRegistrar

pytest.importorskip("pjsua2", reason="pjsua2 (voicepool[sip]) is not installed")

CYCLES = 200


def account_id(ctx: OwnerContext) -> int:
    return int(ctx.account.id)


@pytest.mark.timeout(60)
async def test_200_pool_boot_close_cycles(registrar: SipRegistrar, engine: SipEngine) -> None:
    rng = random.Random(7)
    starts_before = engine.stats().starts
    adapter = sip_adapter(registrar.uri)
    settings = fast(min_size=2, max_size=2)
    t0 = time.monotonic()
    cancelled = 0
    with engine.hold():
        for cycle in range(CYCLES):
            pool = Pool(adapter, settings, name="sip")
            if cycle % 5 == 4:
                boot = asyncio.create_task(pool.start())
                await asyncio.sleep(rng.uniform(0, 0.004))
                boot.cancel()
                try:
                    await boot
                except asyncio.CancelledError:
                    cancelled += 1
                await pool.aclose()
                continue
            async with pool:
                async with pool.acquire() as lease:
                    assert await lease.conn.run(account_id) >= 0
                assert registrar.binding_count() == 2
            assert registrar.binding_count() == 0, f"cycle {cycle}"
        elapsed = time.monotonic() - t0
        for _ in range(250):  # cancelled boots close in the background: <= 5 s
            if not engine.stats().accounts:
                break
            await asyncio.sleep(0.02)
        assert engine.stats().accounts == 0
        assert engine.stats().starts == starts_before + 1  # one engine, accounts churned
    assert await engine.wait_stopped(5)
    # The owner thread is gone. (Other threads may have started meanwhile: an OpenTelemetry
    # SDK span processor installed globally by another test starts its worker lazily.)
    assert not [t for t in threading.enumerate() if t.name == "voicepool-pjsua"]
    assert registrar.binding_count() == 0
    print(f"\n{CYCLES} SIP pool cycles ({cancelled} cancelled boots) in {elapsed:.2f} s")
    assert elapsed < 45

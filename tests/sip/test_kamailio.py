"""SIP pools against a real Kamailio registrar (digest auth) on 127.0.0.1.

At most 7 registrations at a time (pjsua2's limit is 8 per process, shared by every test).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from pathlib import Path

import pytest
from pydantic import SecretStr

from tests.peers.kamailio import Kamailio
from tests.sip.conftest import FAST, KamailioFactory, fast, sip_adapter
from voicepool import ConnectError, Pool, PoolState, PoolUnavailable
from voicepool.adapters.sip import SipRegistration
from voicepool.testing import wait_until

pytest.importorskip("pjsua2", reason="pjsua2 (voicepool[sip]) is not installed")

pytestmark = pytest.mark.needs_bin

SEVEN = fast(min_size=7, max_size=7)
REPO = str(Path(__file__).resolve().parents[2])


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_seven_registrations_refreshed_then_removed(
    kamailio: Kamailio, transport: str
) -> None:
    # No pings: the refreshes seen here are pjsua's own, 5 s before the 10 s expiry.
    adapter = sip_adapter(kamailio.uri, transport=transport, expires=10)
    settings = fast(min_size=7, max_size=7, ping_interval=60, ping_timeout=5)
    async with Pool(adapter, settings, name="sip") as pool:
        assert pool.stats().size == 7
        contacts = await kamailio.contacts()
        assert len(contacts) == 7
        assert {c.aor for c in contacts} == {"alice"}
        if transport == "tcp":
            assert all("transport=tcp" in c.address.lower() for c in contacts)
        async with contextlib.AsyncExitStack() as stack:
            # Least-loaded first: 7 leases land on the 7 registrations.
            leases = [await stack.enter_async_context(pool.acquire()) for _ in range(7)]
            regs: list[SipRegistration] = [lease.conn for lease in leases]
        assert len({id(r) for r in regs}) == 7
        assert {f"vpl={r.contact_tag}" for r in regs} == {
            part for c in contacts for part in c.address.split(";") if part.startswith("vpl=")
        }
        t_boot = time.monotonic()
        await wait_until(lambda: all(r.registers >= 2 for r in regs), timeout=9)
        refreshed_after = time.monotonic() - t_boot
        assert 3.0 < refreshed_after < 8.0, refreshed_after  # refresh at expiry - 5 s
        contacts = await kamailio.contacts()
        assert len(contacts) == 7
        assert all(c.expires is not None and c.expires >= 5 for c in contacts), contacts
        assert all(r.registered and r.valid_until > time.monotonic() + 5 for r in regs)
        async with pool.acquire() as lease:
            assert lease.conn.registered
    assert await kamailio.binding_count() == 0  # clean shutdown: every binding removed


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_registrar_outage_then_restart(kamailio: Kamailio, transport: str) -> None:
    adapter = sip_adapter(kamailio.uri, transport=transport)
    async with Pool(adapter, SEVEN, name="sip") as pool:
        assert await kamailio.binding_count("alice") == 7
        await kamailio.stop()
        # UDP: the refresh-REGISTER pings go unanswered; TCP: the connection drops at once.
        lost_after = await wait_until(
            lambda: pool.state is PoolState.UNAVAILABLE and pool.stats().size == 0, timeout=8
        )
        t0 = time.monotonic()
        with pytest.raises(PoolUnavailable) as info:
            async with pool.acquire(timeout=2):
                pass
        assert time.monotonic() - t0 < 0.1, "a dead registrar must cost an acquire nothing"
        assert isinstance(info.value.__cause__, ConnectError)
        await kamailio.start()
        t_restart = time.monotonic()
        await wait_until(
            lambda: pool.state is PoolState.READY and pool.stats().size == 7, timeout=8
        )
        back_after = time.monotonic() - t_restart
        # One backoff delay (<= backoff_max) plus an attempt that may have been in flight
        # (<= connect_timeout), then the other six in parallel; generous for 2 shared cores.
        bound = FAST.backoff_max + FAST.connect_timeout + 1.5
        assert back_after < bound, (back_after, bound, lost_after)
        assert await kamailio.binding_count("alice") == 7
        async with pool.acquire() as lease:
            assert lease.conn.registered
    assert await kamailio.binding_count() == 0


@pytest.mark.parametrize(("variant", "status"), [({}, 401), ({"wrong_password_403": True}, 403)])
async def test_rejected_credentials_open_the_circuit_with_the_status(
    kamailio_factory: KamailioFactory, variant: dict[str, bool], status: int
) -> None:
    kam = await kamailio_factory(**variant)
    adapter = sip_adapter(kam.uri, password=SecretStr("wrong"))
    pool = Pool(adapter, fast(min_size=2, max_size=2), name="sip")
    await pool.start(require_ready=False)
    try:
        assert pool.state is PoolState.UNAVAILABLE
        t0 = time.monotonic()
        with pytest.raises(PoolUnavailable, match=f"with {status} ") as info:
            async with pool.acquire():
                pass
        assert time.monotonic() - t0 < 0.1
        cause = info.value.__cause__
        assert isinstance(cause, ConnectError)
        assert cause.status == status
        assert cause.fatal
        assert "wrong" not in str(cause).replace("wrong username", "")
    finally:
        await pool.aclose()
    assert await kam.binding_count() == 0
    # require_ready (the default): the boot itself fails, naming the status.
    with pytest.raises(PoolUnavailable, match=f"with {status} "):
        async with Pool(adapter, FAST, name="sip"):
            pass


async def test_min_expires_423_is_followed(kamailio_factory: KamailioFactory) -> None:
    kam = await kamailio_factory(min_expires=20, min_expires_423=True)
    adapter = sip_adapter(kam.uri, expires=10)
    conn = await adapter.connect()
    try:
        assert conn.expires == 20
        [contact] = await kam.contacts()
        assert contact.expires is not None
        assert contact.expires > 10
    finally:
        await adapter.close(conn)
    assert await kam.binding_count() == 0


async def test_process_exit_without_close_unregisters(kamailio: Kamailio) -> None:
    """A worker that exits without closing its pools leaves no binding behind (atexit)."""
    script = (
        "import asyncio\n"
        "from tests.sip.conftest import sip_adapter\n"
        "async def main():\n"
        f"    conn = await sip_adapter('{kamailio.uri}').connect()\n"
        "    assert conn.registered\n"
        "asyncio.run(main())\n"
    )
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script, cwd=REPO)
    async with asyncio.timeout(20):
        assert await proc.wait() == 0
    assert await kamailio.binding_count() == 0

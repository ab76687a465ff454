"""A group of registration pools on two carriers (two registrars): when one carrier's registration
is lost, calls are placed on the other, at once and on a registration that was already warm."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Iterator
from typing import Any

import pytest

from tests.group.test_group import Switches
from tests.peers.sipp import Sipp, sipp_available
from tests.sip.conftest import KamailioFactory, fast, sip_adapter
from voicepool import Pool, PoolGroup, PoolState
from voicepool._engine.observer import PoolObserver
from voicepool.adapters.sip import OwnerContext, SipRegistration
from voicepool.group import GroupObserver, add_group_observer_factory, remove_group_observer_factory
from voicepool.testing.fake import wait_until
from voicepool.testing.sip_registrar import SipRegistrar

pj: Any = pytest.importorskip("pjsua2", reason="pjsua2 (voicepool[sip]) is not installed")

pytestmark = [
    pytest.mark.needs_bin,
    pytest.mark.skipif(not sipp_available(), reason="sipp (sip-tester) is not installed"),
]

CONFIRMED = int(pj.InvState.CONFIRMED)


class TrackedCall(pj.Call):  # type: ignore[misc]
    def __init__(self, account: Any, call_id: int = -1) -> None:
        super().__init__(account, call_id)
        self.states: list[int] = []

    def onCallState(self, prm: Any) -> None:
        with contextlib.suppress(Exception):
            self.states.append(int(self.info.state))


@pytest.fixture
def switches() -> Iterator[Switches]:
    rec = Switches()

    def factory(group: PoolGroup[Any]) -> GroupObserver:
        return rec

    add_group_observer_factory(factory)
    yield rec
    remove_group_observer_factory(factory)


async def place_call(reg: SipRegistration, target: str) -> None:
    def dial(ctx: OwnerContext) -> None:
        call = ctx.keep("out", TrackedCall(ctx.account))
        call.makeCall(target, pj.CallOpParam(True))

    def confirmed(ctx: OwnerContext) -> bool:
        call = ctx.get("out")
        return call is not None and CONFIRMED in call.states

    def hang_up(ctx: OwnerContext) -> None:
        ctx.get("out").hangup(pj.CallOpParam(True))
        ctx.drop("out")

    await reg.run(dial)
    await wait_until(lambda: reg.run(confirmed), timeout=5)
    await reg.run(hang_up)


async def test_carrier_registration_lost_calls_go_to_the_other(switches: Switches) -> None:
    async with (
        SipRegistrar(users={"alice": "secret"}) as telnyx,
        SipRegistrar(users={"alice": "secret"}) as bandwidth,
        Sipp("uas", transport="udp") as uas,
    ):
        first = Pool(sip_adapter(telnyx.uri), fast(), name="carrier_a")
        second = Pool(sip_adapter(bandwidth.uri), fast(), name="carrier_b")
        async with PoolGroup([first, second], name="pstn", failback_after=60) as group:
            assert (telnyx.binding_count(), bandwidth.binding_count()) == (1, 1)  # both warm
            async with group.acquire() as lease:
                assert lease.pool is first
            telnyx.mode = "503"  # the carrier's refresh REGISTERs are refused: registration lost
            assert (await switches.next(timeout=5))[:2] == ("carrier_a", "carrier_b")
            assert first.state is PoolState.UNAVAILABLE
            connects = second.stats().connects
            async with group.acquire() as lease:
                assert lease.pool is second
                assert lease.conn.registered
                await place_call(lease.conn, f"sip:service@127.0.0.1:{uas.port}")
            assert second.stats().connects == connects  # the call used the warm registration


class _ReadyTimes(PoolObserver):
    """Records when the pool it watches becomes READY (loop time)."""

    def __init__(self, into: list[float], loop: asyncio.AbstractEventLoop) -> None:
        self.into, self.loop = into, loop

    def on_state(self, pool: Any, old: PoolState, new: PoolState) -> None:
        if new is PoolState.READY:
            self.into.append(self.loop.time())


async def test_two_kamailio_carriers_one_stops_calls_go_to_the_other(
    kamailio_factory: KamailioFactory, switches: Switches
) -> None:
    carrier_a, carrier_b = await kamailio_factory(), await kamailio_factory()
    async with Sipp("uas", transport="udp") as uas:
        first = Pool(sip_adapter(carrier_a.uri), fast(), name="carrier_a")
        second = Pool(sip_adapter(carrier_b.uri), fast(), name="carrier_b")
        group = PoolGroup([first, second], name="pstn", failback_after=1.0)
        async with group:
            assert await carrier_a.binding_count("alice") == 1
            assert await carrier_b.binding_count("alice") == 1  # the standby is registered
            loop = asyncio.get_running_loop()
            t_stop = loop.time()
            await carrier_a.stop()  # its refresh REGISTERs (the pings) go unanswered
            assert (await switches.next(timeout=8))[:2] == ("carrier_a", "carrier_b")
            failover_s = loop.time() - t_stop
            t0 = loop.time()
            async with group.acquire() as lease:
                waited = loop.time() - t0
                assert lease.pool is second
                await place_call(lease.conn, f"sip:service@127.0.0.1:{uas.port}")
            assert waited < 0.05
            # Carrier A returns: new calls go back to it once it stayed READY for failback_after.
            ready_at: list[float] = []
            first.add_observer(_ReadyTimes(ready_at, loop))
            await carrier_a.start()
            t_back = loop.time()
            assert (await switches.next(timeout=8))[:3] == ("carrier_b", "carrier_a", "failback")
            failback_s = loop.time() - t_back
            # (Counted from A's READY, which can come just before start() returns.)
            assert ready_at
            assert loop.time() - ready_at[-1] >= 1.0
            async with group.acquire() as lease:
                assert lease.pool is first
                await place_call(lease.conn, f"sip:service@127.0.0.1:{uas.port}")
            assert second.min_size == 1  # the standby is back to standby_min
            # Flapping: A goes down for 2.5 s and up for 0.6 s (less than failback_after), 3 times:
            # at most one failover per failback_after. Down must outlast what it takes to give up
            # on A: the failed ping (<= ping_interval + ping_timeout, 0.9 s), the jittered refill
            # (<= 0.1 s) and that reconnect's connect_timeout (1 s). A shorter outage is bridged
            # by the reconnect (REGISTER retransmits reach the restarted registrar), and A never
            # turns unavailable: no failover to count (it failed that way 1.2 s down).
            seen = len(switches.seen)
            for _ in range(3):
                await carrier_a.stop()
                await asyncio.sleep(2.5)  # paces the outage
                await carrier_a.start()
                await asyncio.sleep(0.6)  # paces the recovery (shorter than failback_after)
            flaps = [(at, s) for at, s in zip(switches.at, switches.seen, strict=True)][seen:]
            failovers = [at for at, s in flaps if not s[3]]
            assert failovers
            assert all(b - a >= 1.0 for a, b in itertools.pairwise(failovers))
            print(
                f"kamailio pair: failover {failover_s * 1e3:.0f} ms after the stop,"
                f" first acquire on the other carrier {waited * 1e6:.0f} us;"
                f" fail-back {failback_s:.2f} s after A returned (failback_after 1.0 s);"
                f" flapping (down 2.5 s, up 0.6 s, x 3): {len(failovers)} failover(s),"
                f" {len(flaps) - len(failovers)} fail-back(s)"
            )

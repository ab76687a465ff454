"""A lease is enough to place and to accept a call on the leased registration (SIPp as the peer).

The call handler runs its pjsua2 code on the owner thread through ``lease.conn.run`` and keeps
its ``pjsua2.Call`` objects with ``ctx.keep`` (they must live and die on that thread).
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest

from tests.peers.sipp import Sipp, sipp_available
from tests.sip.conftest import fast, sip_adapter
from voicepool import Pool
from voicepool.adapters.sip import OwnerContext, SipRegistration
from voicepool.testing import wait_until
from voicepool.testing.sip_registrar import SipRegistrar

pj: Any = pytest.importorskip("pjsua2", reason="pjsua2 (voicepool[sip]) is not installed")

pytestmark = [
    pytest.mark.needs_bin,
    pytest.mark.skipif(not sipp_available(), reason="sipp (sip-tester) is not installed"),
]

CONFIRMED = int(pj.InvState.CONFIRMED)
DISCONNECTED = int(pj.InvState.DISCONNECTED)


class TrackedCall(pj.Call):  # type: ignore[misc]
    """Records its invite states; callbacks never let an exception into PJSIP."""

    def __init__(self, account: Any, call_id: int = -1) -> None:
        super().__init__(account, call_id)
        self.states: list[int] = []

    def onCallState(self, prm: Any) -> None:
        with contextlib.suppress(Exception):
            self.states.append(int(self.info.state))


def states(name: str) -> Any:
    def read(ctx: OwnerContext) -> list[int]:
        call = ctx.get(name)
        return list(call.states) if call is not None else []

    return read


async def test_place_a_call_on_a_leased_registration(registrar: SipRegistrar) -> None:
    async with Sipp("uas", transport="udp") as uas:
        adapter = sip_adapter(registrar.uri)
        async with Pool(adapter, fast(), name="sip") as pool, pool.acquire() as lease:
            reg: SipRegistration = lease.conn

            def dial(ctx: OwnerContext) -> None:
                call = ctx.keep("out", TrackedCall(ctx.account))
                call.makeCall(f"sip:service@127.0.0.1:{uas.port}", pj.CallOpParam(True))

            await reg.run(dial)
            await wait_until(lambda: _has(reg, "out", CONFIRMED), timeout=5)

            def hang_up(ctx: OwnerContext) -> None:
                ctx.get("out").hangup(pj.CallOpParam(True))

            await reg.run(hang_up)
            await wait_until(lambda: _has(reg, "out", DISCONNECTED), timeout=5)
            await reg.run(lambda ctx: ctx.drop("out"))
    assert registrar.binding_count() == 0


async def test_accept_a_call_on_a_leased_registration(registrar: SipRegistrar) -> None:
    adapter = sip_adapter(registrar.uri)
    async with Pool(adapter, fast(), name="sip") as pool, pool.acquire() as lease:
        reg: SipRegistration = lease.conn

        def answer(ctx: OwnerContext, call_id: int) -> None:
            call = ctx.keep("in", TrackedCall(ctx.account, call_id))
            prm = pj.CallOpParam(True)
            prm.statusCode = pj.StatusCode.OK
            call.answer(prm)

        await reg.run(lambda ctx: ctx.on_incoming_call(answer))
        [binding] = registrar.bindings()
        target = binding.contact.split("@", 1)[1].split(";", 1)[0]  # pjsua's UDP host:port
        async with Sipp("uac", transport="udp", remote=target, calls=1,
                        extra_args=("-s", "alice", "-d", "100")) as uac:  # fmt: skip
            assert await uac.wait(10) == 0  # INVITE, 200, ACK, BYE, 200: the call succeeded
        await wait_until(lambda: _has(reg, "in", DISCONNECTED), timeout=5)
        seen = await reg.run(states("in"))
        assert CONFIRMED in seen
        await reg.run(lambda ctx: ctx.drop("in"))


async def _has(reg: SipRegistration, name: str, state: int) -> bool:
    return state in await reg.run(states(name))

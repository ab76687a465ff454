"""Group telemetry: the failover span event on the caller's span, switch counters, and the group
wait histogram with the serving member."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.group.test_group import kill, revive, settings
from tests.telemetry.conftest import Otel
from voicepool import Pool, PoolGroup
from voicepool.group import GroupObserver, add_group_observer_factory, remove_group_observer_factory
from voicepool.telemetry import names as n
from voicepool.testing.fake import FakeNoResetAdapter


class Switched(GroupObserver):
    def __init__(self) -> None:
        self.event = asyncio.Event()

    def on_switch(self, group: PoolGroup[Any], old: str, new: str, why: str, back: bool) -> None:
        self.event.set()


async def test_failover_event_counters_and_wait_by_member(otel: Otel) -> None:
    a, b = FakeNoResetAdapter(), FakeNoResetAdapter()
    switched = Switched()

    def factory(group: PoolGroup[Any]) -> GroupObserver:
        return switched

    add_group_observer_factory(factory)
    try:
        group = PoolGroup(
            [Pool(a, settings(), name="eu"), Pool(b, settings(), name="us")],
            name="tts",
            failback_after=0.05,
        )
        async with group:
            kill(a)
            await asyncio.wait_for(switched.event.wait(), 3)
            switched.event.clear()
            with otel.tracer.start_as_current_span("call"):
                async with group.acquire() as lease:
                    assert lease.pool.name == "us"
            held = [await group.lease() for _ in range(4)]  # us at max_size
            late = asyncio.create_task(group.lease())  # waits for a release
            await asyncio.sleep(0)
            await held.pop().release()
            held.append(await late)
            for lease in held:
                await lease.release()
            revive(a)
            await asyncio.wait_for(switched.event.wait(), 3)
    finally:
        remove_group_observer_factory(factory)
    (call,) = otel.spans("call")
    events = [e for e in call.events if e.name == n.EVENT_FAILOVER]
    (event,) = events
    assert dict(event.attributes or {}) == {
        n.ATTR_GROUP_NAME: "tts",
        n.ATTR_GROUP_FROM: "eu",
        n.ATTR_GROUP_TO: "us",
        n.ATTR_GROUP_WHY: "eu unavailable",
    }
    metrics = otel.metrics()
    assert otel.value(n.GROUP_FAILOVERS, metrics, voicepool__group__to="us") == 1
    assert otel.value(n.GROUP_FAILBACKS, metrics, voicepool__group__to="eu") == 1
    waits = otel.points(n.GROUP_WAIT_TIME, metrics)
    assert {p.attributes[n.ATTR_GROUP_MEMBER] for p in waits} == {"us"}

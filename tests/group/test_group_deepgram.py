"""A Deepgram-adapter group over real sockets: two emulator regions behind FaultProxy."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from tests.group.test_group import Switches
from voicepool import Pool, PoolGroup, PoolSettings
from voicepool.adapters.deepgram import DeepgramAdapter
from voicepool.group import GroupObserver, add_group_observer_factory, remove_group_observer_factory
from voicepool.testing import FaultProxy
from voicepool.testing.asr import DeepgramEmulator

KEY = "group-test-key"


@pytest.fixture
def switches() -> Iterator[Switches]:
    rec = Switches()

    def factory(group: PoolGroup[Any]) -> GroupObserver:
        return rec

    add_group_observer_factory(factory)
    yield rec
    remove_group_observer_factory(factory)


def asr_settings() -> PoolSettings:
    return PoolSettings(
        concurrency=4,
        min_size=3,
        ping_interval=0.1,
        ping_timeout=0.1,
        connect_timeout=1.0,
        failure_threshold=1,
        backoff_initial=0.05,
        backoff_max=0.1,
        drain_timeout=1.0,  # a probe connect in flight to the dead region is not waited for
    )


async def test_deepgram_fallback_region_is_picked_by_rtt_and_takes_over_warm(
    switches: Switches,
) -> None:
    async with (
        DeepgramEmulator(api_key=KEY, idle_timeout=None) as near_em,
        DeepgramEmulator(api_key=KEY, idle_timeout=None) as far_em,
        FaultProxy("127.0.0.1", near_em.port, latency=0.002) as near_proxy,
        FaultProxy("127.0.0.1", far_em.port, latency=0.015) as far_proxy,
    ):
        near = Pool(
            DeepgramAdapter(url=f"ws://127.0.0.1:{near_proxy.port}", api_key=KEY),
            asr_settings(),
            name="asr_near",
        )
        far = Pool(
            DeepgramAdapter(url=f"ws://127.0.0.1:{far_proxy.port}", api_key=KEY),
            asr_settings(),
            name="asr_far",
        )
        group = PoolGroup(
            [far, near], name="asr", policy="lowest_rtt", standby_min=1, failback_after=60
        )
        async with group:
            assert group.active is near  # connect times rank the regions before pings arrive
            assert far.min_size == 1
            async with group.acquire() as lease:
                assert lease.pool is near
                await lease.conn.send_audio(b"hello")
                assert "hello" in str(await lease.conn.recv())
            # The primary's process dies: every socket reset, new connects refused.
            near_proxy.refuse(True)
            await near_proxy.reset_all()
            assert (await switches.next())[:3] == ("asr_near", "asr_far", "asr_near unavailable")
            connects = far.stats().connects
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            async with group.acquire() as lease:
                waited = loop.time() - t0
                assert lease.pool is far
                await lease.conn.send_audio(b"again")
                assert "again" in str(await lease.conn.recv())
            assert far.stats().connects == connects  # the first call on the standby: no handshake
            assert waited < 0.05  # well under one handshake through the 30 ms proxy
            assert far.min_size == 3  # growing to its full floor in the background

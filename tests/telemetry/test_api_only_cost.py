"""Telemetry as imported (opentelemetry-api, no SDK) times no lease; an SDK set later does.

The default instrumentation observes every pool through the global providers. Without an SDK the
use_time histogram drops every value, so the pool must not read the clock twice per lease for it
(benchmarks/acquire.py's exclusive+api row); once the application calls
``metrics.set_meter_provider`` the same observer's answer changes, and within one flush the hold
times reach the SDK. The global provider can be set once per process: that part runs in a child.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from tests.telemetry.fakes import ScriptedAdapter
from voicepool import Pool, PoolSettings, telemetry


async def test_the_api_alone_wants_no_hold_times_and_an_sdk_does() -> None:
    for provider, wanted in ((NoOpMeterProvider(), False), (MeterProvider(), True)):
        inst = telemetry.instrument(meter_provider=provider)
        try:
            pool = Pool(ScriptedAdapter(), PoolSettings(min_size=1, max_size=1), name="asr")
            mine = [o for o in pool.observers if getattr(o, "registry", None) is inst.registry]
            assert len(mine) == 1
            assert mine[0].wants_use_times(pool) is wanted
        finally:
            inst.remove()


async def test_a_removed_instrumentation_wants_no_hold_times() -> None:
    inst = telemetry.instrument(
        meter_provider=MeterProvider(metric_readers=[InMemoryMetricReader()])
    )
    pool = Pool(ScriptedAdapter(), PoolSettings(min_size=1, max_size=1), name="asr")
    (mine,) = [o for o in pool.observers if getattr(o, "registry", None) is inst.registry]
    assert mine.wants_use_times(pool)
    inst.remove()
    assert not mine.wants_use_times(pool)


CHILD = textwrap.dedent(
    """
    import asyncio
    from opentelemetry import metrics
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from tests.telemetry.fakes import ScriptedAdapter
    from voicepool import Pool, PoolSettings

    def use_time_count(reader):
        data = reader.get_metrics_data()
        for rm in data.resource_metrics if data else ():
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name == "voicepool.connection.use_time":
                        return sum(p.count for p in m.data.data_points)
        return 0

    async def main():
        async with Pool(ScriptedAdapter(), PoolSettings(min_size=1, max_size=1), name="asr") as p:
            async with p.acquire():
                pass  # API only: nothing to record this hold time into
            reader = InMemoryMetricReader()
            metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
            p.maintain()  # the flush asks the observers again
            for _ in range(3):
                async with p.acquire():
                    pass
            p.maintain()
            print(use_time_count(reader))

    asyncio.run(main())
    """
)


def test_an_sdk_installed_after_the_pool_gets_hold_times_from_the_next_flush() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.split() == ["3"], out.stderr

"""The instrumentation's lifecycle, the default (global) one, sampling, and the SDK helper."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.telemetry.conftest import Otel, attributes
from tests.telemetry.fakes import ScriptedAdapter, settle
from voicepool import Pool, PoolSettings, PoolUnavailable, telemetry
from voicepool._engine.observer import observers_for
from voicepool.telemetry import _observer
from voicepool.telemetry import names as n
from voicepool.telemetry._observer import OtelObserver
from voicepool.telemetry.sdk import install_sdk


def _settings(**kw: Any) -> PoolSettings:
    return PoolSettings(**{"min_size": 1, "max_size": 1, **kw})


async def test_import_voicepool_enables_the_default_instrumentation() -> None:
    pool = Pool(ScriptedAdapter(), _settings(), name="dflt")
    observers = [o for o in pool.observers if isinstance(o, OtelObserver)]
    assert observers  # attached without any set-up by the application
    assert telemetry.default_instrumentation() is not None
    async with pool:  # a no-op without an SDK, and harmless
        async with pool.acquire():
            pass
        pool.maintain()


async def test_disable_default_detaches_new_pools_and_quiets_old_ones() -> None:
    before = Pool(ScriptedAdapter(), _settings(), name="before")
    telemetry.disable_default()
    try:
        after = Pool(ScriptedAdapter(), _settings(), name="after")
        assert not [o for o in after.observers if isinstance(o, OtelObserver)]
        assert telemetry.default_instrumentation() is None
        inst = next(o for o in before.observers if isinstance(o, OtelObserver))
        assert not inst.registry.active
        assert inst.registry.snapshots() == []
    finally:
        telemetry.enable_default()
    assert observers_for(Pool(ScriptedAdapter(), _settings(), name="x"))


def test_bad_budget_is_rejected() -> None:
    with pytest.raises(ValueError, match="histogram_budget"):
        telemetry.instrument(histogram_budget=0)


async def test_histograms_are_sampled_above_the_budget() -> None:
    """Past the budget a flush records a uniform sample in which zero waits keep their share."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    inst = telemetry.instrument(meter_provider=provider, histogram_budget=100)
    try:
        pool = Pool(ScriptedAdapter(), _settings(), name="busy")
        obs = next(o for o in pool.observers if getattr(o, "registry", None) is inst.registry)
        for _ in range(1000):
            obs.on_waited(pool, 0.5)
        obs.on_flush(pool, [1.0] * 5000, zero_waits=9000)  # 10% of acquires waited 0.5 s
        data = reader.get_metrics_data()
        assert data is not None
        points = {
            m.name: m.data.data_points[0]
            for rm in data.resource_metrics
            for sm in rm.scope_metrics
            for m in sm.metrics
        }
        wait, use = points[n.WAIT_TIME], points[n.USE_TIME]
        assert isinstance(wait, HistogramDataPoint)
        assert isinstance(use, HistogramDataPoint)
        assert use.count == 100
        assert use.sum == pytest.approx(100.0)
        assert wait.count == 100
        assert 2.5 <= wait.sum <= 7.5  # about 10 of the 100 samples are the 0.5 s waits
        obs.on_flush(pool, [0.2] * 10, zero_waits=5)  # below the budget: exact again
        data = reader.get_metrics_data()
        assert data is not None
        exact = {
            m.name: m.data.data_points[0]
            for rm in data.resource_metrics
            for sm in rm.scope_metrics
            for m in sm.metrics
        }
        wait, use = exact[n.WAIT_TIME], exact[n.USE_TIME]
        assert isinstance(wait, HistogramDataPoint)
        assert isinstance(use, HistogramDataPoint)
        assert use.count == 110
        assert wait.count == 105
    finally:
        inst.remove()
        provider.shutdown()


async def test_wait_failed_hook_reports_the_exhaustion_and_the_open_circuit(otel: Otel) -> None:
    """on_wait_failed: a waiter failed by an opening circuit gets both events on its span."""
    async with Pool(ScriptedAdapter(), _settings(), name="asr") as pool:
        with otel.tracer.start_as_current_span("call"):
            for obs in pool.observers:  # as the engine calls hooks: on every observer
                obs.on_exhausted(pool)
            for obs in pool.observers:
                obs.on_wait_failed(pool, 0.0, PoolUnavailable("circuit open", pool="asr"))
            for obs in pool.observers:  # nothing pending any more: no second exhaustion
                obs.on_wait_failed(pool, 0.0, asyncio.CancelledError())
    (span,) = otel.spans("call")
    assert [e.name for e in span.events] == [n.EVENT_EXHAUSTED, n.EVENT_UNAVAILABLE]


async def test_a_stale_exhaustion_is_not_reported_by_a_later_acquire(otel: Otel) -> None:
    async with Pool(ScriptedAdapter(), _settings(), name="asr") as pool:
        with otel.tracer.start_as_current_span("call"):
            for obs in pool.observers:  # then the caller was cancelled: no hook ended that wait
                obs.on_exhausted(pool)
            for obs in pool.observers:  # a later acquire that queued 5 s ago cannot be that one
                obs.on_waited(pool, 5.0)
            for obs in pool.observers:  # while a fresh one is reported
                obs.on_exhausted(pool)
            for obs in pool.observers:
                obs.on_waited(pool, 0.0)
    (span,) = otel.spans("call")
    (event,) = span.events
    assert attributes(event)[n.ATTR_WAIT_TIME] == 0.0


async def test_install_sdk_private_providers() -> None:
    exporter = InMemorySpanExporter()
    sdk = install_sdk(span_exporter=exporter, set_global=False, batch=False)
    try:
        assert sdk.instrumentation is not None
        adapter = ScriptedAdapter()
        adapter.fail_next_connects(ConnectionRefusedError("refused"))
        pool = Pool(adapter, _settings(backoff_initial=0.01, backoff_max=0.02), name="sdk")
        await pool.start(require_ready=False)
        await settle(lambda: pool.stats().size == 1, rounds=5000)
        await pool.aclose()
        names = [s.name for s in exporter.get_finished_spans()]
        assert names.count(n.SPAN_CONNECT) == 2
        assert sdk.tracer_provider.resource.attributes["service.name"] == "voicepool-worker"
    finally:
        sdk.shutdown()
    assert not sdk.instrumentation.active


async def test_cancelled_connect_ends_its_span_without_error(otel: Otel) -> None:
    """If a connect is cancelled and the engine reports it, the span ends, not in error."""
    pool = Pool(ScriptedAdapter(), _settings(), name="asr")
    obs = next(o for o in pool.observers if getattr(o, "registry", None) is otel.inst.registry)
    token = obs.connect_started(pool)
    obs.on_connected(pool, token, 0.01, asyncio.CancelledError())
    (span,) = otel.spans(n.SPAN_CONNECT)
    assert attributes(span)[n.ATTR_CONNECT_CANCELLED] is True
    assert span.status.status_code.name == "UNSET"
    assert not otel.points(n.CREATE_TIME)


async def test_a_failing_hook_is_logged_once_and_never_raises(
    otel: Otel, caplog: pytest.LogCaptureFixture
) -> None:
    pool = Pool(ScriptedAdapter(), _settings(), name="asr")
    obs = next(o for o in pool.observers if getattr(o, "registry", None) is otel.inst.registry)
    _observer._failed_hooks.discard("on_flush")  # "reported once" is per process
    for _ in range(3):
        obs.on_flush(pool, ["not a number"], 0)  # type: ignore[list-item]
    failures = [r for r in caplog.records if r.name == "voicepool.telemetry"]
    assert len(failures) == 1
    assert getattr(failures[0], "voicepool.pool.name") == "asr"


_GLOBAL_SCRIPT = """
import asyncio
from opentelemetry import trace
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from voicepool import Adapter, Pool, PoolExhausted, PoolSettings
from voicepool.telemetry.sdk import install_sdk

class A(Adapter[object]):
    async def connect(self):
        return object()

async def main():
    early = Pool(A(), PoolSettings(min_size=1, max_size=1), name="early")  # before any SDK
    reader, spans = InMemoryMetricReader(), InMemorySpanExporter()
    sdk = install_sdk(metric_readers=[reader], span_exporter=spans, batch=False)
    async with early, Pool(A(), PoolSettings(min_size=1, max_size=1), name="late") as late:
        with trace.get_tracer("app").start_as_current_span("call"):
            async with early.acquire():
                try:
                    async with early.acquire(timeout=0.01):
                        pass
                except PoolExhausted:
                    pass
        data = reader.get_metrics_data()
        seen = {
            (m.name, p.attributes["voicepool.pool.name"])
            for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
            for p in m.data.data_points
        }
        assert ("voicepool.connection.max", "early") in seen, seen
        assert ("voicepool.connection.max", "late") in seen, seen
        assert ("voicepool.connection.timeouts", "early") in seen, seen
    call = [s for s in spans.get_finished_spans() if s.name == "call"][0]
    assert [e.name for e in call.events][:2] == [
        "voicepool.pool.exhausted", "voicepool.pool.timeout"
    ], call.events
    assert sdk.instrumentation is None
    # A second install cannot replace the global providers: it instruments new pools directly.
    reader2 = InMemoryMetricReader()
    again = install_sdk(metric_readers=[reader2])
    assert again.instrumentation is not None
    async with Pool(A(), PoolSettings(min_size=1, max_size=1), name="third"):
        data = reader2.get_metrics_data()
        names = {
            p.attributes["voicepool.pool.name"]
            for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
            for p in m.data.data_points
        }
        assert names == {"third"}, names
    again.shutdown()
    sdk.shutdown()
    print("ok")

asyncio.run(main())
"""


def test_default_instrumentation_reports_once_global_sdk_providers_are_set() -> None:
    """The default path: pools made before the SDK was installed report through it afterwards.

    Global providers can be set once per process, hence a subprocess.
    """
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", _GLOBAL_SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=root,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"

"""Span events on the caller's span, background spans, the alarm, and what must never be added."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import NonRecordingSpan, SpanKind, StatusCode

from tests.telemetry.conftest import Otel, attributes
from tests.telemetry.fakes import FakeConn, Probe, ScriptedAdapter, auth_error, settle
from voicepool import (
    ConnectError,
    Pool,
    PoolExhausted,
    PoolSettings,
    PoolUnavailable,
    VoicepoolError,
)
from voicepool.telemetry import names as n
from voicepool.testing import wait_until


def settings(**kw: Any) -> PoolSettings:
    base: dict[str, Any] = {"min_size": 1, "max_size": 1, "acquire_timeout": 5.0}
    base.update(kw)
    return PoolSettings(**base)


def events(span: ReadableSpan, name: str) -> list[Any]:
    return [e for e in span.events if e.name == name]


async def _hold_until(pool: Pool[FakeConn], release: asyncio.Event) -> None:
    async with pool.acquire():
        await release.wait()


async def test_exhaustion_event_carries_occupancy_and_wait(otel: Otel) -> None:
    async with Pool(ScriptedAdapter(), settings(), name="asr") as pool:
        release = asyncio.Event()
        holder = asyncio.create_task(_hold_until(pool, release))
        await settle(lambda: pool.stats().in_use == 1)

        async def call() -> None:
            with otel.tracer.start_as_current_span("call"):
                async with pool.acquire():
                    pass

        caller = asyncio.create_task(call())
        await settle(lambda: pool.stats().waiters == 1)
        queued_ns = _now_ns()
        await asyncio.sleep(0.02)  # a measurable wait: the thing under test is its duration
        release.set()
        await asyncio.gather(holder, caller)
    (span,) = otel.spans("call")
    (event,) = events(span, n.EVENT_EXHAUSTED)
    attrs = dict(event.attributes)
    assert attrs[n.ATTR_POOL_NAME] == "asr"
    assert attrs[n.ATTR_SIZE] == 1
    assert attrs[n.ATTR_MAX_SIZE] == 1
    assert attrs[n.ATTR_IN_USE] == 1
    assert attrs[n.ATTR_IDLE] == 0
    assert attrs[n.ATTR_WAITERS] == 1
    assert attrs[n.ATTR_WAIT_TIME] >= 0.015
    assert event.timestamp <= queued_ns  # stamped when the acquire queued, not when it ended
    assert not events(span, n.EVENT_TIMEOUT)


def _now_ns() -> int:
    import time

    return time.time_ns()


async def test_timeout_adds_events_and_records_exception(otel: Otel) -> None:
    async with Pool(ScriptedAdapter(), settings(), name="asr") as pool, pool.acquire():
        with (
            otel.tracer.start_as_current_span("call", record_exception=False),
            pytest.raises(PoolExhausted),
        ):
            async with pool.acquire(timeout=0.03):
                pass
    (span,) = otel.spans("call")
    assert [e.name for e in span.events] == [n.EVENT_EXHAUSTED, n.EVENT_TIMEOUT, "exception"]
    timeout = events(span, n.EVENT_TIMEOUT)[0].attributes
    assert timeout[n.ATTR_WAIT_TIME] >= 0.025
    assert timeout[n.ATTR_POOL_NAME] == "asr"
    assert timeout[n.ATTR_IN_USE] == 1
    exc = events(span, "exception")[0].attributes
    assert "PoolExhausted" in exc["exception.type"]
    assert "exhausted" in exc["exception.message"]


async def test_unavailable_event_when_the_circuit_is_open(otel: Otel) -> None:
    adapter = ScriptedAdapter()
    adapter.fail_all_connects = auth_error(adapter)
    pool = Pool(adapter, settings(), name="asr")
    await pool.start(require_ready=False)
    try:
        with (
            otel.tracer.start_as_current_span("call", record_exception=False),
            pytest.raises(PoolUnavailable),
        ):
            async with pool.acquire():
                pass
    finally:
        await pool.aclose()
    (span,) = otel.spans("call")
    (event,) = events(span, n.EVENT_UNAVAILABLE)
    assert event.attributes[n.ATTR_POOL_STATE] == "unavailable"
    assert event.attributes[n.ATTR_ERROR_TYPE] == "ConnectError"
    assert event.attributes[n.ATTR_SIZE] == 0
    # The failed warm-up connect is its own span, in error, with the exception recorded.
    (connect,) = otel.spans(n.SPAN_CONNECT)
    assert connect.status.status_code is StatusCode.ERROR
    assert attributes(connect)[n.ATTR_ERROR_TYPE] == "ConnectError"
    assert events(connect, "exception")


async def test_connect_span_for_a_waiting_caller_is_its_child(otel: Otel) -> None:
    adapter = ScriptedAdapter(connect_delay=0.01)
    async with Pool(adapter, settings(min_size=0, max_size=2), name="asr") as pool:
        with otel.tracer.start_as_current_span("call") as call:
            async with pool.acquire():
                pass
    (connect,) = otel.spans(n.SPAN_CONNECT)
    assert connect.kind is SpanKind.CLIENT
    assert connect.parent is not None
    assert connect.parent.span_id == call.get_span_context().span_id
    assert attributes(connect)[n.ATTR_ADAPTER] == "ScriptedAdapter"
    duration = attributes(connect)[n.ATTR_CONNECT_DURATION]
    assert isinstance(duration, float)
    assert duration >= 0.005
    assert connect.status.status_code is StatusCode.UNSET
    assert connect.end_time is not None
    assert connect.start_time is not None
    assert connect.end_time - connect.start_time >= 5_000_000  # ns: the handshake's own duration


async def test_background_work_after_boot_starts_new_traces(otel: Otel, probe: Probe) -> None:
    """Refills and pings run in tasks whose context holds the long-ended boot span."""
    adapter = ScriptedAdapter()
    pool = Pool(adapter, settings(ping_interval=0.05, ping_timeout=0.05), name="asr")
    with otel.tracer.start_as_current_span("boot") as boot:
        await pool.start()
    try:
        await asyncio.wait_for(probe.pinged.wait(), 10)
        assert not otel.spans(n.SPAN_PING)  # successful pings make no span
        adapter.ping_error = ConnectionResetError("peer reset")
        await adapter.wait_for(lambda: len(adapter.closed) >= 1 and adapter.connects >= 2)
        adapter.ping_error = None
        await settle(lambda: len(otel.spans(n.SPAN_CONNECT)) >= 2)
    finally:
        await pool.aclose()
    boot_id = boot.get_span_context().span_id
    warm, refill = otel.spans(n.SPAN_CONNECT)[:2]
    assert warm.parent is not None
    assert warm.parent.span_id == boot_id  # warm-up ran inside start()
    assert refill.parent is None  # not hung off the ended boot span
    (ping,) = otel.spans(n.SPAN_PING)[:1]
    assert ping.parent is None
    assert ping.status.status_code is StatusCode.ERROR
    assert attributes(ping)[n.ATTR_ERROR_TYPE] == "ConnectionResetError"
    assert events(ping, "exception")
    retired = [s for s in otel.spans(n.SPAN_RETIRE) if s.parent is None]
    assert any(attributes(s)[n.ATTR_CLOSE_REASON] == "ping_failed" for s in retired)


async def test_trace_acquire_span(otel: Otel) -> None:
    async with Pool(ScriptedAdapter(), settings(trace_acquire=True), name="asr") as pool:
        with otel.tracer.start_as_current_span("call") as call:
            async with pool.acquire():
                with pytest.raises(PoolExhausted):
                    async with pool.acquire(timeout=0.01):
                        pass
    ok, failed = otel.spans(n.SPAN_ACQUIRE)
    for span in (ok, failed):
        assert span.parent is not None
        assert span.parent.span_id == call.get_span_context().span_id
        assert attributes(span)[n.ATTR_LEASE_MODE] == "exclusive"
    assert ok.status.status_code is StatusCode.UNSET
    assert failed.status.status_code is StatusCode.ERROR
    assert attributes(failed)[n.ATTR_ERROR_TYPE] == "PoolExhausted"


async def test_no_acquire_span_by_default(otel: Otel) -> None:
    async with Pool(ScriptedAdapter(), settings(), name="asr") as pool:
        with otel.tracer.start_as_current_span("call"):
            for _ in range(5):
                async with pool.acquire():
                    pass
    assert not otel.spans(n.SPAN_ACQUIRE)
    (call,) = otel.spans("call")
    assert not call.events  # the uncontended path adds nothing to the caller's span


async def test_alarm_counter_span_event_and_a_single_log(
    otel: Otel, probe: Probe, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="voicepool")
    s = settings(alarm_window=0.3, alarm_wait_p95_ms=1.0)
    async with Pool(ScriptedAdapter(), s, name="asr") as pool:
        release = asyncio.Event()
        holder = asyncio.create_task(_hold_until(pool, release))
        await settle(lambda: pool.stats().in_use == 1)
        waiter = asyncio.create_task(_acquire(pool))
        await settle(lambda: pool.stats().waiters == 1)
        await asyncio.sleep(0.02)  # the wait the alarm must see
        release.set()
        await asyncio.gather(holder, waiter)
        await asyncio.wait_for(_alarm(probe, firing=True), 10)
        await asyncio.wait_for(_alarm(probe, firing=False), 10)  # next window: no waits
    assert otel.value(n.ALARM, **{n.ATTR_POOL_NAME.replace(".", "__"): "asr"}) == 1
    assert otel.reader.get_metrics_data() is not None
    fired, cleared = otel.spans(n.SPAN_ALARM)[:2]
    assert fired.parent is None
    (event,) = events(fired, n.EVENT_ALARM)
    assert event.attributes[n.ATTR_ALARM_FIRING] is True
    assert event.attributes[n.ATTR_ALARM_P95] >= 0.015
    assert event.attributes[n.ATTR_ALARM_THRESHOLD] == pytest.approx(0.001)
    assert event.attributes[n.ATTR_ALARM_WINDOW] == pytest.approx(0.3)
    assert events(cleared, n.EVENT_ALARM_CLEARED)
    alarm_logs = [r for r in caplog.records if "p95" in r.getMessage()]
    assert len(alarm_logs) == 2  # the engine's warning and its recovery: nothing logged twice
    assert all(r.name == "voicepool.pool" for r in alarm_logs)
    assert all(getattr(r, "voicepool.pool.name") == "asr" for r in alarm_logs)


async def _acquire(pool: Pool[FakeConn]) -> None:
    async with pool.acquire():
        pass


async def _alarm(probe: Probe, *, firing: bool) -> None:
    while not any(f is firing for _, f in probe.alarms):
        probe.alarm.clear()
        await probe.alarm.wait()


class SpySpan(NonRecordingSpan):
    """A non-recording span that remembers every mutation attempted on it."""

    def __init__(self) -> None:
        super().__init__(trace.INVALID_SPAN_CONTEXT)
        self.calls: list[str] = []

    def add_event(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append("add_event")

    def record_exception(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append("record_exception")

    def set_attribute(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append("set_attribute")

    def set_attributes(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append("set_attributes")

    def set_status(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append("set_status")


async def test_nothing_is_added_to_a_non_recording_span(otel: Otel) -> None:
    spy = SpySpan()
    adapter = ScriptedAdapter()
    async with Pool(adapter, settings(), name="asr") as pool:
        with trace.use_span(spy, end_on_exit=False):
            async with pool.acquire():
                with pytest.raises(PoolExhausted):
                    async with pool.acquire(timeout=0.01):
                        pass
            release = asyncio.Event()
            holder = asyncio.create_task(_hold_until(pool, release))
            await settle(lambda: pool.stats().in_use == 1)
            waiter = asyncio.create_task(_acquire(pool))  # inherits the spy as current span
            await settle(lambda: pool.stats().waiters == 1)
            release.set()
            await asyncio.gather(holder, waiter)
        adapter.fail_all_connects = auth_error(adapter)
        async with pool.acquire() as lease:
            lease.discard()
        await settle(lambda: pool.stats().state.value == "unavailable", rounds=2000)
        with trace.use_span(spy, end_on_exit=False), pytest.raises(PoolUnavailable):
            async with pool.acquire():
                pass
    assert pool.stats().exhausted == 2
    assert spy.calls == []


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, tuple | list):
        for item in value:
            yield from _strings(item)


async def test_secrets_never_reach_attributes(
    otel: Otel, probe: Probe, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="voicepool")
    adapter = ScriptedAdapter(api_key="sk-live-SECRET-8d1f")
    secret = adapter.api_key.get_secret_value()
    s = settings(max_size=2, trace_acquire=True, ping_interval=0.05, ping_timeout=0.05)
    async with Pool(adapter, s, name="asr") as pool:
        with otel.tracer.start_as_current_span("call", record_exception=False):
            async with pool.acquire(), pool.acquire():
                with pytest.raises(PoolExhausted):
                    async with pool.acquire(timeout=0.01):
                        pass
            await asyncio.wait_for(probe.pinged.wait(), 10)
            adapter.ping_error = ConnectError(f"ping refused for {adapter.api_key}")
            adapter.fail_all_connects = auth_error(adapter)
            await wait_until(lambda: pool.stats().state.value == "unavailable", timeout=5)
            with pytest.raises(PoolUnavailable):
                async with pool.acquire():
                    pass
        pool.maintain()
    found: list[str] = []
    for span in otel.spans():
        found.extend(_strings(list((span.attributes or {}).values())))
        found.append(span.status.description or "")
        for event in span.events:
            found.extend(_strings(list((event.attributes or {}).values())))
    for metric in otel.metrics().values():
        for point in metric.data.data_points:
            found.extend(_strings(list((point.attributes or {}).values())))
    found.extend(r.getMessage() for r in caplog.records)
    assert len(found) > 50
    assert not [text for text in found if secret in text]


async def test_waiter_failed_by_an_opening_circuit_gets_the_unavailable_event(otel: Otel) -> None:
    adapter = ScriptedAdapter()
    async with Pool(adapter, settings(), name="asr") as pool:
        with otel.tracer.start_as_current_span("call", record_exception=False):
            async with pool.acquire() as lease:
                waiter = asyncio.create_task(_acquire(pool))  # inherits the "call" span
                await settle(lambda: pool.stats().waiters == 1)
                adapter.fail_all_connects = auth_error(adapter)
                lease.discard()
            with pytest.raises(PoolUnavailable):
                await waiter
    (span,) = otel.spans("call")
    names = [e.name for e in span.events]
    assert names == [n.EVENT_EXHAUSTED, n.EVENT_UNAVAILABLE]


async def test_a_connect_cancelled_by_close_still_ends_its_span(otel: Otel) -> None:
    adapter = ScriptedAdapter(connect_delay=30.0)
    pool = Pool(adapter, settings(min_size=0), name="asr")
    await pool.start()
    task = asyncio.create_task(_acquire(pool))
    await settle(lambda: pool.stats().opening == 1)
    await pool.aclose(0)
    with pytest.raises(VoicepoolError):
        await task
    (connect,) = otel.spans(n.SPAN_CONNECT)
    assert attributes(connect)[n.ATTR_CONNECT_CANCELLED] is True

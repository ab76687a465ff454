"""Per-test SDK providers with in-memory readers, and helpers to read what they caught."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ExponentialHistogramDataPoint,
    HistogramDataPoint,
    InMemoryMetricReader,
    Metric,
    NumberDataPoint,
)
from opentelemetry.sdk.trace import Event, ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Tracer
from opentelemetry.util.types import AttributeValue

from tests.telemetry.fakes import Probe
from voicepool import telemetry
from voicepool._engine.observer import add_observer_factory, remove_observer_factory

DataPoint = NumberDataPoint | HistogramDataPoint | ExponentialHistogramDataPoint


def attributes(
    item: ReadableSpan
    | Event
    | NumberDataPoint
    | HistogramDataPoint
    | ExponentialHistogramDataPoint,
) -> Mapping[str, AttributeValue]:
    """``item.attributes``, asserted present: the SDK types them optional, and every span, event
    and point the pool records carries some."""
    found = item.attributes
    assert found is not None, item
    return found


@dataclass
class Otel:
    reader: InMemoryMetricReader
    exporter: InMemorySpanExporter
    meter_provider: MeterProvider
    tracer_provider: TracerProvider
    inst: telemetry.Instrumentation
    tracer: Tracer  # for the test's own "caller" spans

    def metrics(self) -> dict[str, Metric]:
        data = self.reader.get_metrics_data()
        found: dict[str, Metric] = {}
        if data is None:
            return found
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                if sm.scope.name == "voicepool":
                    for metric in sm.metrics:
                        found[metric.name] = metric
        return found

    def points(self, name: str, metrics: dict[str, Metric] | None = None) -> list[Any]:
        metric = (metrics if metrics is not None else self.metrics()).get(name)
        return [] if metric is None else list(metric.data.data_points)

    def value(self, name: str, metrics: dict[str, Metric] | None = None, /, **attrs: Any) -> float:
        """The value of the one point of ``name`` whose attributes include ``attrs`` (``metrics``
        is positional-only so that any attribute name can be passed as a keyword)."""
        want = {k.replace("__", "."): v for k, v in attrs.items()}
        hits = [
            p
            for p in self.points(name, metrics)
            if all(p.attributes.get(k) == v for k, v in want.items())
        ]
        assert len(hits) == 1, (name, want, [dict(p.attributes) for p in self.points(name)])
        point = hits[0]
        assert isinstance(point, NumberDataPoint)
        return point.value

    def histogram(self, name: str, pool: str = "asr", **attrs: Any) -> HistogramDataPoint:
        """The point of histogram ``name`` whose attributes are exactly pool name + ``attrs``."""
        want = {"voicepool.pool.name": pool, **{k.replace("__", "."): v for k, v in attrs.items()}}
        hits = [p for p in self.points(name) if dict(p.attributes) == want]
        assert len(hits) == 1, (name, want, [dict(p.attributes) for p in self.points(name)])
        assert isinstance(hits[0], HistogramDataPoint)
        return hits[0]

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if name is None or s.name == name]


@pytest.fixture
def otel() -> Iterator[Otel]:
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    inst = telemetry.instrument(meter_provider=meter_provider, tracer_provider=tracer_provider)
    try:
        yield Otel(
            reader,
            exporter,
            meter_provider,
            tracer_provider,
            inst,
            tracer_provider.get_tracer("tests.caller"),
        )
    finally:
        inst.remove()
        tracer_provider.shutdown()
        meter_provider.shutdown()


@pytest.fixture
def probe() -> Iterator[Probe]:
    found = Probe()

    def factory(pool: Any) -> Probe:
        return found

    add_observer_factory(factory)
    try:
        yield found
    finally:
        remove_observer_factory(factory)

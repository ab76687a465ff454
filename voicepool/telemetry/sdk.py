"""Install OpenTelemetry SDK providers in one call (needs the ``otel`` extra: opentelemetry-sdk).

For applications, examples and benchmarks that do not configure the SDK themselves::

    from voicepool.telemetry.sdk import install_sdk

    otel = install_sdk(span_exporter=ConsoleSpanExporter(), metric_readers=[reader])
    ...
    otel.shutdown()

Library code never imports this module: voicepool itself depends on opentelemetry-api only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

from voicepool.telemetry import Instrumentation, enable_default, instrument

__all__ = ["NullSpanExporter", "SdkTelemetry", "install_sdk"]


class NullSpanExporter(SpanExporter):
    """Accepts and drops every span: the SDK's full span pipeline, with no output."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


@dataclass
class SdkTelemetry:
    """What :func:`install_sdk` built. ``shutdown()`` flushes and stops both providers."""

    meter_provider: MeterProvider
    tracer_provider: TracerProvider
    instrumentation: Instrumentation | None

    def shutdown(self) -> None:
        """Flush pending spans and metrics, then stop; idempotent, never raises."""
        if self.instrumentation is not None:
            self.instrumentation.remove()
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def install_sdk(
    *,
    span_exporter: SpanExporter | None = None,
    metric_readers: Sequence[MetricReader] = (),
    service_name: str = "voicepool-worker",
    set_global: bool = True,
    batch: bool = True,
) -> SdkTelemetry:
    """Build an SDK MeterProvider and TracerProvider, and make voicepool report through them.

    ``span_exporter`` defaults to :class:`NullSpanExporter` (spans are built, processed and
    dropped, as they cost in production); ``batch`` chooses BatchSpanProcessor (production) over
    SimpleSpanProcessor (tests, examples that print). With ``set_global`` (the default) the
    providers become the process-wide ones and the default instrumentation is enabled, so every
    pool, even one created earlier, reports through them. OpenTelemetry sets global providers once
    per process: when they were already set, or with ``set_global=False``, the providers stay
    private and a dedicated :func:`~voicepool.telemetry.instrument` handle (removed by
    :meth:`SdkTelemetry.shutdown`) makes pools created from now on report through them.
    """
    resource = Resource.create({"service.name": service_name})
    meter_provider = MeterProvider(metric_readers=list(metric_readers), resource=resource)
    tracer_provider = TracerProvider(resource=resource)
    exporter = span_exporter if span_exporter is not None else NullSpanExporter()
    processor = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
    tracer_provider.add_span_processor(processor)
    if set_global:
        metrics.set_meter_provider(meter_provider)
        trace.set_tracer_provider(tracer_provider)
        if (
            metrics.get_meter_provider() is meter_provider
            and trace.get_tracer_provider() is tracer_provider
        ):
            enable_default()
            return SdkTelemetry(meter_provider, tracer_provider, None)
        # Global providers were set before (OpenTelemetry has logged a warning): these stay
        # private, and a dedicated instrumentation makes new pools report through them anyway.
    inst = instrument(meter_provider=meter_provider, tracer_provider=tracer_provider)
    return SdkTelemetry(meter_provider, tracer_provider, inst)

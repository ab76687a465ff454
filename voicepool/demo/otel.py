"""A console exporter for the demo: one line per OpenTelemetry span event (``otel`` extra).

voicepool adds ``voicepool.pool.exhausted`` / ``.timeout`` / ``.unavailable`` events to the
caller's current span, and ``voicepool.pool.alarm`` to its ``voicepool.alarm`` spans. The SDK's
``ConsoleSpanExporter`` prints each span as a page of JSON; this exporter prints only the events,
one short line each, which is what ``voicepool demo --exhaust`` wants to show.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from voicepool.telemetry import names

__all__ = ["SpanEventPrinter"]

# (attribute, label, scale to display units, unit) in the order they are printed.
_SHOWN: tuple[tuple[str, str, float, str], ...] = (
    (names.ATTR_POOL_NAME, "pool", 1.0, ""),
    (names.ATTR_SIZE, "size", 1.0, ""),
    (names.ATTR_MAX_SIZE, "max", 1.0, ""),
    (names.ATTR_IN_USE, "in_use", 1.0, ""),
    (names.ATTR_WAITERS, "waiters", 1.0, ""),
    (names.ATTR_WAIT_TIME, "waited", 1e3, " ms"),
    (names.ATTR_ALARM_P95, "wait_p95", 1e3, " ms"),
    (names.ATTR_ALARM_THRESHOLD, "threshold", 1e3, " ms"),
    (names.ATTR_ALARM_WINDOW, "window", 1.0, " s"),
)


class SpanEventPrinter(SpanExporter):
    """Writes ``otel <event> on <span>: pool=... waiters=... waited=... ms`` for every span event.

    ``write`` gets one line (no newline) per event, at most ``limit`` of them; ``counts`` has
    every event by name. Thread-safe enough for SimpleSpanProcessor (it runs in the thread that
    ends the span: the event loop's).
    """

    def __init__(self, write: Callable[[str], None], *, limit: int = 12) -> None:
        self._write = write
        self.limit = limit
        self.counts: Counter[str] = Counter()
        self.printed = 0

    @property
    def suppressed(self) -> int:
        """Events counted but not printed (above ``limit``)."""
        return sum(self.counts.values()) - self.printed

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        for span in spans:
            for event in span.events:
                self.counts[event.name] += 1
                if self.printed < self.limit:
                    self.printed += 1
                    self._write(format_event(event.name, span.name, event.attributes or {}))
        return SpanExportResult.SUCCESS


def format_event(event: str, span: str, attributes: Mapping[str, Any]) -> str:
    """One line for one span event (never prints attributes it does not know: no secrets)."""
    parts = []
    for key, label, scale, unit in _SHOWN:
        if key in attributes:
            value = attributes[key]
            if isinstance(value, float):
                shown = f"{value * scale:.1f}" if scale != 1.0 else f"{value:g}"
            else:
                shown = str(value)
            parts.append(f"{label}={shown}{unit}")
    return f"otel  {event} on span {span}: {' '.join(parts)}"

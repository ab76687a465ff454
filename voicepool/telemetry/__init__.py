"""OpenTelemetry for every pool: metrics, span events on the caller's span, background spans.

On by default: ``import voicepool`` registers an instrumentation that uses the *global* meter and
tracer providers. Without an SDK those are no-ops (cheap); once the application installs SDK
providers (``metrics.set_meter_provider`` / ``trace.set_tracer_provider``, even after pools were
created) the same instruments and spans start reporting. Library code depends on
``opentelemetry-api`` only.

Cost budget (see DESIGN.md): the uncontended acquire calls no instrument and starts no span.
Gauges and counters are observable instruments that read ``pool.stats()`` when a reader collects;
histograms are recorded on paths that already wait or do I/O, or from the health task's
once-a-second flush; span events are added only when the caller's span is recording.

What is emitted (names in :mod:`voicepool.telemetry.names`):

* metrics, attribute ``voicepool.pool.name``: ``voicepool.connection.count`` (``state`` idle, used,
  opening), ``.max``, ``.idle.min``, ``.pending_requests``, ``.timeouts``, ``.exhausted``,
  ``.unavailable``, ``.acquires``, ``.closed`` (``reason``), ``.create_time``, ``.wait_time``,
  ``.use_time``, ``.wait_time.p95`` (seconds), ``voicepool.ping.duration``, ``voicepool.pool.state``
  (``state``; 1 for the current one: ``unavailable`` means the circuit is open) and the counter
  ``voicepool.alarm``.
* span events on the caller's current span: ``voicepool.pool.exhausted`` (an acquire queued at
  max_size; added when the wait ends, with the wait time, stamped when it began),
  ``voicepool.pool.timeout`` (plus the PoolExhausted recorded as an exception) and
  ``voicepool.pool.unavailable`` (circuit open).
* spans: ``voicepool.connect`` (each handshake; error status on failure), ``voicepool.ping`` (failed
  pings), ``voicepool.retire`` (each retirement, with its reason), ``voicepool.alarm`` (once per
  alarm window while firing, and at recovery, carrying a ``voicepool.pool.alarm`` event) and, with
  ``PoolSettings.trace_acquire``, ``voicepool.acquire``.

The warning logs of the alarm and of the circuit come from the engine (logger ``voicepool.pool``);
this module does not log them again.
"""

from __future__ import annotations

import threading
from types import TracebackType
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics, trace

from voicepool._engine.observer import add_observer_factory, remove_observer_factory
from voicepool._version import __version__
from voicepool.telemetry import names
from voicepool.telemetry._instruments import Instruments, PoolRegistry
from voicepool.telemetry._observer import OtelObserver

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider

    from voicepool.pool import Pool

__all__ = [
    "DEFAULT_HISTOGRAM_BUDGET",
    "Instrumentation",
    "default_instrumentation",
    "disable_default",
    "enable_default",
    "instrument",
    "names",
]

DEFAULT_HISTOGRAM_BUDGET = 1000
"""Values per histogram, pool and flush (about a second) before recording switches to a sample."""


def _version() -> str:
    return __version__


class Instrumentation:
    """One set of instruments and a tracer, attached to every pool created while it is active.

    Made by :func:`instrument`. :meth:`remove` (or leaving ``with``) detaches it: pools created
    afterwards are not observed, and pools already observed stop reporting (their hooks become
    no-ops and the observable callbacks yield nothing). Thread-safe to remove; never raises.
    """

    def __init__(
        self,
        meter_provider: MeterProvider | None = None,
        tracer_provider: TracerProvider | None = None,
        *,
        histogram_budget: int = DEFAULT_HISTOGRAM_BUDGET,
    ) -> None:
        if histogram_budget < 1:
            raise ValueError(f"histogram_budget must be >= 1, got {histogram_budget}")
        mp = meter_provider if meter_provider is not None else metrics.get_meter_provider()
        tp = tracer_provider if tracer_provider is not None else trace.get_tracer_provider()
        version = _version()
        self.registry = PoolRegistry()
        self.instruments = Instruments(mp.get_meter(names.SCOPE, version), self.registry)
        self.tracer = tp.get_tracer(names.SCOPE, version)
        self.histogram_budget = histogram_budget

    def observe(self, pool: Pool[Any]) -> OtelObserver | None:
        """The observer factory: register ``pool`` and return its observer (None once removed)."""
        if not self.registry.active:
            return None
        self.registry.add(pool)
        return OtelObserver(
            pool, self.instruments, self.tracer, self.registry, self.histogram_budget
        )

    @property
    def active(self) -> bool:
        return self.registry.active

    def remove(self) -> None:
        """Stop observing: new pools get no observer, existing observers go quiet. Idempotent."""
        remove_observer_factory(self.observe)
        self.registry.active = False

    def __enter__(self) -> Instrumentation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()


def instrument(
    *,
    meter_provider: MeterProvider | None = None,
    tracer_provider: TracerProvider | None = None,
    histogram_budget: int = DEFAULT_HISTOGRAM_BUDGET,
) -> Instrumentation:
    """Observe every pool created from now on with these providers (default: the global ones).

    Returns a handle; ``handle.remove()`` or ``with instrument(...):`` undoes it. Use one
    instrumentation per MeterProvider: a second one on the same provider shares the instrument
    names, and the SDK keeps only the first one's observable callbacks. The default
    instrumentation (global providers) stays on unless :func:`disable_default` is called.
    Raises ValueError for a ``histogram_budget`` below 1.
    """
    inst = Instrumentation(meter_provider, tracer_provider, histogram_budget=histogram_budget)
    add_observer_factory(inst.observe)
    return inst


_default_lock = threading.Lock()
_default: Instrumentation | None = None
_default_enabled = False


def _default_factory(pool: Pool[Any]) -> OtelObserver | None:
    # Built on first use, so `import voicepool` stays cheap and picks up whatever global
    # providers exist by the time the first pool is created (the API's proxies cover later ones).
    global _default
    inst = _default
    if inst is None:
        with _default_lock:
            if _default is None:
                _default = Instrumentation()
            inst = _default
    return inst.observe(pool)


def enable_default() -> None:
    """Observe new pools through the global providers (done by ``import voicepool``). Idempotent."""
    global _default_enabled
    with _default_lock:
        if _default is not None:
            _default.registry.active = True
        _default_enabled = True
    add_observer_factory(_default_factory)


def disable_default() -> None:
    """Stop the default instrumentation: new pools get no observer from it, existing ones go quiet.

    For benchmarks ("the same pool without telemetry") and applications that call
    :func:`instrument` with their own providers instead. Idempotent; :func:`enable_default`
    undoes it.
    """
    global _default_enabled
    remove_observer_factory(_default_factory)
    with _default_lock:
        if _default is not None:
            _default.registry.active = False
        _default_enabled = False


def default_instrumentation() -> Instrumentation | None:
    """The default (global-provider) instrumentation once a pool has used it, else None."""
    return _default if _default_enabled else None


enable_default()

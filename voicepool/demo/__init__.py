"""What ``voicepool demo`` runs, as a library: emulated services, simulated calls, the report.

* :mod:`voicepool.demo.services`: ``ServiceStack`` (every emulator behind a latency relay) and
  ``spawn_services`` (the same in a child process: ``python -m voicepool.demo.services``).
* :mod:`voicepool.demo.calls`: ``CallSimulation``, calls that connect per call or lease from a
  :class:`~voicepool.PoolManager`, timed per service.
* :mod:`voicepool.demo.report`: the JSON-ready report, the table and the chart.
* :mod:`voicepool.demo.otel`: a console exporter printing span events (``--exhaust``).

This package imports nothing itself, so running its modules with ``python -m`` stays clean.
"""

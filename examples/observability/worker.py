"""A voice-worker stand-in that exports voicepool metrics to Prometheus and traces to console/OTLP.

It starts a line-echo TCP server on 127.0.0.1 (the "provider"), pools connections to it with a
small adapter, and simulates calls in bursts that sometimes exceed the pool: you will see
exhaustion events on the ``call`` spans, timeouts, and the acquire-wait alarm.

    python examples/observability/worker.py --port 9464 --traces console --duration 120
    curl -s 127.0.0.1:9464/metrics | grep voicepool_

Then point Prometheus at it (prometheus.yml here), load alerts.yml as a rule file, and import
grafana-dashboard.json into Grafana. ``--traces otlp`` sends spans to
``OTEL_EXPORTER_OTLP_ENDPOINT`` (default http://127.0.0.1:4318) and needs
``pip install opentelemetry-exporter-otlp-proto-http``.

Requires the ``otel`` extra (opentelemetry-sdk, opentelemetry-exporter-prometheus).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import random
import sys
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SpanExporter
from prometheus_client import start_http_server

from voicepool import Adapter, Pool, PoolExhausted, PoolSettings, PoolUnavailable
from voicepool.telemetry.sdk import install_sdk


@dataclass(eq=False)
class EchoConn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


class EchoAdapter(Adapter[EchoConn]):
    """Pooled TCP connections to the echo "provider"; a PING line is the health check."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port

    async def connect(self) -> EchoConn:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        return EchoConn(reader, writer)

    async def ping(self, conn: EchoConn) -> None:
        await self.request(conn, b"PING")

    async def request(self, conn: EchoConn, line: bytes) -> bytes:
        conn.writer.write(line + b"\n")
        await conn.writer.drain()
        reply = await conn.reader.readline()
        if not reply:
            raise ConnectionResetError("provider closed the connection")
        return reply

    def is_open(self, conn: EchoConn) -> bool:
        return not conn.writer.is_closing()

    async def close(self, conn: EchoConn) -> None:
        conn.writer.close()
        with contextlib.suppress(OSError):
            await conn.writer.wait_closed()

    def describe(self) -> str:
        return f"tcp://{self.host}:{self.port}"


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while line := await reader.readline():
            writer.write(line)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def span_exporter(kind: str) -> SpanExporter | None:
    if kind == "console":
        return ConsoleSpanExporter(out=sys.stderr)
    if kind == "otlp":
        try:
            otlp = importlib.import_module("opentelemetry.exporter.otlp.proto.http.trace_exporter")
        except ImportError:
            sys.exit("--traces otlp needs: pip install opentelemetry-exporter-otlp-proto-http")
        exporter: SpanExporter = otlp.OTLPSpanExporter()  # OTEL_EXPORTER_OTLP_* env vars apply
        return exporter
    return None


async def call(pool: Pool[EchoConn], adapter: EchoAdapter, n: int) -> str:
    """One simulated call turn: borrow a connection, talk, hold it a while."""
    tracer = trace.get_tracer("examples.worker")
    with tracer.start_as_current_span("call", attributes={"call.id": n}) as span:
        try:
            async with pool.acquire() as lease:
                await adapter.request(lease.conn, f"turn {n}".encode())
                await asyncio.sleep(random.uniform(0.05, 0.4))
            return "ok"
        except PoolExhausted:
            span.set_status(trace.Status(trace.StatusCode.ERROR, "pool exhausted"))
            return "timeout"
        except PoolUnavailable:
            return "unavailable"


async def run(args: argparse.Namespace) -> None:
    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader = PrometheusMetricReader()
    http, http_thread = start_http_server(args.port, addr="127.0.0.1")
    print(f"metrics on http://127.0.0.1:{http.server_port}/metrics", flush=True)
    exporter = span_exporter(args.traces)
    otel = install_sdk(
        span_exporter=exporter, metric_readers=[reader], service_name="voicepool-example"
    )
    adapter = EchoAdapter("127.0.0.1", port)
    settings = PoolSettings(
        min_size=2,
        max_size=4,
        acquire_timeout=0.3,
        ping_interval=5.0,
        ping_timeout=1.0,
        alarm_window=args.alarm_window,
        alarm_wait_p95_ms=5.0,
    )
    results: dict[str, int] = {}
    try:
        async with Pool(adapter, settings, name="echo") as pool:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + args.duration
            tasks: set[asyncio.Task[str]] = set()
            n = 0
            while loop.time() < deadline:
                for _ in range(random.randint(0, 3)):  # bursts sometimes exceed max_size
                    n += 1
                    task = asyncio.create_task(call(pool, adapter, n))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                await asyncio.sleep(0.1)
            for outcome in await asyncio.gather(*tasks):
                results[outcome] = results.get(outcome, 0) + 1
            print(f"calls: {n}, stats: {pool.stats()}", flush=True)
    finally:
        otel.shutdown()
        http.shutdown()
        http_thread.join(5)
        server.close()
        await server.wait_closed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9464, help="Prometheus port (0: any free)")
    parser.add_argument("--traces", choices=("console", "otlp", "none"), default="console")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds to run")
    parser.add_argument("--alarm-window", type=float, default=5.0, help="p95 alarm window, s")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()

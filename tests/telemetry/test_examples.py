"""The alert rules and the dashboard use only series the library really emits through Prometheus.

A scripted scenario drives every instrument (waits, exhaustion, a timeout, the alarm, a failed and
a good ping, retirements, an open circuit) into an OpenTelemetry PrometheusMetricReader with a
private registry; the exposition text it produces is what Prometheus would scrape. Then the example
worker runs for real and is scraped over 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.telemetry.fakes import Probe, ScriptedAdapter, auth_error, settle
from voicepool import Pool, PoolExhausted, PoolSettings, PoolUnavailable, telemetry

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "observability"

Series = list[tuple[str, dict[str, str]]]  # (sample name, labels)


async def _scenario(probe: Probe) -> str:
    registry = CollectorRegistry()
    reader = PrometheusMetricReader(registry=registry)
    provider = MeterProvider(metric_readers=[reader])
    try:
        with telemetry.instrument(meter_provider=provider):
            adapter = ScriptedAdapter()
            s = PoolSettings(
                min_size=1,
                max_size=1,
                alarm_window=0.2,
                alarm_wait_p95_ms=1.0,
                ping_interval=0.05,
                ping_timeout=0.05,
            )
            async with Pool(adapter, s, name="asr") as pool:
                release = asyncio.Event()

                async def hold() -> None:
                    async with pool.acquire():
                        await release.wait()

                holder = asyncio.create_task(hold())
                await settle(lambda: pool.stats().in_use == 1)
                with pytest.raises(PoolExhausted):
                    async with pool.acquire(timeout=0.01):
                        pass
                release.set()
                await holder
                await asyncio.wait_for(probe.alarm.wait(), 10)
                await asyncio.wait_for(probe.pinged.wait(), 10)
                adapter.ping_error = ConnectionResetError("reset")
                await adapter.wait_for(lambda: len(adapter.closed) >= 1)
                adapter.ping_error = None
                pool.maintain()
            dead = ScriptedAdapter()
            dead.fail_all_connects = auth_error(dead)
            broken = Pool(dead, PoolSettings(min_size=1, max_size=1), name="tts")
            await broken.start(require_ready=False)
            with pytest.raises(PoolUnavailable):
                async with broken.acquire():
                    pass
            text = generate_latest(registry).decode()
            await broken.aclose()
            return text
    finally:
        provider.shutdown()


def _series(text: str) -> Series:
    return [
        (sample.name, dict(sample.labels))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


@pytest.fixture
async def exposed(probe: Probe) -> Series:
    return _series(await _scenario(probe))


_SELECTOR = re.compile(r"\b(voicepool_[a-z0-9_]+)\b(?:\{([^}]*)\})?")
_MATCHER = re.compile(r'([a-z_]+)\s*(=~|!=|!~|=)\s*"([^"]*)"')


def _check_expr(expr: str, exposed: Series) -> list[str]:
    """Every metric an expression selects exists, with its exact-match labels; returns names."""
    label_names = {label for _, labels in exposed for label in labels}
    names = {name for name, _ in exposed}
    used = []
    for name, matchers in _SELECTOR.findall(expr):
        if name in label_names:
            continue  # a label (voicepool_pool_name in `by (...)`), not a metric
        assert name in names, f"{name} is not emitted; expression: {expr}"
        used.append(name)
        for label, op, value in _MATCHER.findall(matchers or ""):
            if op != "=":
                continue
            assert any(n == name and labels.get(label, "") == value for n, labels in exposed), (
                f"no {name} series with {label}={value!r}"
            )
    return used


def test_scenario_emits_every_metric(exposed: Series) -> None:
    names = {name for name, _ in exposed}
    for base in (
        "voicepool_connection_count",
        "voicepool_connection_max",
        "voicepool_connection_idle_min",
        "voicepool_connection_pending_requests",
        "voicepool_connection_timeouts_total",
        "voicepool_connection_exhausted_total",
        "voicepool_connection_unavailable_total",
        "voicepool_connection_acquires_total",
        "voicepool_connection_closed_total",
        "voicepool_connection_wait_time_p95_seconds",
        "voicepool_pool_state",
        "voicepool_alarm_total",
        "voicepool_connection_create_time_seconds_bucket",
        "voicepool_connection_wait_time_seconds_bucket",
        "voicepool_connection_use_time_seconds_count",
        "voicepool_ping_duration_seconds_sum",
    ):
        assert base in names, base
    for name, labels in exposed:
        if name.startswith("voicepool_"):
            assert labels["voicepool_pool_name"] in {"asr", "tts"}, (name, labels)


def test_alert_rules_are_valid_and_use_emitted_metrics(exposed: Series) -> None:
    doc = yaml.safe_load((EXAMPLE / "alerts.yml").read_text())
    rules = [rule for group in doc["groups"] for rule in group["rules"]]
    assert {g["name"] for g in doc["groups"]} == {"voicepool"}
    alerts = {rule["alert"] for rule in rules}
    assert {
        "VoicepoolPoolExhausted",
        "VoicepoolAcquireTimeouts",
        "VoicepoolAcquireWaitP95High",
        "VoicepoolCircuitOpen",
    } <= alerts
    used: set[str] = set()
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", rule["alert"])
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"]
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["for"]
        expr = rule["expr"]
        assert expr.count("(") == expr.count(")"), rule["alert"]
        found = _check_expr(expr, exposed)
        assert found, f"{rule['alert']} uses no voicepool metric"
        used.update(found)
    assert {
        "voicepool_connection_exhausted_total",
        "voicepool_connection_timeouts_total",
        "voicepool_alarm_total",
        "voicepool_pool_state",
    } <= used


def _targets(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]


def test_dashboard_is_valid_and_uses_emitted_metrics(exposed: Series) -> None:
    dashboard = json.loads((EXAMPLE / "grafana-dashboard.json").read_text())
    assert dashboard["uid"] == "voicepool-pools"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    used: set[str] = set()
    for expr in _targets(dashboard):
        assert expr.count("(") == expr.count(")"), expr
        used.update(_check_expr(expr, exposed))
    metrics = {name for name, _ in exposed if name.startswith("voicepool_")}
    families = {re.sub(r"_(bucket|count|sum)$", "", name) for name in metrics}
    charted = {re.sub(r"_(bucket|count|sum)$", "", name) for name in used}
    assert families - charted == set(), "metrics missing from the dashboard"


def test_example_worker_serves_prometheus_metrics() -> None:
    """Run the example for real: scrape its endpoint on 127.0.0.1 while calls are simulated."""
    proc = subprocess.Popen(
        [
            sys.executable,
            str(EXAMPLE / "worker.py"),
            "--port",
            "0",
            "--traces",
            "console",
            "--duration",
            "2.5",
            "--alarm-window",
            "0.5",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:\d+/metrics", first)
        assert match, first
        names: set[str] = set()
        for _ in range(40):  # bounded: the worker reports within its first second
            with urllib.request.urlopen(match.group(0), timeout=5) as resp:
                text = resp.read().decode()
            names = {name for name, _ in _series(text)}
            if "voicepool_connection_create_time_seconds_bucket" in names:
                break
            time.sleep(0.1)  # polling another process's endpoint: there is no event to await
        assert "voicepool_connection_count" in names
        assert "voicepool_connection_create_time_seconds_bucket" in names
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "calls:" in out
        assert '"name": "call"' in err  # ConsoleSpanExporter printed the call spans
        assert "voicepool.connect" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

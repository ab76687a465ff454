"""The demo's building blocks without processes: settings, report, table, console, span printer."""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import pytest

from voicepool.cli._output import Console
from voicepool.cli.demo import demo_settings
from voicepool.demo.calls import SERVICES, Mode, RunResult, ServiceSamples
from voicepool.demo.otel import format_event
from voicepool.demo.report import build_report, percentile, render_table, summary
from voicepool.demo.services import Endpoints
from voicepool.errors import ConfigError
from voicepool.telemetry import names

ENDPOINTS = Endpoints(
    rtt=0.04,
    ca_file="/nonexistent/ca.pem",
    api_key="unit-test-key",
    asr_url="wss://127.0.0.1:1",
    tts_url="wss://127.0.0.1:2",
    llm_url="https://127.0.0.1:3",
    crm_url="https://127.0.0.1:4",
    sip_registrar="sip:127.0.0.1:5",
    sip_aor="sip:demo@127.0.0.1",
    sip_password="unit-sip-password",
)


@pytest.fixture(autouse=True)
def _no_voicepool_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.upper().startswith("VOICEPOOL_"):
            monkeypatch.delenv(name)


def test_demo_settings_from_the_bundled_config() -> None:
    settings = demo_settings(ENDPOINTS, calls=7, exhaust=False)
    assert set(settings.pools) == set(SERVICES)
    assert settings.config is not None
    assert settings.config.name == "demo.toml"
    asr = settings.pools["asr"]
    assert asr.adapter == "deepgram"
    assert asr.settings.concurrency == 7
    assert getattr(asr.options, "url", None) == "wss://127.0.0.1:1"
    assert settings.pools["sip"].required is False
    assert "unit-test-key" not in repr(settings)


def test_demo_settings_exhaust_shrinks_tts() -> None:
    tts = demo_settings(ENDPOINTS, calls=20, exhaust=True).pools["tts"].settings
    assert (tts.min_size, tts.max_size, tts.max_streams) == (1, 1, 5)
    assert tts.alarm_window == 0.5


def test_demo_settings_without_sip() -> None:
    assert "sip" not in demo_settings(ENDPOINTS, calls=2, exhaust=False, sip=False).pools


def test_demo_refuses_pools_added_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOICEPOOL_POOLS__EXTRA__ADAPTER", "websocket")
    monkeypatch.setenv("VOICEPOOL_POOLS__EXTRA__OPTIONS__URL", "wss://example.com")
    with pytest.raises(ConfigError, match=r"bundled pools only.*\['extra'\]"):
        demo_settings(ENDPOINTS, calls=2, exhaust=False)


def test_demo_refuses_non_local_endpoints() -> None:
    remote = dataclasses.replace(ENDPOINTS, llm_url="https://api.openai.com")
    with pytest.raises(ConfigError, match=r"pools.llm.options.base_url: .*'api.openai.com'"):
        demo_settings(remote, calls=2, exhaust=False)


def test_endpoints_round_trip_json() -> None:
    assert Endpoints.from_json(ENDPOINTS.to_json()) == ENDPOINTS
    with pytest.raises(ValueError, match="not an endpoints object"):
        Endpoints.from_json("[1, 2]")


def test_percentiles_nearest_rank() -> None:
    assert percentile([], 0.5) is None
    assert percentile([3.0], 0.99) == 3.0
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.95) == 95.0
    assert percentile(values, 0.99) == 99.0
    assert summary([0.001, 0.002], p99=True) == {
        "n": 2, "p50": 1.0, "p95": 2.0, "p99": 2.0, "max": 2.0,
    }  # fmt: skip


def _run(mode: Mode, first: float, later: float) -> RunResult:
    samples = {
        s: ServiceSamples(
            connect=[0.08] if mode is Mode.PER_CALL and s != "crm" else [],
            first=[first, first],
            later=[later] if s != "sip" else [],
            acquire=[1e-5, 2e-5] if mode is Mode.POOLED else [],
        )
        for s in SERVICES
    }
    run = RunResult(mode, 2, 2, samples, [first * 4] * 2, [later * 4] * 2, completed=2)
    return run


def _report(**extra: Any) -> dict[str, Any]:
    return build_report(
        settings={"calls": 2, "turns": 2, "rtt_ms": 40.0, "exhaust": False},
        pools={s: {"adapter": s} for s in SERVICES},
        skipped={"sip": "pjsua2 unavailable: not installed"},
        per_call=_run(Mode.PER_CALL, 0.160, 0.040),
        pooled=_run(Mode.POOLED, 0.041, 0.040),
        extra=extra,
    )


def test_report_and_table() -> None:
    report = _report(version="x")
    asr = report["services"]["asr"]
    assert asr["handshake_ms"] == {"n": 1, "p50": 80.0, "p95": 80.0, "max": 80.0, "derived": False}
    assert asr["first_turn_saved_ms"] == pytest.approx(119.0)
    assert report["services"]["crm"]["handshake_ms"]["derived"] is True
    assert report["services"]["crm"]["handshake_ms"]["p50"] == pytest.approx(120.0)
    assert report["services"]["sip"] == {
        "status": "skipped", "reason": "pjsua2 unavailable: not installed", "adapter": "sip",
    }  # fmt: skip
    assert report["version"] == "x"
    lines = render_table(report)
    assert all(len(line) <= 100 for line in lines)
    asr_row = next(line for line in lines if line.startswith("asr "))
    assert asr_row.split() == [
        "asr", "80.0", "|", "160", "41.0", "119", "|", "40.0", "40.0", "|",
        "0.010", "0.020", "0.020", "|", "0",
    ]  # fmt: skip
    assert any(line.startswith("crm") and "~120" in line for line in lines)
    assert any("pjsua2 unavailable" in line for line in lines)
    assert any("640 ms   pooled    164 ms   (476 ms faster, 3.9x)" in line for line in lines)


def test_console_keeps_the_status_line_below_printed_lines() -> None:
    stream = io.StringIO()
    console = Console(stream, live=True)
    console.status("running 1/2")
    console.line("a log line")
    console.clear_status()
    assert stream.getvalue() == (
        "\r\x1b[Krunning 1/2" + "\r\x1b[K" + "a log line\n" + "running 1/2" + "\r\x1b[K"
    )
    quiet = io.StringIO()
    plain = Console(quiet, live=False)
    plain.status("dropped")
    plain.line("kept")
    assert quiet.getvalue() == "kept\n"


def test_span_event_line_shows_known_attributes_only() -> None:
    line = format_event(
        names.EVENT_EXHAUSTED,
        "call",
        {
            names.ATTR_POOL_NAME: "tts",
            names.ATTR_WAITERS: 3,
            names.ATTR_WAIT_TIME: 0.0456,
            "secret.thing": "sk-should-not-print",
        },
    )
    assert line == "otel  voicepool.pool.exhausted on span call: pool=tts waiters=3 waited=45.6 ms"


def test_bundled_config_is_package_data() -> None:
    import tomllib
    from pathlib import Path

    from voicepool.cli.demo import bundled_config

    config = tomllib.loads(bundled_config().read_text())
    assert set(config["pools"]) == set(SERVICES)
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert "*.toml" in pyproject["tool"]["setuptools"]["package-data"]["voicepool.demo"]

"""``voicepool demo`` end to end: emulators, a PoolManager from the bundled config, both runs.

Each test runs the real command (a child process, which starts its own emulator child) and reads
its ``--json`` report. Timing assertions compare medians measured in the same run, with margins:
a cold connection at 20 ms RTT costs at least two round trips more than a warm one.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.cli.conftest import assert_clean, run_cli
from voicepool.cli import main
from voicepool.demo.calls import SERVICES
from voicepool.demo.report import chart_available

ARGS = ("demo", "--calls", "4", "--turns", "2", "--rtt", "20", "--json")


async def test_pooled_first_turn_beats_connecting_per_call(tmp_path: Path) -> None:
    chart = tmp_path / "chart.png"
    result = await run_cli(*ARGS, "--chart", str(chart))
    assert result.code == 0, result.err[-3000:]
    assert_clean(result)
    report = result.json()
    assert report["settings"] == {"calls": 4, "turns": 2, "rtt_ms": 20.0, "exhaust": False}
    assert list(report["services"]) == list(SERVICES)
    ran = {n: s for n, s in report["services"].items() if s["status"] == "ok"}
    assert set(ran) >= {"asr", "crm", "llm", "tts"}  # SIP may be skipped without pjsua2
    for name, svc in report["services"].items():
        if svc["status"] == "skipped":
            assert name == "sip"
            assert "pjsua2" in svc["reason"] or "unavailable" in svc["reason"]
    for name, svc in ran.items():
        per_call = svc["per_call"]["first_turn_ms"]["p50"]
        pooled = svc["pooled"]["first_turn_ms"]["p50"]
        # A handshake is >= 2 round trips (40 ms here): the pooled first turn must not pay it.
        assert pooled < per_call, (name, pooled, per_call)
        assert per_call - pooled > 20, (name, pooled, per_call)
        assert svc["pooled"]["exhausted"] == 0, name
        assert svc["pooled"]["timeouts"] == 0, name
        assert svc["handshake_ms"]["p50"] > 20, name
        wait = svc["pooled"]["acquire_wait_ms"]
        assert wait["n"] >= 4
        assert wait["p50"] < 5, (name, wait)  # warm pools: no acquire waits for a connection
        if name != "sip":
            assert svc["pooled"]["later_turn_ms"]["n"] == 4, name  # 4 calls x 1 later turn
    assert ran.get("crm", {}).get("handshake_ms", {}).get("derived") is True
    for run in ("per_call", "pooled"):
        assert report["runs"][run]["completed"] == 4
        assert report["runs"][run]["failed"] == 0
        assert report["runs"][run]["turns"] == 8
    first = report["runs"]
    assert (
        first["pooled"]["response_ms"]["first_turn"]["p50"]
        < first["per_call"]["response_ms"]["first_turn"]["p50"]
    )
    assert report["exhaust"] is None
    assert report["telemetry"] is None
    # The human output went to stderr (stdout is the JSON), table included.
    assert "first turn, p50 (ms)" in result.err
    assert "connecting per call  4/4 calls" in result.err
    if chart_available():
        assert report["chart"] == str(chart)
        assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert report["chart"] is None
        assert "pip install 'voicepool[chart]'" in result.err


async def test_exhaust_shows_exhaustion_span_events_and_the_alarm() -> None:
    result = await run_cli(*ARGS, "--exhaust", "--no-chart")
    assert result.code == 0, result.err[-3000:]
    assert_clean(result)
    report = result.json()
    tts = report["services"]["tts"]
    assert tts["max_size"] == 1
    assert tts["pooled"]["exhausted"] > 0
    assert tts["pooled"]["timeouts"] == 0
    assert tts["pooled"]["acquire_wait_ms"]["p95"] > 5
    assert report["exhaust"]["pool"] == "tts"
    events = report["telemetry"]["span_events"]
    assert events["voicepool.pool.exhausted"] > 0
    # The console exporter printed them, and the engine's p95 alarm fired (log + span event).
    assert "otel  voicepool.pool.exhausted on span voicepool.demo.call: pool=tts" in result.err
    assert "acquire-wait p95" in result.err
    assert events.get("voicepool.pool.alarm", 0) >= 1
    for name in ("asr", "crm", "llm"):
        assert report["services"][name]["pooled"]["exhausted"] == 0


async def test_sip_is_skipped_with_the_reason_when_pjsua2_cannot_load() -> None:
    # A None entry in sys.modules makes "import pjsua2" fail, as on a machine without the wheel.
    result = await run_cli(
        "demo", "--calls", "2", "--turns", "1", "--rtt", "10", "--json", "--no-chart",
        prelude="import sys; sys.modules['pjsua2'] = None",
    )  # fmt: skip
    assert result.code == 0, result.err[-3000:]
    assert_clean(result)
    report = result.json()
    sip = report["services"]["sip"]
    assert sip["status"] == "skipped"
    assert "pjsua2" in sip["reason"]
    assert all(report["services"][n]["status"] == "ok" for n in ("asr", "crm", "llm", "tts"))
    assert re.search(r"\nsip +skipped \| pjsua2 unavailable: adapter 'sip'", result.err)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--calls", "0"), "--calls must be between 1 and 200"),
        (("--turns", "50"), "--turns must be between 1 and 20"),
        (("--rtt", "-1"), "--rtt must be between 0 and 1000 ms"),
    ],
)
def test_bad_arguments_exit_2(
    args: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", *args]) == 2
    assert message in capsys.readouterr().err

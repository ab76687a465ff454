"""``voicepool probe`` against the emulators behind latency relays (and nginx where installed).

At RTT = 20 ms a warm round trip takes about 20 ms, and a cold connection at least two more round
trips (TCP + TLS, then the protocol's own opening). Margins are wide: these machines are shared.
"""

from __future__ import annotations

import pytest

from tests.cli.conftest import KEY, RTT, SIP_PASSWORD, Services, assert_clean, run_cli
from tests.peers.nginx import Nginx, free_port, nginx_available
from voicepool.cli import main
from voicepool.cli._probes import parse_target
from voicepool.testing.llm import LlmEmulator
from voicepool.testing.tls import test_certificates

RTT_MS = RTT * 1e3


def _check_timings(result: dict[str, object], protocol_step: str) -> None:
    steps = result["steps_ms"]
    assert isinstance(steps, dict)
    assert list(steps)[:3] == ["dns", "tcp", "tls"], steps
    assert protocol_step in steps
    warm = result["warm_ms"]
    cold = result["cold_ms"]
    assert isinstance(warm, float)
    assert isinstance(cold, float)
    assert RTT_MS * 0.8 < warm < RTT_MS * 6, result
    assert cold > 2 * RTT_MS * 0.8, result  # TCP + TLS + the protocol opening: >= 3 RTT
    assert steps[protocol_step] > RTT_MS * 0.8, result
    assert result["runs"] == 2


async def test_probe_websocket_http2_http1_and_sip(services: Services) -> None:
    result = await run_cli(
        "probe", "-n", "2", "--json", "--ca-file", services.ca_file,
        f"{services.asr_url}/v1/listen", "-H", f"Authorization: Token {KEY}",
        services.llm_url,
        f"{services.crm_url}/health",
        f"sip:demo@{services.sip_uri.removeprefix('sip:')}", "--sip-password", SIP_PASSWORD,
        f"sip:demo@{services.sip_tcp_uri.removeprefix('sip:')}",
    )  # fmt: skip
    assert result.code == 0, result.out + result.err
    assert_clean(result)
    ws, h2, h1, sip, sip_tcp = result.json()
    for probe in (ws, h2, h1, sip, sip_tcp):
        assert probe["error"] is None, probe

    assert ws["kind"] == "websocket"
    assert ws["notes"]["status"] == "HTTP 101"
    assert ws["notes"]["tls"] == "TLSv1.3"
    assert ws["warm"] == "WebSocket ping -> pong"
    _check_timings(ws, "upgrade")

    assert h2["kind"] == "https (h2)"
    assert h2["warm"] == "HTTP/2 PING -> ACK"
    _check_timings(h2, "http2")

    assert h1["kind"] == "https (http/1.1)"
    assert h1["notes"]["status"] == "200 OK"
    _check_timings(h1, "http1")

    # SIP over UDP: a 401 challenge, then the authenticated REGISTER, then OPTIONS as warm.
    assert list(sip["steps_ms"]) == ["dns", "register", "register_auth"]
    assert sip["notes"]["register"] == "401"
    assert sip["notes"]["register_auth"] == "200"
    assert sip["steps_ms"]["register_auth"] > RTT_MS * 0.8
    assert sip["warm"] == "OPTIONS -> 200"
    assert sip["warm_ms"] > RTT_MS * 0.8
    assert sip_tcp["steps_ms"]["tcp"] >= 0
    assert sip_tcp["notes"]["register_auth"] == "200"
    # Every probe un-REGISTERed: the registrar is left as it was.
    assert services.registrar.binding_count() == 0
    # The key went to the server, never to the output.
    assert KEY not in result.out.replace(f"Token {KEY}", "")


async def test_probe_human_output_and_failures(services: Services) -> None:
    refused = f"https://127.0.0.1:{free_port()}"
    result = await run_cli(
        "probe", "-n", "1", "--ca-file", services.ca_file,
        f"{services.asr_url}/v1/listen",  # no key: the upgrade is answered 401
        refused,
        f"sip:demo@{services.sip_uri.removeprefix('sip:')}", "--sip-password", "wrong",
    )  # fmt: skip
    assert result.code == 1, result.out + result.err
    assert_clean(result)
    out = result.out
    assert "upgrade" in out
    assert "HTTP 401" in out
    assert "pass the API key with -H" in out
    assert f"{refused}   " in out
    assert "FAILED: tcp:" in out
    assert "FAILED: register_auth: the registrar answered 401" in out
    assert "wrong" not in out.replace("--sip-password wrong", "")


async def test_probe_untrusted_certificate_names_the_tls_step(services: Services) -> None:
    result = await run_cli("probe", "-n", "1", "--json", services.llm_url, "--timeout", "5")
    assert result.code == 1
    (probe,) = result.json()
    assert probe["error"].startswith("tls: certificate rejected")
    assert "--ca-file" in probe["error"]


@pytest.mark.parametrize(
    "url", ["ftp://example.com", "sips:alice@example.com", "sip:host;transport=sctp", "wss://"]
)
def test_probe_rejects_bad_urls(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe", url]) == 2
    assert "voicepool probe:" in capsys.readouterr().err


def test_parse_target() -> None:
    t = parse_target("wss://api.example.com/v1/listen?model=nova-3")
    assert (t.kind, t.host, t.port, t.path, t.tls) == (
        "websocket", "api.example.com", 443, "/v1/listen?model=nova-3", True,
    )  # fmt: skip
    t = parse_target("sip:alice@10.0.0.1:5070;transport=TCP")
    assert (t.kind, t.host, t.port, t.transport, t.user) == (
        "sip",
        "10.0.0.1",
        5070,
        "tcp",
        "alice",
    )
    t = parse_target("sip:[::1]")
    assert (t.host, t.port, t.transport) == ("::1", 5060, "udp")
    assert parse_target("http://h:8080").kind == "http"


@pytest.mark.needs_bin
@pytest.mark.skipif(not nginx_available(), reason="nginx is not installed")
async def test_probe_through_nginx_http2_front() -> None:
    certs = test_certificates()
    async with LlmEmulator(tls=False, ttft=0.0, tokens=1) as llm:
        port = free_port()
        block = f"""
        server {{
            listen 127.0.0.1:{port} ssl http2;
            ssl_certificate {certs.cert_path};
            ssl_certificate_key {certs.key_path};
            location / {{ proxy_pass http://127.0.0.1:{llm.port}; }}
        }}
        """
        async with Nginx(block):
            result = await run_cli(
                "probe", "-n", "2", "--json", "--ca-file", str(certs.ca_path),
                f"https://127.0.0.1:{port}",
            )  # fmt: skip
    assert result.code == 0, result.out + result.err
    (probe,) = result.json()
    assert probe["kind"] == "https (h2)"
    assert probe["notes"]["http2"] == "first frame: server SETTINGS"
    assert probe["warm"] == "HTTP/2 PING -> ACK"
    assert probe["warm_ms"] is not None

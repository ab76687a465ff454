"""``voicepool check``: a good config connects every pool (exit 0); invalid settings exit 2 with
every problem's path; a pool that cannot connect exits 1 naming the pool and the reason, and never
prints a credential."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from tests.cli.conftest import KEY, SIP_PASSWORD, Services, assert_clean, run_cli
from voicepool.cli import main

WRONG_KEY = "wrong-key-abcdef"


def sip_available() -> bool:
    return importlib.util.find_spec("pjsua2") is not None


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """In-process runs: no VOICEPOOL_* variable and no .env of the caller's."""
    for name in list(os.environ):
        if name.upper().startswith("VOICEPOOL_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def _config(services: Services, *, tts_key: str = KEY, tts_required: bool = True) -> str:
    sip = ""
    if sip_available():
        registrar = services.sip_uri
        sip = f"""
[pools.sip]
adapter = "sip"
min_size = 1
max_size = 1
[pools.sip.options]
aor = "sip:demo@127.0.0.1"
registrar = "{registrar}"
password = "{SIP_PASSWORD}"
bind_address = "127.0.0.1"
"""
    return f"""
[defaults]
connect_timeout = 10.0

[pools.asr]
adapter = "deepgram"
[pools.asr.options]
url = "{services.asr_url}"
api_key = "{KEY}"
ca_file = "{services.ca_file}"

[pools.llm]
adapter = "http2"
[pools.llm.options]
base_url = "{services.llm_url}"
api_key = "{KEY}"
ca_file = "{services.ca_file}"
warmup_path = "/v1/models"

[pools.crm]
adapter = "rest"
[pools.crm.options]
base_url = "{services.crm_url}"
api_key = "{KEY}"
ca_file = "{services.ca_file}"
warmup_path = "/v1/contacts"
warmup_method = "GET"

[pools.tts]
adapter = "elevenlabs"
required = {str(tts_required).lower()}
[pools.tts.options]
url = "{services.tts_url}"
api_key = "{tts_key}"
ca_file = "{services.ca_file}"
{sip}"""


async def test_good_config_connects_every_pool(services: Services, tmp_path: Path) -> None:
    path = tmp_path / "voicepool.toml"
    path.write_text(_config(services))
    result = await run_cli("check", str(path))
    assert result.code == 0, result.out + result.err
    assert_clean(result)
    lines = result.out.splitlines()
    assert lines[0].startswith(f"settings: ok (config file '{path}'")
    names = ["asr", "llm", "crm", "tts"] + (["sip"] if sip_available() else [])
    for name in names:
        row = next(line for line in lines if line.startswith(f"{name} "))
        assert " ok " in row, row
        assert "connect" in row
        if name == "sip":
            assert "on pjsua2-pybind11 " in row, row  # the binding in use is named
    assert lines[-1] == f"all {len(names)} pools connect"
    # One connection per pool, closed again: the emulators saw them come and go.
    assert services.asr.accepted == 1
    assert services.tts.accepted == 1
    assert services.crm.connections_accepted == 1
    assert services.registrar.binding_count() == 0  # un-REGISTERed on close
    assert KEY not in result.out


@pytest.mark.usefixtures("clean_env")
def test_invalid_settings_exit_2_naming_every_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        """
[pools.asr]
adapter = "deepgram"
max_size = 0
[pools.asr.options]
api_key = "sk-very-secret-value"
modle = "nova-3"

[pools.llm]
adapter = "http2"
headroom = 9
"""
    )
    assert main(["check", str(path)]) == 2
    captured = capsys.readouterr()
    out = captured.out
    assert out.startswith(f"settings: INVALID (config file '{path}')")
    assert "pools.asr.max_size: Input should be greater than or equal to 1 (got 0)" in out
    assert "pools.asr.options.modle: unknown option for this adapter" in out
    assert "pools.llm.options.base_url: Field required" in out
    assert "pools.llm.headroom: Input should be less than or equal to 4 (got 9)" in out
    assert "sk-very-secret-value" not in out + captured.err


async def test_failing_pool_exit_1_names_pool_and_reason(
    services: Services, tmp_path: Path
) -> None:
    path = tmp_path / "voicepool.toml"
    path.write_text(_config(services, tts_key=WRONG_KEY))
    result = await run_cli("check", str(path))
    assert result.code == 1, result.out + result.err
    assert_clean(result)
    tts = next(line for line in result.out.splitlines() if line.startswith("tts "))
    assert "FAILING" in tts
    assert "HTTP 401" in tts
    assert "the API key was rejected" in tts
    last = result.out.splitlines()[-1]
    assert last.startswith("1 of ")
    assert last.endswith(" pools failing: tts")
    assert WRONG_KEY not in result.out + result.err
    assert KEY not in result.out + result.err

    # JSON, for pipelines: the same verdict, per pool.
    result = await run_cli("check", str(path), "--json")
    assert result.code == 1
    report = result.json()
    assert report["ok"] is False
    assert report["settings"]["ok"] is True
    assert report["pools"]["tts"]["ok"] is False
    assert "401" in report["pools"]["tts"]["reason"]
    assert report["pools"]["asr"]["ok"] is True
    assert report["pools"]["asr"]["connect_ms"] > 0


async def test_optional_pool_failing_with_required_only(services: Services, tmp_path: Path) -> None:
    path = tmp_path / "voicepool.toml"
    path.write_text(_config(services, tts_key=WRONG_KEY, tts_required=False))
    result = await run_cli("check", str(path), "--required-only")
    assert result.code == 0, result.out + result.err
    assert "failing (optional)" in result.out


async def test_unset_secret_is_named_with_its_environment_variable(
    services: Services, tmp_path: Path
) -> None:
    path = tmp_path / "voicepool.toml"
    path.write_text(
        f"""
[pools.voice]
adapter = "elevenlabs"
[pools.voice.options]
url = "{services.tts_url}"
ca_file = "{services.ca_file}"
"""
    )
    result = await run_cli("check", str(path))
    assert result.code == 1
    assert (
        "hint: pools.voice.options.api_key is not set (VOICEPOOL_POOLS__VOICE__OPTIONS__API_KEY)"
        in result.out
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ("[pools.asr\n", "is not valid TOML"),
        ("[defaults]\nconcurrency = 4\n", "no pools configured"),
    ],
)
@pytest.mark.usefixtures("clean_env")
def test_unusable_config_file_exit_2(
    content: str | None, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "voicepool.toml"
    if content is not None:
        path.write_text(content)
    assert main(["check", str(path)]) == 2
    assert message in capsys.readouterr().out

"""A user's program type-checks with ``mypy --strict`` WITHOUT the pydantic mypy plugin: every
public model's fields have defaults type checkers see (``Field(default=...)``), and credentials
accept ``str`` where a ``SecretStr`` is stored (a descriptor for the checkers; SecretStr at run
time). Bad calls are still caught."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

GOOD = """
from voicepool import Pool, PoolManager, PoolSettings, VoicePoolSettings
from voicepool.adapters.cartesia import CartesiaOptions
from voicepool.adapters.deepgram import DeepgramOptions
from voicepool.adapters.elevenlabs import ElevenLabsOptions
from voicepool.adapters.http2 import Http2Adapter, Http2Options
from voicepool.adapters.rest import RestAdapter, RestOptions
from voicepool.adapters.websocket import WebSocketAdapter, WebSocketOptions
from voicepool.settings import PoolConfig

settings = PoolSettings(concurrency=20, max_size=8, acquire_timeout=0.5)
rest = RestOptions(base_url="https://crm.example", api_key="sk-123")
pool = Pool(RestAdapter(rest), settings, name="crm")
llm = Http2Adapter(Http2Options(base_url="https://llm.example", api_key="sk-123"))
ws = WebSocketAdapter(WebSocketOptions(url="wss://asr.example/ws", api_key="sk-123"))
asr = DeepgramOptions(api_key="sk-123")
tts = [ElevenLabsOptions(api_key="k-123", voice_id="v"), CartesiaOptions(api_key="k-123")]
entry = PoolConfig(adapter="rest", options=rest)
manager = PoolManager.from_settings(VoicePoolSettings(pools={"crm": entry}))
key: str = rest.api_key.get_secret_value() if rest.api_key is not None else ""
size: int = settings.concurrency
"""

BAD = """
from voicepool import PoolSettings
from voicepool.adapters.rest import RestOptions

PoolSettings(concurrency="many")
RestOptions(base_url="https://crm.example", api_key=42)
"""


def _mypy(tmp_path: Path, program: str) -> subprocess.CompletedProcess[str]:
    # The editable install maps voicepool.adapters to the repo folder adapters/ with an import
    # hook mypy cannot follow: lay the package out as the wheel does, with symlinks.
    shadow = tmp_path / "site" / "voicepool"
    shadow.mkdir(parents=True)
    for item in (ROOT / "voicepool").iterdir():
        (shadow / item.name).symlink_to(item)
    (shadow / "adapters").symlink_to(ROOT / "adapters")
    user = tmp_path / "user.py"
    user.write_text(textwrap.dedent(program))
    config = tmp_path / "mypy.ini"
    config.write_text("[mypy]\nstrict = True\n")  # no plugins: what a user without pydantic's has
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(config),
            "--follow-imports=silent",  # as for an installed package: only the user's errors
            "--no-incremental",
            str(user),
        ],
        env={"MYPYPATH": str(shadow.parent), "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )


@pytest.mark.slow
def test_a_users_program_passes_mypy_strict_without_the_pydantic_plugin(tmp_path: Path) -> None:
    good = _mypy(tmp_path / "good", GOOD)
    assert good.returncode == 0, good.stdout + good.stderr
    bad = _mypy(tmp_path / "bad", BAD)
    assert bad.returncode == 1, bad.stdout
    assert 'Argument "concurrency" to "PoolSettings" has incompatible type "str"' in bad.stdout
    assert 'Argument "api_key" to "RestOptions" has incompatible type "int"' in bad.stdout

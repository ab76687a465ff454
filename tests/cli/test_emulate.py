"""``voicepool emulate`` as a process: endpoints on stdout (JSON), an official SDK drives it, the
control endpoint sets a fault, and SIGTERM / SIGINT by PID stop it with exit status 0."""

from __future__ import annotations

import json
import os
import re
import signal
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import httpx2
import openai
import pytest

from voicepool.cli import main

HELLO: list[Any] = [{"role": "user", "content": "x"}]


def start(*args: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "voicepool.cli", "emulate", *args, "--json"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the process prints its endpoints once it listens
    return proc, json.loads(line)


def stop(proc: subprocess.Popen[str], sig: int) -> int:
    proc.send_signal(sig)  # by its PID
    try:
        return proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()  # this child only, by its PID
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_emulate_process_serves_an_sdk_and_stops_on_a_signal(sig: int) -> None:
    proc, info = start("llm", "deepgram", "--tls", "--rtt", "10", "--429", "1")
    try:
        llm = next(s for s in info["services"] if s["service"] == "llm")
        assert {s["service"] for s in info["services"]} == {"llm", "deepgram"}
        assert llm["base_url"].startswith("https://127.0.0.1:")
        verify = ssl.create_default_context(cafile=llm["ca_file"])
        with openai.OpenAI(
            base_url=llm["base_url"],
            api_key=llm["api_key"],
            http_client=httpx2.Client(verify=verify),  # the client the SDK is typed for
            max_retries=0,
        ) as client:
            with pytest.raises(openai.RateLimitError):  # --429 1
                client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "x"}]
                )
            stream = client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}], stream=True
            )
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            control = httpx.post(info["control"] + "/llm/429?count=1")
            assert control.json() == {"ok": True}
            with pytest.raises(openai.RateLimitError):
                client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "x"}]
                )
        state = httpx.get(info["control"] + "/").json()
        assert state["llm"]["counters"]["connections_accepted"] >= 1
    finally:
        code = stop(proc, sig)
    assert code == 0


def test_emulate_rejects_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["emulate", "llm", "--rtt", "-1"]) == 2
    assert "--rtt" in capsys.readouterr().err


def test_the_readme_test_suite_runs(tmp_path: Path) -> None:
    """The README's example suite (conftest.py + test_bot.py), run as a user would."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Testing your bot against the emulators", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    for block in blocks:
        name = block.splitlines()[0].removeprefix("# ").strip()
        (tmp_path / name).write_text(block, encoding="utf-8")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout

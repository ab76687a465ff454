"""``voicepool emulate`` as a process: endpoints on stdout (JSON), an official SDK drives it, the
control endpoint sets a fault, and SIGTERM / SIGINT by PID stop it with exit status 0."""

from __future__ import annotations

import json
import signal
import ssl
import subprocess
import sys
from typing import Any

import httpx
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
            http_client=httpx.Client(verify=verify),
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

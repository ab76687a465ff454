"""The README's "Using voicepool with Pipecat" and "... with LiveKit Agents" snippets, run as
written against the emulators (endpoints through the environment variables they read)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pipecat")
pytest.importorskip("livekit.agents")

from .conftest import load_example

bot = load_example("pipecat_bot")
lk = load_example("livekit_agent")
pytestmark = [pytest.mark.timeout(60), pytest.mark.filterwarnings("ignore::DeprecationWarning")]
README = Path(__file__).resolve().parents[2] / "README.md"


def snippet(heading: str) -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    [code] = re.findall(r"```python\n(.*?)```", section, re.S)
    lines = [line for line in code.splitlines() if line.strip()]
    assert len(lines) < 20, "the issue asks for under 20 lines of code"
    return str(code)


def _keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DEEPGRAM_API_KEY", "OPENAI_API_KEY", "ELEVEN_API_KEY"):
        monkeypatch.setenv(name, bot.KEY)
    monkeypatch.setenv("VOICE_ID", "v1")


async def test_pipecat_snippet(monkeypatch: pytest.MonkeyPatch) -> None:
    _keys(monkeypatch)
    async with bot.emulated_services() as stack:
        monkeypatch.setenv("DEEPGRAM_URL", stack.deepgram)
        monkeypatch.setenv("OPENAI_BASE_URL", stack.llm)
        monkeypatch.setenv("ELEVENLABS_URL", stack.elevenlabs)
        ns: dict[str, Any] = {}
        exec(snippet("Using voicepool with Pipecat"), ns)
        async with ns["pools"] as pools:
            # The pipeline's rates are the ones the pools were declared with (another rate is a
            # logged, counted miss: test_pipecat.py).
            result = await bot.run_call(ns["services"](), turns=1, out_rate=24000)
        assert result.audio_bytes > 0
        assert sum(pools.index.misses.values()) == 0


async def test_livekit_snippet(monkeypatch: pytest.MonkeyPatch) -> None:
    _keys(monkeypatch)
    heard: list[list[float]] = []

    class OneTurnSession:  # stands in for AgentSession.start, which needs a LiveKit room
        def __init__(self, *, stt: Any, tts: Any, llm: Any) -> None:
            self.plugins = (stt, llm, tts)

        async def start(self, *, room: Any, agent: Any) -> None:
            heard.append((await lk._turns(*self.plugins, turns=1, start_ms=0.0)).turn_ms)

    async with bot.emulated_services() as stack:
        monkeypatch.setenv("DEEPGRAM_URL", stack.deepgram + "/v1/listen")
        monkeypatch.setenv("ELEVENLABS_URL", stack.elevenlabs.replace("wss", "https") + "/v1")
        monkeypatch.setenv("OPENAI_BASE_URL", stack.llm)
        ns: dict[str, Any] = {}
        exec(snippet("Using voicepool with LiveKit Agents"), ns)
        ns["AgentSession"] = OneTurnSession
        ctx = lk.FakeJobContext(stack.rtt)
        ctx.room = None
        await ns["entrypoint"](ctx)
    assert len(heard) == 1
    assert len(heard[0]) == 1

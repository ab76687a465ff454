"""The README's "Using voicepool with Pipecat" and "... with LiveKit Agents" snippets, run as
written against the emulators (endpoints through the environment variables they read)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pipecat")
pytest.importorskip("livekit.agents")

from voicepool.manager import ManagerState

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
    """The snippet's entrypoint, run as LiveKit would run it, in a fake job whose session has no
    room: a real AgentSession (the test's subclass only sets its audio in and out, and STT turn
    detection without an endpointing delay), one user turn, then the job's shutdown."""
    from livekit.agents import AgentSession

    _keys(monkeypatch)
    sessions: list[Any] = []

    class OfflineSession(AgentSession):  # type: ignore[type-arg]
        def __init__(self, **plugins: Any) -> None:
            offline = lk.agent_session(**plugins)
            super().__init__(**plugins, turn_handling=offline.options.turn_handling, vad=None)
            self.mic, self.sink = lk.SimulatedMic(), lk.FirstAudioSink()
            sessions.append(self)

        async def start(self, *, room: Any, agent: Any, **kwargs: Any) -> Any:  # type: ignore[override]
            assert room is None  # no LiveKit server here
            self.input.audio, self.output.audio = self.mic, self.sink
            return await super().start(agent=agent, **kwargs)

    async with bot.emulated_services() as stack:
        monkeypatch.setenv("DEEPGRAM_URL", stack.deepgram + "/v1/listen")
        monkeypatch.setenv("ELEVENLABS_URL", stack.elevenlabs.replace("wss", "https") + "/v1")
        monkeypatch.setenv("OPENAI_BASE_URL", stack.llm)
        ns: dict[str, Any] = {}
        exec(snippet("Using voicepool with LiveKit Agents"), ns)
        ns["AgentSession"] = OfflineSession
        started: list[Any] = []

        async def start_job_pools(*args: Any, **kwargs: Any) -> Any:
            started.append(await real_start(*args, **kwargs))
            return started[-1]

        real_start, ns["start_job_pools"] = ns["start_job_pools"], start_job_pools
        async with lk.simulated_job(stack.rtt) as ctx:
            await ns["entrypoint"](ctx)
            [session], [pools] = sessions, started
            job = lk.Job(session, session.mic, session.sink, ready_ms=0.0)
            assert await lk.turn(job, 0) > 0
    assert session.sink.frames > 0
    assert not pools.index.misses
    assert not pools.index.cold  # no lease waited for a handshake: all were opened in the join
    assert pools.manager.state is ManagerState.CLOSED  # closed by the job's shutdown

"""A plain asyncio voice worker on voicepool: boot the pools, serve calls, stop cleanly on SIGTERM.

    python examples/worker.py                          # demo: local stand-in services
    python examples/worker.py --config voicepool.toml  # your pools: asr, llm, tts
    python examples/worker.py --calls 20 --turns 3     # a fixed number of calls, then exit

A simulated call does what a voice agent does: it holds one speech-recognition stream (ASR) for the
whole call and, every turn, hears the caller, asks the LLM, and speaks the answer (TTS). Every
connection comes from a pool warmed at boot, so no turn pays a handshake.

Demo services (no account, no network): voicepool's Deepgram, ElevenLabs and OpenAI-compatible
emulators over TLS where they are installed, otherwise small line-protocol servers
(``custom_adapter.py``); ``--services line`` forces the latter.

Shutdown (voicepool.GracefulShutdown):
* SIGTERM or Ctrl-C: stop taking calls, let the calls in flight finish, drain the pools, exit 0.
* A second SIGTERM: cancel the calls in flight, close every pool at once, exit 143 (130 for SIGINT).
* A third: the default action (the process dies).

Status lines go to stdout (``ready: ...``, ``call N: ...``, ``draining: ...``, ``stopped: ...``);
logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from voicepool import (
    GracefulShutdown,
    Lease,
    PoolClosed,
    PoolExhausted,
    PoolManager,
    PoolUnavailable,
    VoicePoolSettings,
)

# The demo's line-protocol stand-ins and their adapter live beside this file.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from custom_adapter import LineServer

log = logging.getLogger("worker")

SERVICES = ("asr", "llm", "tts")


@dataclass
class Tally:
    started: int = 0
    completed: int = 0
    failed: int = 0
    turns: int = 0
    in_flight: int = 0
    turn_ms: list[float] = field(default_factory=list)


# -- what a call does with each service -----------------------------------------------------------


class Agent:
    """Listen (ASR), think (LLM), speak (TTS), on pooled connections.

    What a step sends depends on the pool's adapter: the Deepgram and ElevenLabs / Cartesia
    helpers of voicepool's adapters, an ``http2`` LLM pool through ``PooledTransport`` under an
    httpx client (``openai.AsyncOpenAI(http_client=...)`` works the same), the demo's ``line``
    adapter a request/answer round trip. For any other adapter the lease is taken and held
    without traffic (this example does not know its protocol).
    """

    def __init__(self, manager: PoolManager, args: argparse.Namespace) -> None:
        self.manager = manager
        self.hold = args.hold_ms / 1000
        self.model = args.llm_model
        settings = manager.settings
        self.kinds = {name: cfg.adapter for name, cfg in settings.pools.items()} if settings else {}
        self.http: httpx.AsyncClient | None = None
        if self.kinds.get("llm") == "http2" and settings is not None:
            from voicepool.adapters.http2 import PooledTransport

            self.http = httpx.AsyncClient(
                transport=PooledTransport(manager["llm"]),
                base_url=getattr(settings.pools["llm"].options, "base_url", ""),
                timeout=30,
            )

    async def aclose(self) -> None:
        if self.http is not None:
            await self.http.aclose()  # the pool stays: the manager owns it

    async def call(self, number: int, turns: int, tally: Tally) -> None:
        """One call: one ASR stream held throughout, LLM and TTS leased per turn."""
        async with self.manager.acquire("asr") as asr:
            for turn in range(turns):
                t0 = time.perf_counter()
                heard = await self.listen(asr, f"caller {number} says {turn}")
                reply = await self.think(heard)
                await self.speak(reply)
                tally.turn_ms.append((time.perf_counter() - t0) * 1000)
                tally.turns += 1

    async def listen(self, asr: Lease[Any], speech: str) -> str:
        await asyncio.sleep(self.hold)  # the caller speaks
        kind = self.kinds.get("asr")
        if kind == "deepgram":
            stream = asr.conn
            await stream.send_audio(speech.encode())  # the emulator "hears" printable audio
            await stream.finalize()
            async for transcript in stream.transcripts():
                if transcript.is_final:
                    return str(transcript.text)
        elif kind == "line":
            return str(await asr.conn.request(speech))
        return speech

    async def think(self, prompt: str) -> str:
        if self.http is not None:
            return await self._chat(prompt)
        async with self.manager.acquire("llm") as llm:
            if self.kinds.get("llm") == "line":
                return str(await llm.conn.request(f"answer to {prompt}"))
        return f"answer to {prompt}"

    async def _chat(self, prompt: str) -> str:
        """Stream a chat completion on a pooled HTTP/2 stream (no handshake in the turn)."""
        assert self.http is not None
        message = {"role": "user", "content": prompt}
        body = {"model": self.model, "stream": True, "messages": [message]}
        words: list[str] = []
        async with self.http.stream("POST", "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                data = line.removeprefix("data: ").strip()
                if not line.startswith("data: ") or data == "[DONE]":
                    continue
                for choice in json.loads(data).get("choices", []):
                    words.append(choice.get("delta", {}).get("content") or "")
        return "".join(words)

    async def speak(self, text: str) -> None:
        async with self.manager.acquire("tts") as tts:
            kind = self.kinds.get("tts")
            if kind in ("elevenlabs", "cartesia"):
                context = tts.conn.context(tts.stream_id)  # this lease's context on the socket
                async for _chunk in context.synthesize(text or "."):
                    pass  # a real worker streams the audio to the caller here
            elif kind == "line":
                await tts.conn.request(text)
            await asyncio.sleep(self.hold)  # the audio plays


# -- calls ----------------------------------------------------------------------------------------


async def run_call(agent: Agent, number: int, args: argparse.Namespace, tally: Tally) -> None:
    """One call; a pool error ends this call, not the worker."""
    tally.started += 1
    tally.in_flight += 1
    print(f"call {number}: started", flush=True)
    try:
        await agent.call(number, args.turns, tally)
        tally.completed += 1
        print(f"call {number}: done, {args.turns} turns", flush=True)
    except (PoolExhausted, PoolUnavailable, PoolClosed, httpx.HTTPError) as exc:
        tally.failed += 1
        log.warning("call %d failed: %s", number, exc)
    finally:
        tally.in_flight -= 1


async def serve(
    agent: Agent, shutdown: GracefulShutdown, args: argparse.Namespace, tally: Tally
) -> None:
    """Take calls until ``args.calls`` were taken or a shutdown is requested, then let the calls
    in flight finish. Cancelled (second signal): the calls are cancelled with it."""
    slots = asyncio.Semaphore(args.concurrency)

    async with asyncio.TaskGroup() as calls:

        async def one_call(number: int) -> None:
            try:
                await run_call(agent, number, args, tally)
            finally:
                slots.release()

        async def accept() -> None:
            number = 0
            while args.calls is None or number < args.calls:
                await slots.acquire()
                calls.create_task(one_call(number))
                number += 1
                await asyncio.sleep(args.arrival_ms / 1000)

        accepting = asyncio.create_task(accept())
        stop = asyncio.create_task(shutdown.wait())
        try:
            await asyncio.wait({accepting, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            accepting.cancel()
            stop.cancel()
        if accepting.done() and not accepting.cancelled() and accepting.exception():
            raise accepting.exception()  # type: ignore[misc]
        if shutdown.draining:
            print(f"draining: {tally.in_flight} calls in flight", flush=True)


# -- settings: your TOML, or the demo's local services -------------------------------------------


@asynccontextmanager
async def demo_settings(args: argparse.Namespace) -> AsyncIterator[VoicePoolSettings]:
    """Start a local stand-in per service and configure a pool for each (see the docstring)."""
    key = "demo-key"  # the emulators' only accepted key: a credential travels the real path
    common = {"concurrency": args.concurrency, "drain_timeout": args.drain_timeout}
    found = emulators() if args.services == "auto" else {}
    async with AsyncExitStack() as stack:
        pools: dict[str, Any] = {}
        for service, delay in (("asr", 0.002), ("llm", 0.010), ("tts", 0.002)):
            server = await stack.enter_async_context(LineServer(reply_delay=delay))
            pools[service] = {"adapter": "line", "options": {"port": server.port}, **common}
        if "asr" in found:
            asr = await stack.enter_async_context(found["asr"](tls=True, api_key=key))
            pools["asr"] = {
                "adapter": "deepgram",
                "options": {"url": asr.url, "api_key": key, "ca_file": asr.ca_file},
                **common,
                # One stream per call, held throughout: keep a spare for every call slot.
                "min_size": args.concurrency,
            }
        if "tts" in found:
            tts = await stack.enter_async_context(found["tts"](tls=True, api_key=key))
            pools["tts"] = {
                "adapter": "elevenlabs",
                "options": {"url": tts.url, "api_key": key, "ca_file": tts.ca_file},
                **common,
            }
        if "llm" in found:
            llm = await stack.enter_async_context(found["llm"](api_key=key, ttft=0.01, tokens=5))
            pools["llm"] = {
                "adapter": "http2",
                "options": {
                    "base_url": llm.url,
                    "api_key": key,
                    "ca_file": str(found["ca_path"]),
                    "warmup_path": "/v1/models",
                },
                **common,
            }
        yield VoicePoolSettings(pools=pools)


def emulators() -> dict[str, Any]:
    """voicepool's service emulators (and their adapters) that are installed, by service."""
    found: dict[str, Any] = {}
    try:
        import voicepool.adapters.deepgram
        from voicepool.testing.asr import DeepgramEmulator

        found["asr"] = DeepgramEmulator
    except ImportError:
        pass
    try:
        import voicepool.adapters.elevenlabs
        from voicepool.testing.tts import ElevenLabsEmulator

        found["tts"] = ElevenLabsEmulator
    except ImportError:
        pass
    try:
        import voicepool.adapters.http2  # noqa: F401
        from voicepool.testing import test_certificates
        from voicepool.testing.llm import LlmEmulator

        found["llm"] = LlmEmulator
        found["ca_path"] = test_certificates().ca_path
    except ImportError:
        pass
    return found


@asynccontextmanager
async def file_settings(args: argparse.Namespace) -> AsyncIterator[VoicePoolSettings]:
    settings = VoicePoolSettings(config=args.config)
    missing = [s for s in SERVICES if s not in settings.pools]
    if missing:
        raise SystemExit(f"{args.config}: this worker needs pools {', '.join(missing)}")
    yield settings


# -- main -----------------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> int:
    source = file_settings if args.config else demo_settings
    async with source(args) as settings:
        manager = PoolManager.from_settings(settings)
        tally = Tally()
        t0 = time.perf_counter()
        # GracefulShutdown first, so a signal during the boot is handled too; the manager inside
        # it, so a second signal reaches the manager while it drains.
        async with GracefulShutdown() as shutdown, manager:
            boot_ms = (time.perf_counter() - t0) * 1000
            states = " ".join(
                f"{name}={pool['status']}({pool['adapter']})"
                for name, pool in manager.health()["pools"].items()
            )
            print(f"ready: {states} (boot {boot_ms:.0f} ms)", flush=True)
            agent = Agent(manager, args)
            try:
                await serve(agent, shutdown, args, tally)
            finally:
                await agent.aclose()
        how = "hard" if shutdown.hard else "graceful"
        turns = sorted(tally.turn_ms)
        p50 = turns[len(turns) // 2] if turns else 0.0
        print(
            f"stopped: {how}, calls={tally.completed}/{tally.started} failed={tally.failed}"
            f" turns={tally.turns} turn_p50_ms={p50:.1f} exit={shutdown.exit_code}",
            flush=True,
        )
        return shutdown.exit_code


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="TOML with pools asr, llm, tts (default: demo)")
    parser.add_argument("--calls", type=int, default=None, help="calls to take (default: no end)")
    parser.add_argument("--concurrency", type=int, default=4, help="calls at once")
    parser.add_argument("--turns", type=int, default=3, help="turns per call")
    parser.add_argument("--hold-ms", type=float, default=50.0, help="caller speech / playback time")
    parser.add_argument("--arrival-ms", type=float, default=20.0, help="gap between new calls")
    parser.add_argument("--drain-timeout", type=float, default=10.0, help="demo pools' drain")
    parser.add_argument(
        "--services",
        choices=("auto", "line"),
        default="auto",
        help="demo stand-ins: voicepool's emulators where installed (auto), or line servers only",
    )
    parser.add_argument("--llm-model", default="gpt-4o-mini", help="model for http2 LLM pools")
    return parser.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # One line per request or emulator connection is too chatty for a demo.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("voicepool.testing").setLevel(logging.WARNING)
    sys.exit(asyncio.run(main(parse_args())))

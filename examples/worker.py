"""A plain asyncio voice worker on voicepool: boot the pools, serve calls, stop cleanly on SIGTERM.

    python examples/worker.py                          # demo: local stand-in services
    python examples/worker.py --config voicepool.toml  # your pools: asr, llm, tts
    python examples/worker.py --calls 20 --turns 3     # a fixed number of calls, then exit

Every simulated call runs a few turns; each turn does what a voice agent does: listen (ASR), think
(LLM), speak (TTS), each on a connection leased from a pool that was warmed at boot, so no turn pays
a handshake.

Shutdown (voicepool.GracefulShutdown):
* SIGTERM or Ctrl-C: stop taking calls, let the calls in flight finish, drain the pools, exit 0.
* A second SIGTERM: cancel the calls in flight, close every pool at once, exit 143 (130 for SIGINT).
* A third: the default action (the process dies).

Status lines go to stdout (``ready: ...``, ``draining: ...``, ``stopped: ...``); logs to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
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
    PoolClosed,
    PoolExhausted,
    PoolManager,
    PoolUnavailable,
    VoicePoolSettings,
)
from voicepool.testing import test_certificates

# The demo's stand-in services and their adapter live beside this file.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from custom_adapter import LineAdapter, LineServer

log = logging.getLogger("worker")

SERVICES = ("asr", "llm", "tts")  # one turn, in order: listen, think, speak


@dataclass
class Tally:
    started: int = 0
    completed: int = 0
    failed: int = 0
    turns: int = 0
    in_flight: int = 0
    turn_ms: list[float] = field(default_factory=list)


# -- what a turn does with each service -----------------------------------------------------------


class Agent:
    """One turn: listen (ASR), think (LLM), speak (TTS), each on a pooled connection.

    A pool of the demo's ``line`` adapter gets one request/answer round trip per lease. An LLM
    pool on the ``http2`` adapter is used the way an application uses it: through
    ``PooledTransport`` under an httpx client (``openai.AsyncOpenAI(http_client=...)`` works the
    same), streaming a chat completion. Any other adapter: the lease is taken and held, as a call
    handler would, without traffic (this demo does not know its protocol).
    """

    def __init__(self, manager: PoolManager, args: argparse.Namespace) -> None:
        self.manager = manager
        self.hold = args.hold_ms / 1000
        self.model = args.llm_model
        self.http: httpx.AsyncClient | None = None
        settings = manager.settings
        llm = settings.pools.get("llm") if settings is not None else None
        if llm is not None and llm.adapter == "http2":
            from voicepool.adapters.http2 import PooledTransport

            self.http = httpx.AsyncClient(
                transport=PooledTransport(manager["llm"]),
                base_url=getattr(llm.options, "base_url", ""),
                timeout=30,
            )

    async def aclose(self) -> None:
        if self.http is not None:
            await self.http.aclose()  # leaves the pool alone: the manager owns it

    async def turn(self, call: int, turn: int) -> None:
        await self.leased("asr", f"audio of call {call} turn {turn}")
        if self.http is not None:
            await self.think(f"call {call} turn {turn}")
        else:
            await self.leased("llm", f"prompt of call {call} turn {turn}")
        await self.leased("tts", f"reply of call {call} turn {turn}")

    async def leased(self, service: str, text: str) -> None:
        async with self.manager.acquire(service) as lease:
            if isinstance(lease.pool.adapter, LineAdapter):
                answer = await lease.conn.request(text)
                if answer != text:
                    raise RuntimeError(f"{service}: unexpected answer {answer!r}")
            # The user speaks, the voice plays: the lease is held meanwhile.
            await asyncio.sleep(self.hold)

    async def think(self, text: str) -> None:
        """Stream a chat completion on a pooled HTTP/2 stream (no handshake in the turn)."""
        assert self.http is not None
        body = {
            "model": self.model,
            "stream": True,
            "messages": [{"role": "user", "content": text}],
        }
        async with self.http.stream("POST", "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if line.strip() == "data: [DONE]":
                    break
        await asyncio.sleep(self.hold)


# -- calls ----------------------------------------------------------------------------------------


async def run_call(agent: Agent, number: int, args: argparse.Namespace, tally: Tally) -> None:
    """One call of ``args.turns`` turns; a pool error ends this call only."""
    tally.started += 1
    tally.in_flight += 1
    print(f"call {number}: started", flush=True)
    try:
        for turn in range(args.turns):
            t0 = time.perf_counter()
            await agent.turn(number, turn)
            tally.turn_ms.append((time.perf_counter() - t0) * 1000)
            tally.turns += 1
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


# -- settings: your TOML, or the demo's local services --------------------------------------------


@asynccontextmanager
async def demo_settings(args: argparse.Namespace) -> AsyncIterator[VoicePoolSettings]:
    """Start a local stand-in per service and configure a pool for each.

    The LLM is voicepool's OpenAI-compatible emulator over TLS + HTTP/2 (with the ``http2``
    adapter) when both are installed, and ``--services line`` does not say otherwise; the
    others are small line-protocol servers (``custom_adapter.LineServer``).
    """
    delays = {"asr": 0.002, "llm": 0.010, "tts": 0.002}  # seconds to answer, per service
    common = {"concurrency": args.concurrency, "drain_timeout": args.drain_timeout}
    async with AsyncExitStack() as stack:
        pools: dict[str, Any] = {}
        for service in SERVICES:
            server = await stack.enter_async_context(LineServer(reply_delay=delays[service]))
            pools[service] = {"adapter": "line", "options": {"port": server.port}, **common}
        emulator = llm_emulator() if args.services == "auto" else None
        if emulator is not None:
            emu = await stack.enter_async_context(emulator(ttft=0.01, tokens=5))
            pools["llm"] = {
                "adapter": "http2",
                "options": {
                    "base_url": emu.url,
                    "ca_file": str(test_certificates().ca_path),  # the emulator's test CA
                    "warmup_path": "/v1/models",
                },
                **common,
            }
        yield VoicePoolSettings(pools=pools)


def llm_emulator() -> Any:
    """voicepool's LLM emulator class, if it and the http2 adapter are installed."""
    try:
        import voicepool.adapters.http2  # noqa: F401
        from voicepool.testing.llm import LlmEmulator
    except ImportError:
        return None
    return LlmEmulator


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
    parser.add_argument("--hold-ms", type=float, default=50.0, help="time a turn holds each lease")
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
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is too chatty
    sys.exit(asyncio.run(main(parse_args())))

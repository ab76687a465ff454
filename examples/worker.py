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
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from voicepool import (
    GracefulShutdown,
    Lease,
    PoolClosed,
    PoolExhausted,
    PoolManager,
    PoolUnavailable,
    VoicePoolSettings,
)

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


# -- one turn on one leased connection ------------------------------------------------------------

Exchange = Callable[[Lease[Any], str], Awaitable[None]]


async def line_exchange(lease: Lease[Any], text: str) -> None:
    """The demo services echo: one request/answer round trip on the warm connection."""
    answer = await lease.conn.request(text)
    if answer != text:
        raise RuntimeError(f"unexpected answer {answer!r}")


async def hold_only(lease: Lease[Any], text: str) -> None:
    """Adapters this demo has no exchange for: the lease itself is the point."""


def exchange_for(lease: Lease[Any]) -> Exchange:
    if isinstance(lease.pool.adapter, LineAdapter):
        return line_exchange
    return hold_only


# -- calls ----------------------------------------------------------------------------------------


async def run_call(
    manager: PoolManager, number: int, args: argparse.Namespace, tally: Tally
) -> None:
    """One call: ``args.turns`` turns of ASR -> LLM -> TTS; a pool error ends the call only."""
    tally.started += 1
    tally.in_flight += 1
    print(f"call {number}: started", flush=True)
    try:
        for turn in range(args.turns):
            t0 = time.perf_counter()
            for service in SERVICES:
                async with manager.acquire(service) as lease:
                    await exchange_for(lease)(lease, f"{service} call {number} turn {turn}")
                    # The user speaks, the model thinks, the voice plays: the lease is held.
                    await asyncio.sleep(args.hold_ms / 1000)
            tally.turn_ms.append((time.perf_counter() - t0) * 1000)
            tally.turns += 1
        tally.completed += 1
        print(f"call {number}: done, {args.turns} turns", flush=True)
    except (PoolExhausted, PoolUnavailable, PoolClosed) as exc:
        tally.failed += 1
        log.warning("call %d failed: %s", number, exc)
    finally:
        tally.in_flight -= 1


async def serve(
    manager: PoolManager, shutdown: GracefulShutdown, args: argparse.Namespace, tally: Tally
) -> None:
    """Take calls until ``args.calls`` were taken or a shutdown is requested, then let the calls
    in flight finish. Cancelled (second signal): the calls are cancelled with it."""
    slots = asyncio.Semaphore(args.concurrency)

    async with asyncio.TaskGroup() as calls:

        async def one_call(number: int) -> None:
            try:
                await run_call(manager, number, args, tally)
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
    """Start one local stand-in per service and configure a pool for each."""
    delays = {"asr": 0.002, "llm": 0.010, "tts": 0.002}  # seconds to answer, per service
    async with AsyncExitStack() as stack:
        pools: dict[str, Any] = {}
        for service in SERVICES:
            server = await stack.enter_async_context(LineServer(reply_delay=delays[service]))
            pools[service] = {
                "adapter": "line",
                "concurrency": args.concurrency,
                "drain_timeout": args.drain_timeout,
                "options": {"port": server.port},
            }
        yield VoicePoolSettings(pools=pools)


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
            states = " ".join(f"{n}={p['status']}" for n, p in manager.health()["pools"].items())
            print(f"ready: {states} (boot {boot_ms:.0f} ms)", flush=True)
            await serve(manager, shutdown, args, tally)
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
    return parser.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    sys.exit(asyncio.run(main(parse_args())))

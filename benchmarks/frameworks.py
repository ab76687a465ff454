"""Pipecat and LiveKit Agents on voicepool pools vs their own per-call connections, in one run.

    .venv/bin/python benchmarks/frameworks.py [--calls 10] [--turns 3] [--rtt 0.040]

The TLS emulators (Deepgram, ElevenLabs, OpenAI-compatible HTTP/2) run in this process behind
the demo's latency relay (``latency_proxy``: ``--rtt`` round trip, plus a round trip for each TCP
handshake). The call drivers are examples/pipecat_bot.py and examples/livekit_agent.py:

* Pipecat: ``--calls`` overlapping calls (one arriving every 50 ms), each a pipeline audio in ->
  Deepgram STT -> OpenAI LLM -> ElevenLabs TTS -> audio out; ``start`` is the pipeline's start
  (until the StartFrame is through: every service connected), a turn is VAD stop -> first audio.
* LiveKit: jobs one after another (LiveKit runs one job per process), then the same jobs
  overlapping in this one process (``||``: they then share one CPU): the Deepgram STT, OpenAI
  LLM and ElevenLabs TTS plugins driven directly (no LiveKit server), pooled on a PooledSession
  with the pools started during a simulated room join (one round trip), or per job on a plain
  aiohttp session.

Each mode runs one unmeasured warm-up call first (the frameworks and SDKs import and build things
on first use: a process cost, not a call's). Medians; ``first/later`` is the first turn's median
over the later turns' median, measured in the same run. Targets (issue 14): Pipecat start <=
10 ms pooled, first turn pooled within 10% of later turns, 0 misses, 0 connections inside calls.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path
from typing import Any

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import livekit_agent as lk  # noqa: E402
import pipecat_bot as bot  # noqa: E402


def _row(
    framework: str,
    mode: str,
    starts: list[float],
    turns: list[list[float]],
    misses: int | str,
    inside: int | str,
) -> str:
    first = statistics.median(t[0] for t in turns)
    later = statistics.median(x for t in turns for x in t[1:])
    return (
        f"{framework:<9} {mode:<9} {statistics.median(starts):>9.1f} {max(starts):>8.1f}"
        f" {first:>10.0f} {later:>10.0f} {first / later:>7.2f} {misses!s:>6} {inside!s:>7}"
    )


async def main(calls: int, turns: int, rtt: float) -> None:
    from loguru import logger

    logger.remove()  # Pipecat logs every frame at DEBUG
    logger.add(sys.stderr, level="ERROR")
    rows: list[str] = []
    async with bot.emulated_services(rtt) as stack:
        for pooled in (True, False):
            run = await bot.measure(stack, pooled_run=pooled, calls=calls, turns=turns)
            rows.append(
                _row(
                    "pipecat",
                    "pooled" if pooled else "per call",
                    [r.start_ms for r in run.results],
                    [r.turn_ms for r in run.results],
                    run.misses,
                    run.opened_in_calls,
                )
            )
        stack.rtt = rtt
        for pooled in (True, False):
            await lk.run_job(stack, pooled=pooled, turns=1)  # warm-up
            before = stack.handshakes()
            jobs: list[Any] = [
                await lk.run_job(stack, pooled=pooled, turns=turns) for _ in range(calls)
            ]
            opened = stack.handshakes() - before
            rows.append(
                _row(
                    "livekit",
                    "pooled" if pooled else "per job",
                    [j.start_ms for j in jobs],
                    [j.turn_ms for j in jobs],
                    0 if pooled else "-",
                    f"{opened}*",
                )
            )
        for pooled in (True, False):
            before = stack.handshakes()
            jobs = await lk.run_jobs(stack, pooled=pooled, jobs=calls, turns=turns)
            opened = stack.handshakes() - before
            mode = "pooled||" if pooled else "per job||"
            starts, turn_ms = [j.start_ms for j in jobs], [j.turn_ms for j in jobs]
            rows.append(_row("livekit", mode, starts, turn_ms, "-", f"{opened}*"))
    print(
        f"{calls} calls x {turns} turns, RTT {rtt * 1e3:.0f} ms (TLS emulators via latency relay)"
    )
    print(
        f"{'framework':<9} {'mode':<9} {'start p50':>9} {'max':>8} {'1st turn':>10}"
        f" {'later':>10} {'1st/lat':>7} {'misses':>6} {'in call':>7}"
    )
    for row in rows:
        print(row)
    print("start: Pipecat pipeline start; LiveKit job ready (pools started with the room join).")
    print("||: LiveKit jobs overlapping in this one process (LiveKit itself runs one per process).")
    print("in call: connections a call waited for (Pipecat). *LiveKit: all handshakes of the")
    print("jobs (pooled: opened during the join, per job: inside the first turn).")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--rtt", type=float, default=0.040)
    args = parser.parse_args()
    asyncio.run(main(args.calls, args.turns, args.rtt))

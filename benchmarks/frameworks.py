"""Pipecat and LiveKit Agents on voicepool pools vs their own per-call connections, in one run.

    .venv/bin/python benchmarks/frameworks.py [--rounds 3] [--calls 10] [--turns 3] [--rtt 0.040]
                                              [--steady 10] [--inline] [--uvloop]
                                              [--only pipecat|livekit] [--gc-freeze]

The TLS emulators (Deepgram, ElevenLabs, OpenAI-compatible HTTP/2) run behind the demo's latency
relay (``latency_proxy``: ``--rtt`` round trip, plus a round trip for each TCP handshake), in a
child process (``pipecat_bot.spawned_services``) as a real worker has its providers elsewhere:
otherwise their TLS, framing and relays take a tenth to a quarter of the CPU of the event loop
the calls run on (measured: 0.75 -> 0.58 s of this process's CPU per pooled 10-call round).
``--inline``: in this process (``emulated_services``), as before. The call drivers are
examples/pipecat_bot.py and examples/livekit_agent.py:

* Pipecat: ``--calls`` overlapping calls (one arriving every 50 ms: call n starts while the n
  before it are in progress), each a pipeline audio in -> Deepgram STT -> OpenAI LLM ->
  ElevenLabs TTS -> audio out; ``start`` is the pipeline's start (``pipecat_bot.run_call``: from
  the first step of ``WorkerRunner.run()`` until the StartFrame has crossed the pipeline, every
  service set up: connected or leased), a turn is VAD stop -> first audio. ``peak`` rows
  (``--steady`` newcomers, 0 to skip): each new call arrives while ``--calls`` - 1 others are
  in progress (``run_steady``: what a worker at its peak sees; the newcomers' figures). ``alone``:
  one call with no other running (the start's own cost, no contention). ``lease``: the time the
  pooled services spent in voicepool (``PipecatPools.lease_socket``) per start. ``cpu wait``:
  of each start, the time the worker's thread was ready to run while another process had the
  CPU (the kernel's run-queue wait, ``/proc/thread-self/schedstat``), median per call: on a
  shared machine, the part of ``start`` that is the machine's load, not the worker.
* LiveKit: ``--calls`` jobs one after another (LiveKit runs one job per process), each a real
  ``AgentSession`` (Deepgram STT, OpenAI LLM, ElevenLabs TTS plugins; no LiveKit server: no
  room, audio in and out set in-process, a fake JobContext whose room join takes one round
  trip); pooled on a PooledSession with the pools started during the join, or per job on a plain
  aiohttp session. ``start`` is the job's ready time (entrypoint until the session started: the
  join, and the pools when pooled); a turn is the end of the user's audio -> first reply audio.

``--gc-freeze``: ``gc.freeze()`` before the runs, as a long-lived worker does at boot (the
frameworks' imports leave ~400k objects to the collector: a full collection then stops the loop
~250 ms on this machine, measured 164 ms inside one 10-call ramp).

Every round runs each mode once, pooled then per call (paired: ratios within a round hold on a
loaded machine), after one unmeasured warm-up call per mode (the frameworks and SDKs import and
build things on first use: a process cost, not a call's). Each row is the median over rounds of
the per-round medians (``max``: the largest single value); ``first/later`` is the first turn's
median over the later turns' median. ``in call``: connections a call waited for (Pipecat:
leases that found no idle socket, plus HTTP/2 connects; LiveKit pooled: leases that found no idle
socket; per call / per job: every handshake of the calls). Targets (issue 14): Pipecat start
<= 10 ms pooled, first turn pooled within 10% of later turns, 0 misses, 0 connections in calls.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import livekit_agent as lk  # noqa: E402
import pipecat_bot as bot  # noqa: E402

from voicepool.integrations import pipecat as vp_pipecat  # noqa: E402

Row = dict[str, Any]


class _LeaseClock:
    """Time spent in ``PipecatPools.lease_socket`` (voicepool's part of a pooled start)."""

    def __init__(self) -> None:
        self.ms: list[float] = []
        self._real = vp_pipecat.PipecatPools.lease_socket

    def install(self) -> None:
        real = self._real
        spent = self.ms

        async def lease_socket(pools: vp_pipecat.PipecatPools, url: str) -> Any:
            t0 = time.perf_counter()
            try:
                return await real(pools, url)
            finally:
                spent.append((time.perf_counter() - t0) * 1e3)

        vp_pipecat.PipecatPools.lease_socket = lease_socket  # type: ignore[method-assign,assignment]


def _summary(
    starts: list[float],
    turns: list[list[float]],
    misses: int,
    inside: int,
    waits: list[float] | None = None,
) -> Row:
    first = statistics.median(t[0] for t in turns)
    later = statistics.median(x for t in turns for x in t[1:])
    waited = [w for w in waits or () if not math.isnan(w)]
    return {
        "start": statistics.median(starts),
        "max": max(starts),
        "wait": statistics.median(waited) if waited else math.nan,
        "first": first,
        "later": later,
        "ratio": first / later,
        "misses": misses,
        "inside": inside,
    }


async def _pipecat(stack: bot.Stack, pooled: bool, calls: int, turns: int, steady: int = 0) -> Row:
    run = await bot.measure(stack, pooled_run=pooled, calls=calls, turns=turns, steady=steady)
    return _summary(
        [r.start_ms for r in run.results],
        [r.turn_ms for r in run.results],
        run.misses,
        run.opened_in_calls,
        [r.start_cpu_wait_ms for r in run.results],
    )


async def _pipecat_alone(stack: bot.Stack, pooled: bool, calls: int) -> float:
    """Median start of ``calls`` calls run one at a time (one turn each)."""
    if not pooled:
        own = bot._PipecatOwn
        await bot.run_call(bot.make_services(stack, module=own), 1)  # warm-up
        starts = [
            (await bot.run_call(bot.make_services(stack, module=own), 1)).start_ms
            for _ in range(calls)
        ]
        return statistics.median(starts)
    pools = vp_pipecat.PipecatPools(
        concurrency=2, audio_in_sample_rate=bot.IN_RATE, audio_out_sample_rate=bot.OUT_RATE
    )
    pools.declare(*bot.make_services(stack))
    async with pools:
        await bot.run_call(bot.make_services(stack), 1)  # warm-up
        starts = []
        for _ in range(calls):
            await bot.pools_full(pools)
            starts.append((await bot.run_call(bot.make_services(stack), 1)).start_ms)
    return statistics.median(starts)


async def _livekit(stack: bot.Stack, pooled: bool, jobs: int, turns: int) -> Row:
    await lk.run_job(stack, pooled=pooled, turns=1)  # warm-up
    before = await stack.handshakes()
    results = [
        await lk.run_job(stack, pooled=pooled, turns=turns, join=stack.rtt) for _ in range(jobs)
    ]
    inside = sum(r.cold_leases for r in results) if pooled else await stack.handshakes() - before
    return _summary(
        [r.ready_ms for r in results],
        [r.turn_ms for r in results],
        sum(r.misses for r in results),
        inside,
    )


def _median_rows(rows: list[Row]) -> Row:
    out: Row = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    waits = [r["wait"] for r in rows if not math.isnan(r["wait"])]
    out["wait"] = statistics.median(waits) if waits else math.nan
    out["max"] = max(r["max"] for r in rows)
    out["misses"] = sum(r["misses"] for r in rows)
    out["inside"] = sum(r["inside"] for r in rows)
    return out


def _line(framework: str, mode: str, r: Row) -> str:
    wait = "-" if math.isnan(r["wait"]) else f"{r['wait']:.1f}"
    return (
        f"{framework:<9} {mode:<13} {r['start']:>9.1f} {r['max']:>8.1f} {wait:>8}"
        f" {r['first']:>9.0f}"
        f" {r['later']:>8.0f} {r['ratio']:>7.2f} {r['misses']!s:>6} {r['inside']!s:>7}"
    )


async def main(
    rounds: int,
    calls: int,
    turns: int,
    rtt: float,
    loop_name: str,
    steady: int,
    inline: bool,
    frameworks: tuple[str, ...] = ("pipecat", "livekit"),
    gc_freeze: bool = False,
) -> None:
    from loguru import logger

    logger.remove()  # Pipecat logs every frame at DEBUG
    logger.add(sys.stderr, level="ERROR")
    clock = _LeaseClock()
    clock.install()
    if gc_freeze:
        # What a long-lived worker does at boot: the ~400k objects of the frameworks' imports
        # leave the collector's reach, so a full collection scans the calls' objects only
        # (otherwise ~250 ms with the whole loop stopped, whichever calls it lands on).
        gc.collect()
        gc.freeze()
    modes: dict[tuple[str, str], list[Row]] = {}
    alone: dict[str, list[float]] = {"pooled": [], "per call": []}
    per_round: list[str] = []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    services = bot.emulated_services if inline else bot.spawned_services
    async with services(rtt) as stack:
        runs: list[tuple[str, str, Callable[[], Awaitable[Row]]]] = []
        for pooled in (True, False) if "pipecat" in frameworks else ():
            runs.append(
                (
                    "pipecat",
                    "pooled" if pooled else "per call",
                    partial(_pipecat, stack, pooled, calls, turns),
                )
            )
        for pooled in (True, False) if steady and "pipecat" in frameworks else ():
            runs.append(
                (
                    "pipecat",
                    "peak pooled" if pooled else "peak per call",
                    partial(_pipecat, stack, pooled, calls, turns, steady),
                )
            )
        for pooled in (True, False) if "livekit" in frameworks else ():
            runs.append(
                (
                    "livekit",
                    "pooled" if pooled else "per job",
                    partial(_livekit, stack, pooled, calls, turns),
                )
            )
        for n in range(rounds):
            for framework, label, run in runs:
                row = await run()
                modes.setdefault((framework, label), []).append(row)
                wait = "" if math.isnan(row["wait"]) else f" (cpu wait p50 {row['wait']:.1f})"
                per_round.append(
                    f"round {n + 1} {framework} {label}: start p50 {row['start']:.1f} ms{wait},"
                    f" first/later {row['ratio']:.2f}, load {os.getloadavg()[0]:.1f}"
                )
            for pooled in (True, False) if "pipecat" in frameworks else ():
                label = "pooled" if pooled else "per call"
                alone[label].append(await _pipecat_alone(stack, pooled, 5))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"{rounds} rounds x {calls} calls x {turns} turns (peak: {steady} newcomers), RTT"
        f" {rtt * 1e3:.0f} ms (TLS emulators via latency relay,"
        f" {'in this process' if inline else 'in a child process'}), {loop_name}"
        f"{', gc.freeze() at boot' if gc_freeze else ''}; this process:"
        f" {cpu:.1f} s CPU in {wall:.1f} s;"
        f" machine load average {load:.1f} on {os.cpu_count()} CPUs"
    )
    for line in per_round:
        print("  " + line)
    print(
        f"{'framework':<9} {'mode':<13} {'start p50':>9} {'max':>8} {'cpu wait':>8}"
        f" {'1st turn':>9}"
        f" {'later':>8} {'1st/lat':>7} {'misses':>6} {'in call':>7}"
    )
    for (framework, label), rows in modes.items():
        print(_line(framework, label, _median_rows(rows)))
    leases = sorted(clock.ms)
    if leases:
        print(
            f"pipecat start, one call alone (median over rounds): pooled"
            f" {statistics.median(alone['pooled']):.1f} ms, per call"
            f" {statistics.median(alone['per call']):.1f} ms; time in voicepool per pooled lease:"
            f" p50 {statistics.median(leases):.2f} ms, max {leases[-1]:.2f} ms"
            f" ({len(leases)} leases)"
        )
    print("start: Pipecat pipeline start; LiveKit job ready (join of one RTT; pooled: the pools")
    print("start with it). peak: a new call arriving while the others are in progress.")
    print("cpu wait: of each start, the time this process was ready to run while another had the")
    print("CPU (kernel run-queue wait: the shared machine's part). in call: connections a call")
    print("waited for (see the module doc).")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--rtt", type=float, default=0.040)
    parser.add_argument(
        "--steady", type=int, default=10, help="peak rows: new calls while the others run"
    )
    parser.add_argument(
        "--inline", action="store_true", help="the emulators in this process, not in a child"
    )
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop (extra uvloop)")
    parser.add_argument(
        "--only", choices=("pipecat", "livekit"), help="one framework's rows (default: both)"
    )
    parser.add_argument(
        "--gc-freeze", action="store_true", help="gc.freeze() after the imports, as at worker boot"
    )
    args = parser.parse_args()
    runner: Any = asyncio.run
    if args.uvloop:
        import uvloop

        runner = uvloop.run
    loop_name = "uvloop" if args.uvloop else "asyncio"
    runner(
        main(
            args.rounds,
            args.calls,
            args.turns,
            args.rtt,
            loop_name,
            args.steady,
            args.inline,
            (args.only,) if args.only else ("pipecat", "livekit"),
            args.gc_freeze,
        )
    )

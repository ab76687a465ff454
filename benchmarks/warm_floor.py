"""Fixed warm floor (sized for the peak) vs ``warm = "adaptive"`` over the same simulated day.

The traffic (voicepool.testing.traffic, virtual time, the real PoolCore): a diurnal curve from 2
to 40 concurrent calls plus bursts of 10 calls within one second (2 an hour): a peak of 50;
log-normal call durations (median 120 s), log-normal connect times (median 250 ms). Each pool
runs two days and is measured on the second (a worker that has been running: the adaptive
policy learnt day one's bursts). Both pools are EXCLUSIVE with ``concurrency=50`` (max_size 63);
fixed keeps all 63 open, adaptive keeps in use plus the 99.9% quantile of arrivals within one
connect time, and the bursts it has seen.

Printed per seed, the same calls for both (the trace is drawn from the seed alone): the share of
acquires that waited for a handshake, idle socket-seconds (open and not held: what a time-billed
provider bills), connects. Goal (issue 16): adaptive waits <= 0.1% and no more than fixed; at
least 50% fewer idle socket-seconds.

    .venv/bin/python benchmarks/warm_floor.py [--seeds 3]
    .venv/bin/python benchmarks/warm_floor.py --real [--real-seconds 120]   # both, one run
    .venv/bin/python benchmarks/warm_floor.py --seeds 0 --real               # real only

``--real``: the simulator checked against real sockets. A compressed day (``--real-seconds``,
diurnal 1 to 8 calls plus bursts of 4, calls of median 2 s) is replayed by
``voicepool.testing.traffic.replay`` against the Deepgram emulator over TLS behind FaultProxy
(40 ms each way), EXCLUSIVE (``reuse=True``, Finalize as the reset) and SINGLE_USE (Deepgram's
default), fixed and adaptive. Then the simulator runs the same calls (as they really ran:
arrivals and holds, late timers included), the handshake times the real pool measured (replayed
in order), its ping interval and ping time and its timer's ticks, over the same span; idle
socket-seconds are counted the same way in both (open sockets minus held leases, integrated
exactly). ``plan`` rows: the simulator on the calls as planned instead. Goal: within 10%.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import time
from dataclasses import dataclass

from voicepool import LeaseMode, PoolSettings
from voicepool.testing.traffic import (
    DAY,
    Call,
    Replay,
    SimResult,
    Traffic,
    TrafficSim,
    diurnal,
    replay,
)

BACKGROUND_PEAK = 40.0  # concurrency of the diurnal curve at its peak; bursts add 10


def traffic() -> Traffic:
    return Traffic(
        concurrency=diurnal(BACKGROUND_PEAK, 2.0),
        max_concurrency=BACKGROUND_PEAK,
        burst=10,
        bursts_per_hour=2.0,
    )


def day(warm: str, seed: int) -> tuple[SimResult, int, tuple[int, int]]:
    """Day two's figures, the peak held, and (calls, waits) of day one's first hour (a cold
    worker: nothing learnt yet)."""
    settings = PoolSettings.model_validate({"concurrency": 50, "warm": warm})
    sim = TrafficSim(settings, traffic(), seed=seed)
    calls = sim.calls(2 * DAY)
    result = sim.run(2 * DAY, measure_from=DAY, trace=calls)
    cold = (sum(1 for t, _ in calls if t < 3600), sum(1 for t in sim.waited_at if t < 3600))
    return result, sim.max_held, cold


@dataclass
class Compressed:
    """A day in ``seconds``: diurnal ``peak / 20`` (at least 1) to ``peak`` calls plus bursts
    of ``burst`` calls within a second, one every 20 s; calls of median 2 s."""

    seconds: float
    peak: float = 8.0
    burst: int = 4

    def traffic(self) -> Traffic:
        return Traffic(
            concurrency=diurnal(self.peak, max(1.0, self.peak / 20), day=self.seconds),
            max_concurrency=self.peak,
            median=2.0,
            sigma=0.5,
            burst=self.burst,
            bursts_per_hour=3600 / 20,
        )

    def settings(self, warm: str, mode: LeaseMode) -> PoolSettings:
        return PoolSettings.model_validate(
            {
                "concurrency": math.ceil(self.peak) + self.burst,
                "warm": warm,
                "warm_window": 10.0,
                "lease_mode": mode.value,
            }
        )


async def real_run(
    day: Compressed, warm: str, mode: LeaseMode, seed: int
) -> tuple[Replay, list[Call]]:
    """The compressed day's calls over real sockets (Deepgram emulator, TLS, FaultProxy)."""
    from voicepool.adapters.deepgram import DeepgramAdapter
    from voicepool.testing.asr import DeepgramEmulator
    from voicepool.testing.faultproxy import FaultProxy

    settings = day.settings(warm, mode)
    trace = TrafficSim(settings, day.traffic(), seed=seed).calls(day.seconds)
    async with (
        DeepgramEmulator(tls=True, api_key="k" * 40, idle_timeout=None) as dg,
        FaultProxy("127.0.0.1", dg.port, latency=0.04) as proxy,
    ):
        adapter = DeepgramAdapter(
            url=f"wss://127.0.0.1:{proxy.port}",
            api_key="k" * 40,
            ca_file=dg.ca_file,
            reuse=mode is LeaseMode.EXCLUSIVE,  # Finalize as the reset: Deepgram reused
        )
        return await replay(adapter, settings, trace, name=warm), trace


def _apart(real: float, sim: float) -> float:
    return abs(real - sim) / sim if sim else (0.0 if real == sim else math.inf)


def real(day: Compressed, seed: int, modes: list[LeaseMode]) -> bool:
    """Each pool over real sockets, then the simulator on the same calls (as they ran, and as
    planned) with the handshake times the real pool measured. True if within 10%."""
    print(
        f"real sockets: a {day.seconds:g} s compressed day (peak {day.peak:g} calls, bursts of"
        f" {day.burst}), seed {seed} (Deepgram emulator, TLS, FaultProxy 40 ms each way);"
        " sim = the simulator on the calls as they ran, the measured handshakes replayed in"
        " order; plan = on the planned calls"
    )
    print(
        f"{'mode':>10} {'pool':>8} {'run':>5} {'acquires':>8} {'waited':>6} {'wait %':>7}"
        f" {'idle sock-s':>11} {'connects':>8}"
    )
    ok = True
    for mode in modes:
        rows: dict[str, tuple[Replay, SimResult]] = {}
        for warm in ("fixed", "adaptive"):
            r, trace = asyncio.run(real_run(day, warm, mode, seed))
            settings = day.settings(warm, mode)
            obs = r.simulate(settings, mode)
            plan = r.simulate(settings, mode, trace=trace)
            ct = sorted(r.connect_times)
            print(
                f"{mode.value:>10} {warm:>8} {'real':>5} {r.acquires:>8} {r.waited:>6}"
                f" {r.wait_share:>7.2%} {r.idle_time:>11.1f} {len(ct):>8}"
                f"   (pool's own idle_time {r.core_idle_time:.1f}; handshake median"
                f" {statistics.median(ct) * 1e3:.0f} ms, max {ct[-1] * 1e3:.0f} ms)"
            )
            for label, s in (("sim", obs), ("plan", plan)):
                idle_d = _apart(r.idle_time, s.idle_time)
                wait_d = abs(r.waited - s.waited) / max(r.waited, s.waited, 1)
                # A handful of waits: one call apart is as close as two runs can be.
                wait_ok = abs(r.waited - s.waited) <= max(1, 0.1 * max(r.waited, s.waited))
                print(
                    f"{mode.value:>10} {warm:>8} {label:>5} {s.acquires:>8} {s.waited:>6}"
                    f" {s.wait_share:>7.2%} {s.idle_time:>11.1f} {s.connects:>8}"
                    f"   real vs {label}: idle {idle_d:.1%} apart, waits {wait_d:.1%} apart"
                )
                if label == "sim":
                    ok = ok and idle_d <= 0.1 and wait_ok
            rows[warm] = (r, plan)
        (fr, fs), (ar, as_) = rows["fixed"], rows["adaptive"]
        print(
            f"{mode.value:>10}  adaptive vs fixed: idle socket-seconds"
            f" x{ar.idle_time / fr.idle_time:.2f} (sim on the planned calls:"
            f" x{as_.idle_time / fs.idle_time:.2f}), wait share {ar.wait_share:.2%} vs"
            f" {fr.wait_share:.2%} (sim: {as_.wait_share:.2%} vs {fs.wait_share:.2%}),"
            f" connects {len(ar.connect_times)} vs {len(fr.connect_times)}"
        )
    print(
        "goal (real within 10% of the simulator: idle socket-seconds, and waits within 10% or"
        " one call):",
        "met" if ok else "NOT met",
    )
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--real", action="store_true")
    ap.add_argument("--real-seconds", type=float, default=120.0)
    ap.add_argument("--real-seed", type=int, default=1)
    ap.add_argument("--modes", default="exclusive,single_use")
    ap.add_argument("--real-peak", type=float, default=8.0)
    ap.add_argument("--real-burst", type=int, default=4)
    args = ap.parse_args()
    if args.seeds:
        simulated(args.seeds)
    if args.real:
        day = Compressed(args.real_seconds, args.real_peak, args.real_burst)
        real(day, args.real_seed, [LeaseMode(m) for m in args.modes.split(",")])


def simulated(seeds: int) -> None:
    print(
        f"{'seed':>4} {'pool':>8} {'peak':>4} {'acquires':>8} {'waited':>6} {'wait %':>7}"
        f" {'idle sock-s':>11} {'connects':>8} {'sim s':>5}"
    )
    ok = True
    for seed in range(1, seeds + 1):
        rows = {}
        for warm in ("fixed", "adaptive"):
            t0 = time.perf_counter()
            r, peak, (cold_calls, cold_waits) = day(warm, seed)
            rows[warm] = r
            print(
                f"{seed:>4} {warm:>8} {peak:>4} {r.acquires:>8} {r.waited:>6}"
                f" {r.wait_share:>7.3%} {r.idle_time:>11.0f} {r.connects:>8}"
                f" {time.perf_counter() - t0:>5.1f}   cold first hour: {cold_waits} of"
                f" {cold_calls} waited"
            )
        f, a = rows["fixed"], rows["adaptive"]
        saved = 1 - a.idle_time / f.idle_time
        good = a.wait_share <= 0.001 and a.wait_share <= f.wait_share and saved >= 0.5
        ok = ok and good
        print(
            f"{seed:>4}  adaptive vs fixed: idle socket-seconds {saved:.1%} fewer,"
            f" wait share {a.wait_share:.3%} vs {f.wait_share:.3%}: {'ok' if good else 'MISSED'}"
        )
    print("goal (wait <= 0.1%, <= fixed, idle >= 50% fewer):", "met" if ok else "NOT met")


if __name__ == "__main__":
    main()

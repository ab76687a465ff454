"""Fixed warm floor (sized for the peak) vs ``warm = "adaptive"`` over the same simulated day.

The traffic (voicepool.testing.traffic, virtual time, the real PoolCore): a diurnal curve from 2
to 40 concurrent calls plus bursts of 10 calls within one second (2 an hour): a peak of 50;
log-normal call durations (median 120 s), log-normal connect times (median 250 ms). Each pool
runs two days and is measured on the second (a worker that has been running: the adaptive
policy learnt day one's bursts). Both pools are EXCLUSIVE with ``concurrency=50`` (max_size 63);
fixed keeps all 63 open, adaptive keeps in use plus the 99.9% quantile of arrivals within one
connect time, and the bursts it has seen.

Printed per seed, same arrivals for both: the share of acquires that waited for a handshake,
idle socket-seconds (what a time-billed provider bills), connects. Goal (issue 16): adaptive
waits <= 0.1% and no more than fixed; at least 50% fewer idle socket-seconds.

    .venv/bin/python benchmarks/warm_floor.py [--seeds 3]
    .venv/bin/python benchmarks/warm_floor.py --real [--real-seconds 120]

``--real``: the same policy over real sockets: a compressed day (``--real-seconds``, diurnal 1 to
8 calls plus bursts of 4, calls of median 2 s) against the Deepgram emulator over TLS behind
FaultProxy latency (SINGLE_USE, Deepgram's mode), then the simulator on the same arrivals with
the connect times the real run measured; idle socket-seconds and wait shares side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import time
from typing import Any

from voicepool import LeaseMode, PoolSettings
from voicepool.testing.traffic import DAY, Replay, SimResult, Traffic, TrafficSim, diurnal, replay

BACKGROUND_PEAK = 40.0  # concurrency of the diurnal curve at its peak; bursts add 10


def traffic() -> Traffic:
    return Traffic(
        concurrency=diurnal(BACKGROUND_PEAK, 2.0),
        max_concurrency=BACKGROUND_PEAK,
        burst=10,
        bursts_per_hour=2.0,
    )


def day(warm: str, seed: int) -> tuple[SimResult, int]:
    settings = PoolSettings.model_validate({"concurrency": 50, "warm": warm})
    sim = TrafficSim(settings, traffic(), seed=seed)
    result = sim.run(2 * DAY, measure_from=DAY)
    return result, sim.max_held


def compressed(seconds: float) -> Traffic:
    return Traffic(
        concurrency=diurnal(8.0, 1.0, day=seconds),
        max_concurrency=8.0,
        median=2.0,
        sigma=0.5,
        burst=4,
        bursts_per_hour=3600 / 20,
    )


def compressed_settings(warm: str, mode: LeaseMode) -> PoolSettings:
    return PoolSettings.model_validate(
        {"concurrency": 12, "warm": warm, "warm_window": 10.0, "lease_mode": mode.value}
    )


async def real_run(warm: str, mode: LeaseMode, seconds: float, seed: int) -> tuple[Replay, Any]:
    """The compressed day's calls over real sockets (Deepgram emulator, TLS, FaultProxy)."""
    from voicepool.adapters.deepgram import DeepgramAdapter
    from voicepool.testing.asr import DeepgramEmulator
    from voicepool.testing.faultproxy import FaultProxy

    settings = compressed_settings(warm, mode)
    trace = TrafficSim(settings, compressed(seconds), seed=seed).calls(seconds)
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


def real(seconds: float, seed: int, modes: list[LeaseMode]) -> bool:
    """Each pool over real sockets, then the simulator on the same calls (as they ran, and as
    planned) with the handshake times the real pool measured. True if within 10%."""
    print(
        f"real sockets: a {seconds:g} s compressed day, seed {seed} (Deepgram emulator, TLS,"
        " FaultProxy 40 ms each way); sim = the simulator on the calls as they ran, the"
        " measured handshakes replayed in order; plan = on the planned calls"
    )
    print(
        f"{'mode':>10} {'pool':>8} {'run':>5} {'acquires':>8} {'waited':>6} {'wait %':>7}"
        f" {'idle sock-s':>11} {'connects':>8}"
    )
    ok = True
    for mode in modes:
        for warm in ("fixed", "adaptive"):
            r, trace = asyncio.run(real_run(warm, mode, seconds, seed))
            settings = compressed_settings(warm, mode)
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
                print(
                    f"{mode.value:>10} {warm:>8} {label:>5} {s.acquires:>8} {s.waited:>6}"
                    f" {s.wait_share:>7.2%} {s.idle_time:>11.1f} {s.connects:>8}"
                    f"   real vs {label}: idle {idle_d:.1%} apart, waits {wait_d:.1%} apart"
                )
                if label == "sim":
                    ok = ok and idle_d <= 0.1 and wait_d <= 0.1
    print("goal (real within 10% of the simulator, idle and waits):", "met" if ok else "NOT met")
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--real", action="store_true")
    ap.add_argument("--real-seconds", type=float, default=120.0)
    ap.add_argument("--real-seed", type=int, default=1)
    ap.add_argument("--modes", default="exclusive,single_use")
    args = ap.parse_args()
    if args.real:
        real(args.real_seconds, args.real_seed, [LeaseMode(m) for m in args.modes.split(",")])
        return
    print(
        f"{'seed':>4} {'pool':>8} {'peak':>4} {'acquires':>8} {'waited':>6} {'wait %':>7}"
        f" {'idle sock-s':>11} {'connects':>8} {'sim s':>5}"
    )
    ok = True
    for seed in range(1, args.seeds + 1):
        rows = {}
        for warm in ("fixed", "adaptive"):
            t0 = time.perf_counter()
            r, peak = day(warm, seed)
            rows[warm] = r
            print(
                f"{seed:>4} {warm:>8} {peak:>4} {r.acquires:>8} {r.waited:>6}"
                f" {r.wait_share:>7.3%} {r.idle_time:>11.0f} {r.connects:>8}"
                f" {time.perf_counter() - t0:>5.1f}"
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

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
"""

from __future__ import annotations

import argparse
import time

from voicepool import PoolSettings
from voicepool.testing.traffic import DAY, SimResult, Traffic, TrafficSim, diurnal

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
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

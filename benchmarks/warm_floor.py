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
import random
import statistics
import time
from typing import Any

from voicepool import LeaseMode, Pool, PoolSettings
from voicepool._engine.observer import PoolObserver
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


class _ConnectTimes(PoolObserver):
    def __init__(self) -> None:
        self.durations: list[float] = []

    def on_connected(
        self, pool: Pool[Any], token: object, duration: float, error: BaseException | None
    ) -> None:
        if error is None:
            self.durations.append(duration)


def compressed(seconds: float) -> Traffic:
    return Traffic(
        concurrency=diurnal(8.0, 1.0, day=seconds),
        max_concurrency=8.0,
        median=2.0,
        sigma=0.5,
        burst=4,
        bursts_per_hour=3600 / 20,
    )


def compressed_settings(warm: str) -> PoolSettings:
    return PoolSettings.model_validate(
        {"concurrency": 12, "warm": warm, "warm_window": 10.0, "lease_mode": "single_use"}
    )


async def real_run(warm: str, seconds: float, seed: int) -> tuple[int, int, float, list[float]]:
    """The compressed day over real sockets: (acquires, waited, idle socket-s, connect times)."""
    from voicepool.adapters.deepgram import DeepgramAdapter
    from voicepool.testing.asr import DeepgramEmulator
    from voicepool.testing.faultproxy import FaultProxy

    traffic = compressed(seconds)
    arrivals = TrafficSim(compressed_settings(warm), traffic, seed=seed).arrivals(seconds)
    rng = random.Random(seed + 7)
    times = _ConnectTimes()
    async with (
        DeepgramEmulator(tls=True, api_key="k" * 40, idle_timeout=None) as dg,
        FaultProxy("127.0.0.1", dg.port, latency=0.04) as proxy,
    ):
        adapter = DeepgramAdapter(
            url=f"wss://127.0.0.1:{proxy.port}", api_key="k" * 40, ca_file=dg.ca_file
        )
        pool = Pool(adapter, compressed_settings(warm), name=warm, observers=[times])
        async with pool:
            loop = asyncio.get_running_loop()
            t0 = loop.time()

            async def call(at: float) -> None:
                await asyncio.sleep(max(0.0, at - (loop.time() - t0)))
                async with pool.acquire(timeout=5.0):
                    await asyncio.sleep(traffic.median * math.exp(rng.gauss(0, traffic.sigma)))

            async with asyncio.timeout(seconds + 60):
                await asyncio.gather(*(call(t) for t in arrivals))
            st = pool.stats()
    return st.acquired + st.timeouts, st.waited, st.idle_time, times.durations


def real(seconds: float) -> None:
    print(f"real sockets: a {seconds:g} s compressed day (Deepgram emulator, TLS, FaultProxy)")
    print(f"{'pool':>8} {'run':>5} {'acquires':>8} {'waited':>6} {'wait %':>7} {'idle sock-s':>11}")
    for warm in ("fixed", "adaptive"):
        acq, waited, idle, durations = asyncio.run(real_run(warm, seconds, 1))
        print(f"{warm:>8} {'real':>5} {acq:>8} {waited:>6} {waited / acq:>7.2%} {idle:>11.1f}")
        logs = [math.log(d) for d in durations]
        traffic = compressed(seconds)
        traffic.connect_median = math.exp(statistics.median(logs))
        traffic.connect_sigma = statistics.pstdev(logs)
        r = TrafficSim(compressed_settings(warm), traffic, seed=1, mode=LeaseMode.SINGLE_USE).run(
            seconds + 10, calls_until=seconds
        )
        diff = abs(idle - r.idle_time) / r.idle_time
        print(
            f"{warm:>8} {'sim':>5} {r.acquires:>8} {r.waited:>6} {r.wait_share:>7.2%}"
            f" {r.idle_time:>11.1f}   idle real vs sim: {diff:.1%} apart"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--real", action="store_true")
    ap.add_argument("--real-seconds", type=float, default=120.0)
    args = ap.parse_args()
    if args.real:
        real(args.real_seconds)
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

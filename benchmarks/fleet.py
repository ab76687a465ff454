"""Fleet quotas (issue 15) on a real redis-server: what the quota costs, and whether it holds.

One run prints:

1. warm acquire + release with a quota vs the same pool without one, ratio PAIRED PER ROUND
   (median over rounds; target <= 1.05x): the warm path never touches the quota;
2. an acquire that needs a Redis round trip (an empty reservation: one sync, then the connect)
   against the same cold acquire without a quota, interleaved per sample: p50 / p99 / p99.9 of
   each and the p99 added (target: p99 added <= 1 ms on loopback); beside them, for scale, the
   same acquire with the ask through redis-py's client (``direct=False``), one urgent
   ``FleetQuota.sync`` alone, and a redis-py PING;
3. the time for an idle spare in one worker to move to a starved worker (default refresh 1 s;
   target <= 2 s);
4. the 100-worker simulation: 100 pools, each with its own FleetQuota client (its own Redis
   connection and worker id), in one process, sharing one account; a call load that moves
   between them, and a Redis restart (data lost) in the middle; it prints Redis operations per
   second, the keys' memory, and the worst-case over-commit (connections open or closing across
   the fleet above the limit, sampled every 5 ms; must be 0).

Run: ``.venv/bin/python benchmarks/fleet.py [--rounds 15] [--n 20000] [--samples 2000]
[--workers 100] [--only 2] [--uvloop]``
(needs redis-server: scripts/install-system-deps.sh).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from acquire import Conn, NullAdapter  # benchmarks/acquire.py: costless connections

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.peers.redis import RedisServer, redis_available
from voicepool import LeaseMode, Pool, PoolSettings, telemetry
from voicepool.quota import FleetQuota


def pct(values: list[float], p: float) -> float:
    """The ``p`` quantile of ``values`` (nearest rank)."""
    return sorted(values)[min(len(values) - 1, int(p * len(values)))]


def quota(url: str, key: str, limit: int, **kw: Any) -> dict[str, Any]:
    return {"key": key, "limit": limit, "backend": url, **kw}


async def warm_ratio(url: str, rounds: int, n: int) -> float:
    base = {"min_size": 10, "max_size": 10, "idle_timeout": None}
    plain = Pool(NullAdapter(), PoolSettings.model_validate(base), name="plain")
    fleet = FleetQuota(url)
    q = PoolSettings.model_validate({**base, "quota": quota(url, "warm", 100)})
    quoted = Pool(NullAdapter(), q, name="quota", quota=fleet)
    await plain.start()
    await quoted.start()

    async def run(pool: Pool[Conn], n: int = n) -> float:
        t0 = time.perf_counter_ns()
        for _ in range(n):
            async with pool.acquire():
                pass
        return (time.perf_counter_ns() - t0) / n

    for _ in range(2):
        await run(plain)
        await run(quoted)
    gc.collect()
    gc.disable()  # no collection lands in one pool's slice and not the other's
    ratios = []
    chunks = 10  # each round alternates the two pools in ten slices: drift hits both alike
    for r in range(rounds):
        a = b = 0.0
        for c in range(chunks):
            if (r + c) % 2:
                a += await run(plain, n // chunks)
                b += await run(quoted, n // chunks)
            else:
                b += await run(quoted, n // chunks)
                a += await run(plain, n // chunks)
        ratios.append(b / a)
    gc.enable()
    await plain.aclose()
    await quoted.aclose()
    await fleet.aclose()
    return statistics.median(ratios)


async def round_trip_added(url: str, samples: int, warmup: int) -> dict[str, list[float]]:
    """Milliseconds per sample of: a cold acquire without quota (``plain``); the same with an
    empty reservation, so it waits for one sync (``quota``: the real path, urgent ask on the
    direct connection); the same with ``direct=False`` (``client``: the ask through redis-py's
    client); one urgent ``FleetQuota.sync`` alone (``sync``); a redis-py PING (``ping``: the
    floor of a round trip through redis-py on this machine). Each sample measures all five,
    in an order that rotates, so the machine's load hits every arm alike; the first
    ``warmup`` samples (connections, the script's first load) are dropped."""
    fleet = FleetQuota(url)
    via_client = FleetQuota(url, direct=False)
    bare = FleetQuota(url)
    cold = {"min_size": 0, "max_size": 4, "lease_mode": "single_use"}
    s_plain = PoolSettings.model_validate(cold)
    s_quota = [
        PoolSettings.model_validate({**cold, "quota": quota(url, f"rt{k}", 100)}) for k in range(7)
    ]

    async def acquire(pool: Pool[Conn]) -> float:
        await pool.start()
        t0 = time.perf_counter_ns()
        async with pool.acquire():
            pass
        dt = (time.perf_counter_ns() - t0) / 1e6
        await pool.aclose()
        return dt

    async def plain(i: int) -> float:
        return await acquire(Pool(NullAdapter(LeaseMode.SINGLE_USE), s_plain, name="plain"))

    async def quoted(i: int, backend: FleetQuota = fleet) -> float:
        adapter = NullAdapter(LeaseMode.SINGLE_USE)
        return await acquire(Pool(adapter, s_quota[i % 7], name="quota", quota=backend))

    async def client(i: int) -> float:
        return await quoted(i, via_client)

    async def sync(i: int) -> float:
        t0 = time.perf_counter_ns()
        await bare.sync(
            "bare", "h", want=i % 3, claimed=0, waiting=1, busy=0, limit=100, ttl=10.0, urgent=True
        )
        return (time.perf_counter_ns() - t0) / 1e6

    async def ping(i: int) -> float:
        t0 = time.perf_counter_ns()
        await bare._client.ping()
        return (time.perf_counter_ns() - t0) / 1e6

    arms = {"plain": plain, "quota": quoted, "client": client, "sync": sync, "ping": ping}
    names = list(arms)
    out: dict[str, list[float]] = {name: [] for name in names}
    direct = 0
    for i in range(warmup + samples):
        if i == warmup:
            gc.collect()
            direct = fleet.direct_calls
        k = i % len(names)
        for name in names[k:] + names[:k]:
            dt = await arms[name](i)
            if i >= warmup:
                out[name].append(dt)
    # The real path's asks, all on the direct connection (none fell back to redis-py's client).
    out["direct"] = [float(fleet.direct_calls - direct)]
    await fleet.aclose()
    await via_client.aclose()
    await bare.aclose()
    return out


def pcts(values: list[float]) -> str:
    return " / ".join(f"{pct(values, p):.3f}" for p in (0.5, 0.99, 0.999))


async def spare_moves(url: str, rounds: int) -> list[float]:
    """Seconds from a caller queueing in B (no spare, account full with A's idle spares) to
    its lease, at the default refresh (1 s)."""
    out = []
    for r in range(rounds):
        key = f"move{r}"
        a_q, b_q = FleetQuota(url, worker="A"), FleetQuota(url, worker="B")
        a = Pool(
            NullAdapter(),
            PoolSettings.model_validate(
                {"min_size": 10, "max_size": 10, "quota": quota(url, key, 10)}
            ),
            name="asr",
            quota=a_q,
        )
        b = Pool(
            NullAdapter(),
            PoolSettings.model_validate(
                {"min_size": 0, "max_size": 10, "acquire_timeout": 10, "quota": quota(url, key, 10)}
            ),
            name="asr",
            quota=b_q,
        )
        await a.start()
        await b.start()
        await asyncio.sleep(random.uniform(0, 1.0))  # a random phase against A's refresh
        t0 = time.perf_counter()
        async with b.acquire():
            out.append(time.perf_counter() - t0)
        await b.aclose()
        await a.aclose()
        await a_q.aclose()
        await b_q.aclose()
    return out


async def hundred_workers(
    server: RedisServer, workers: int, limit: int, seconds: float
) -> dict[str, Any]:
    """``workers`` pools (SINGLE_USE, sized for 4 calls, 1 spare) share ``limit`` tokens; each
    second the load moves: a random third of the workers carry the calls, fleet demand about
    80% of the limit. Redis restarts (data lost) half-way."""
    url = server.url
    clients = [FleetQuota(url, worker=f"w{i}") for i in range(workers)]
    settings = PoolSettings.model_validate(
        {
            "concurrency": 4,
            "lease_mode": "single_use",
            "acquire_timeout": 5.0,
            "quota": quota(url, "sim", limit),
        }
    )
    pools = [
        Pool(NullAdapter(LeaseMode.SINGLE_USE), settings, name="asr", quota=c) for c in clients
    ]
    await asyncio.gather(*(p.start(require_ready=False) for p in pools))
    probe = FleetQuota(url, worker="probe")
    loop = asyncio.get_running_loop()
    t_start = loop.time()
    end = t_start + seconds
    worst = 0
    served = failed = 0
    why: dict[str, int] = {}
    demand_target = int(limit * 0.8)
    rng = random.Random(7)
    busy: list[int] = [0] * workers

    async def caller(i: int, until: float) -> None:
        nonlocal served, failed
        while loop.time() < until:
            try:
                async with pools[i].acquire():
                    await asyncio.sleep(rng.uniform(0.05, 0.2))
                served += 1
            except Exception as err:
                failed += 1
                why[type(err).__name__] = why.get(type(err).__name__, 0) + 1

    async def sampler() -> None:
        nonlocal worst
        while loop.time() < end:
            used = sum(p.stats().quota_used for p in pools)
            worst = max(worst, used - limit)
            await asyncio.sleep(0.005)

    async def load() -> None:
        while loop.time() < end:
            until = min(end, loop.time() + 1.0)
            active = rng.sample(range(workers), max(1, workers // 3))
            per = max(1, demand_target // len(active))
            tasks = []
            for i in active:
                n = min(4, per)
                busy[i] = n
                tasks += [caller(i, until) for _ in range(n)]
            await asyncio.gather(*tasks)

    async def restart() -> None:
        await asyncio.sleep(seconds / 2)
        await server.restart()

    await asyncio.gather(sampler(), load(), restart())
    elapsed = loop.time() - t_start
    syncs = sum(c.calls for c in clients)  # script calls: Redis's own counter restarted
    memory = 0
    for suffix in ("tokens", "workers", "busy", "waiting", "meta", "held"):
        memory += int(await _retry(probe._client.memory_usage, f"vp:q:{{sim}}:{suffix}") or 0)
    stats = await _retry(probe._client.info, "commandstats")
    usec = float(stats.get("cmdstat_evalsha", {}).get("usec_per_call", 0.0))
    errors = sum(p.stats().quota_backend_errors for p in pools)
    await asyncio.gather(*(p.aclose() for p in pools))
    for c in clients:
        await c.aclose()
    await probe.aclose()
    return {
        "elapsed": elapsed,
        "syncs": syncs,
        "ops_per_s": syncs / elapsed,
        "over_commit": max(0, worst),
        "memory": memory,
        "served": served,
        "failed": failed,
        "backend_errors": errors,
        "why": why,
        "usec": usec,
    }


async def _retry(fn: Any, *args: Any) -> Any:
    """One retry: the first call after a Redis restart may meet the connection it closed."""
    try:
        return await fn(*args)
    except Exception:
        return await fn(*args)


async def main(args: argparse.Namespace) -> None:
    telemetry.disable_default()
    async with RedisServer() as server:
        url = server.url
        if 1 in args.only:
            ratio = await warm_ratio(url, args.rounds, args.n)
            print(f"1. warm acquire+release, quota / no quota: {ratio:.3f}x (target <= 1.05x)")
        if 2 in args.only:
            await _round_trip(url, args)
        if 3 in args.only:
            moves = await spare_moves(url, args.moves)
            print(
                f"3. idle spare to a starved worker (refresh 1 s, {len(moves)} runs): median"
                f" {statistics.median(moves):.2f} s, max {max(moves):.2f} s (target <= 2 s)"
            )
        if 4 in args.only:
            await _simulation(server, args)


async def _round_trip(url: str, args: argparse.Namespace) -> None:
    rt = await round_trip_added(url, args.samples, args.warmup)
    added = pct(rt["quota"], 0.99) - pct(rt["plain"], 0.99)
    print(
        f"2. acquire needing a Redis round trip ({args.samples} samples, interleaved), ms"
        " p50 / p99 / p99.9:\n"
        f"   with quota {pcts(rt['quota'])}; without {pcts(rt['plain'])}:"
        f" p50 added {pct(rt['quota'], 0.5) - pct(rt['plain'], 0.5):.3f} ms,"
        f" p99 added {added:.3f} ms (target <= 1 ms);"
        f" {rt['direct'][0]:.0f} of {len(rt['quota'])} asks on the direct connection\n"
        f"   (the ask through redis-py's client instead: {pcts(rt['client'])};"
        f" one FleetQuota.sync alone: {pcts(rt['sync'])};"
        f" a redis-py PING: {pcts(rt['ping'])})"
    )


async def _simulation(server: RedisServer, args: argparse.Namespace) -> None:
    sim = await hundred_workers(server, args.workers, args.limit, args.seconds)
    print(
        f"4. {args.workers} workers, limit {args.limit}, {sim['elapsed']:.1f} s with a Redis"
        f" restart: {sim['ops_per_s']:.0f} Redis ops/s ({sim['syncs']:.0f} script calls,"
        f" {sim['usec']:.0f} us of Redis CPU each),"
        f" keys {sim['memory'] / 1024:.1f} KiB, {sim['served']:.0f} calls served,"
        f" {sim['failed']:.0f} failed {sim['why'] or ''}, {sim['backend_errors']:.0f} backend"
        " errors;"
        f" worst-case over-commit {sim['over_commit']:.0f} (must be 0)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--moves", type=int, default=5)
    parser.add_argument("--workers", type=int, default=100)
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--only",
        type=lambda v: {int(p) for p in v.split(",")},
        default={1, 2, 3, 4},
        help="the parts to run, e.g. 2 or 1,2 (default: all)",
    )
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    args = parser.parse_args()
    if not redis_available():
        sys.exit("benchmarks/fleet.py needs redis-server (scripts/install-system-deps.sh)")
    print(f"python {sys.version.split()[0]}" + (", uvloop" if args.uvloop else ""))
    if args.uvloop:
        import uvloop

        uvloop.install()
    asyncio.run(main(args))

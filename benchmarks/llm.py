"""LLM over HTTP/2: voicepool's pooled transport vs plain httpx, in one run.

    .venv/bin/python benchmarks/llm.py [--rounds 15] [--streams 300] [--rtt 0.020]

The OpenAI-compatible emulator (``voicepool.testing.llm``) runs in its own process; the client
(and, for part 1, the latency proxy) in this one. Every figure is a median over interleaved
rounds, and the verdicts compare ratios measured in this run (machines here are noisy).

1. Time to first token of the first request of a call, at ``--rtt`` round-trip time through
   ``FaultProxy`` (TLS 1.3, HTTP/2, SSE):
   * ``voicepool``: a pool started at worker boot; the call builds its client on PooledTransport.
   * ``fresh httpx``: a new ``httpx.AsyncClient(http2=True)`` per call (DNS/TCP/TLS/h2 inline).
   * ``shared httpx``: one long-lived client whose connection is already open (the warm figure).
   Target: voicepool within 10% of the warm request.
2. ``--streams`` concurrent 1-second SSE streams, server limit 100 streams per connection:
   voicepool (connections of 100 streams, opened at boot) vs one shared httpx HTTP/2 client
   (which queues streams behind its single connection). Target: voicepool >= 2.5x faster.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import ssl
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx

from voicepool import Pool, PoolSettings
from voicepool.adapters.http2 import H2Connection, Http2Adapter, PooledTransport
from voicepool.testing.faultproxy import FaultProxy

CHAT = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
# Part 1: the first token comes at once, so network round trips dominate.
TTFT_HEADERS = {"x-emulator-ttft": "0", "x-emulator-tokens": "1"}
# Part 2: 0.2 s to the first token, then 4 more at 5 tokens/s: a 1-second stream.
STREAM_TTFT, STREAM_TOKENS, STREAM_RATE = 0.2, 5, 5.0


@contextlib.asynccontextmanager
async def emulator_process() -> AsyncIterator[tuple[int, str]]:
    """Run the emulator in a child process; yield (port, its CA file); stop it by PID."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "voicepool.testing.llm",
        "--ttft",
        str(STREAM_TTFT),
        "--tokens",
        str(STREAM_TOKENS),
        "--tokens-per-second",
        str(STREAM_RATE),
        "--max-concurrent-streams",
        "100",
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            line = (await proc.stdout.readline()).decode()
        found = re.search(r"https://127\.0\.0\.1:(\d+) ca=(\S+)", line)
        if found is None:
            raise RuntimeError(f"emulator did not start: {line!r}")
        yield int(found.group(1)), found.group(2)
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                async with asyncio.timeout(5):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def first_token(http: httpx.AsyncClient, url: str, headers: dict[str, str]) -> float:
    """Seconds from sending the request to the first SSE data line."""
    t0 = time.perf_counter()
    async with http.stream("POST", url, json=CHAT, headers=headers) as resp:
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                return time.perf_counter() - t0
    raise RuntimeError("no data")


async def stream_to_end(http: httpx.AsyncClient, url: str) -> None:
    async with http.stream("POST", url, json=CHAT) as resp:
        resp.raise_for_status()
        async for _ in resp.aiter_bytes():
            pass


def pool_for(url: str, ca: str, settings: PoolSettings) -> Pool[H2Connection]:
    return Pool(Http2Adapter(base_url=url, ca_file=ca), settings, name="llm")


async def part_ttft(port: int, ca: str, rounds: int, rtt: float) -> dict[str, float]:
    ctx = ssl.create_default_context(cafile=ca)
    async with FaultProxy("127.0.0.1", port, latency=rtt / 2) as proxy:
        base = f"https://127.0.0.1:{proxy.port}"
        url = base + "/v1/chat/completions"
        pool = pool_for(base, ca, PoolSettings(min_size=2, max_size=4))
        async with pool, httpx.AsyncClient(http2=True, verify=ctx) as shared:
            await first_token(shared, url, TTFT_HEADERS)  # open the shared client's connection

            async def pooled() -> float:
                async with httpx.AsyncClient(transport=PooledTransport(pool)) as http:
                    return await first_token(http, url, TTFT_HEADERS)

            async def fresh() -> float:
                async with httpx.AsyncClient(http2=True, verify=ctx) as http:
                    return await first_token(http, url, TTFT_HEADERS)

            async def warm() -> float:
                return await first_token(shared, url, TTFT_HEADERS)

            modes: dict[str, Callable[[], Awaitable[float]]] = {
                "voicepool first request": pooled,
                "fresh httpx client": fresh,
                "shared httpx client (warm)": warm,
            }
            samples: dict[str, list[float]] = {name: [] for name in modes}
            for _ in range(rounds):
                for name, run in modes.items():
                    samples[name].append(await run())
            handshakes = pool.stats().connects
    print(f"\n1. time to first token, first request of a call, {rtt * 1e3:.0f} ms RTT", end="")
    print(f" ({rounds} rounds)")
    medians = {name: statistics.median(values) for name, values in samples.items()}
    for name, value in medians.items():
        print(f"   {name:<28} {value * 1e3:7.1f} ms")
    print(f"   (voicepool opened {handshakes} connections, all at boot)")
    return medians


async def part_streams(port: int, ca: str, streams: int, rounds: int) -> dict[str, float]:
    base = f"https://127.0.0.1:{port}"
    url = base + "/v1/chat/completions"
    ctx = ssl.create_default_context(cafile=ca)
    per = 100
    size = -(-streams // per)
    pool = pool_for(base, ca, PoolSettings(min_size=size, max_size=size + 1, max_streams=per))
    timeout = httpx.Timeout(60.0)
    async with (
        pool,
        httpx.AsyncClient(transport=PooledTransport(pool), timeout=timeout) as pooled,
        httpx.AsyncClient(http2=True, verify=ctx, timeout=timeout) as shared,
    ):
        await stream_to_end(shared, url)  # warm the shared client too
        t0 = time.perf_counter()
        await stream_to_end(pooled, url)
        single = time.perf_counter() - t0
        samples: dict[str, list[float]] = {"voicepool": [], "shared httpx http2": []}
        for _ in range(rounds):
            for name, http in (("voicepool", pooled), ("shared httpx http2", shared)):
                t0 = time.perf_counter()
                await asyncio.gather(*(stream_to_end(http, url) for _ in range(streams)))
                samples[name].append(time.perf_counter() - t0)
        connects = pool.stats().connects
    print(f"\n2. {streams} concurrent 1 s streams, 100 streams per connection ({rounds} rounds)")
    print(f"   one stream alone             {single:7.2f} s")
    medians = {name: statistics.median(values) for name, values in samples.items()}
    for name, value in medians.items():
        print(f"   {name:<28} {value:7.2f} s")
    print(f"   (voicepool used {connects} connections)")
    medians["single"] = single
    return medians


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="rounds of part 1")
    parser.add_argument("--stream-rounds", type=int, default=3, help="rounds of part 2")
    parser.add_argument("--streams", type=int, default=300)
    parser.add_argument("--rtt", type=float, default=0.020, help="seconds")
    return parser.parse_args()


async def main(args: argparse.Namespace) -> None:
    async with emulator_process() as (port, ca):
        ttft = await part_ttft(port, ca, args.rounds, args.rtt)
        many = await part_streams(port, ca, args.streams, args.stream_rounds)
    pooled, warm = ttft["voicepool first request"], ttft["shared httpx client (warm)"]
    fresh = ttft["fresh httpx client"]
    speedup = many["shared httpx http2"] / many["voicepool"]
    print("\nverdict")
    ok1 = pooled <= warm * 1.10
    print(
        f"   pooled first request / warm request = {pooled / warm:.2f}"
        f" (target <= 1.10: {'met' if ok1 else 'MISSED'});"
        f" fresh client / pooled = {fresh / pooled:.2f}"
    )
    ok2 = speedup >= 2.5
    print(
        f"   {args.streams} streams: httpx / voicepool = {speedup:.2f}x"
        f" (target >= 2.5x: {'met' if ok2 else 'MISSED'}); voicepool / one stream ="
        f" {many['voicepool'] / many['single']:.2f}"
    )


if __name__ == "__main__":
    asyncio.run(main(parse_args()))

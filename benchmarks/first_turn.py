"""First turn of a call over pooled ASR/TTS WebSockets, and the cost of keeping sockets warm.

    .venv/bin/python benchmarks/first_turn.py [--rounds 25] [--rtt 0.020] [--sockets 1000]
                                              [--part all|turn|memory] [--uvloop]

The Deepgram-like and ElevenLabs-like emulators run over TLS in a child process; the client and
``FaultProxy`` (``--rtt`` round trip: half each way, plus the TCP handshake's round trip on a new
connection) run in this one. Figures are medians over interleaved rounds; the verdicts compare
ratios measured in this run, because these machines are noisy.

Part 1 (turn): time from "the call starts" to the first transcript message (ASR: acquire, send
one audio frame, receive the interim result) and to the first audio chunk (TTS: acquire a context,
send the text, receive the first chunk), three ways:

* ``pooled``: a lease from a pool warmed at boot (``async with pool.acquire()``);
* ``steady``: the same exchange on a stream the call already holds (a later turn);
* ``per call``: connecting inside the call (TCP + TLS 1.3 + WebSocket upgrade, then the turn).

Targets: pooled within 10% of steady; per call at least 2.5x slower than pooled.

Part 2 (memory): ``--sockets`` idle pooled TLS WebSockets (Deepgram adapter: a reader task and a
keepalive timer each) to the child process; resident memory per socket in this process, and the
CPU time of one ping sweep over all of them (what the pool's health task spends per interval).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import re
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from voicepool import LeaseMode, Pool, PoolSettings
from voicepool.adapters.deepgram import DeepgramAdapter, DeepgramConnection
from voicepool.adapters.elevenlabs import ElevenLabsAdapter
from voicepool.testing.asr import DeepgramEmulator
from voicepool.testing.faultproxy import FaultProxy
from voicepool.testing.tts import ElevenLabsEmulator

KEY = "bench-key"
TEXT = "Hello, how can I help you today? "


# -- the child process: emulators -----------------------------------------------------------------


async def serve() -> None:
    """Run both emulators until stdin closes; print their ports and CA on one line."""
    async with (
        DeepgramEmulator(tls=True, api_key=KEY, idle_timeout=None) as dg,
        ElevenLabsEmulator(tls=True, api_key=KEY, idle_timeout=None) as el,
    ):
        print(f"ports dg={dg.port} el={el.port} ca={dg.ca_file}", flush=True)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        await reader.read()  # EOF: the parent is done


@contextlib.asynccontextmanager
async def emulator_process(uvloop: bool) -> AsyncIterator[tuple[int, int, str]]:
    """Start the emulators in a child process; yield (deepgram port, elevenlabs port, CA path)."""
    args = [sys.executable, __file__, "--serve"] + (["--uvloop"] if uvloop else [])
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            line = (await proc.stdout.readline()).decode()
        found = re.search(r"dg=(\d+) el=(\d+) ca=(\S+)", line)
        if found is None:
            raise RuntimeError(f"emulators did not start: {line!r}")
        yield int(found.group(1)), int(found.group(2)), found.group(3)
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            async with asyncio.timeout(5):
                await proc.wait()
        except TimeoutError:
            proc.kill()  # by its handle (PID) only
            await proc.wait()


# -- part 1: the first turn -----------------------------------------------------------------------


async def asr_turn(stream: DeepgramConnection) -> None:
    await stream.send_audio(b"hello")
    await stream.recv()


async def tts_first_chunk(ctx: Any) -> None:
    await ctx.send_text(TEXT)
    await ctx.end()
    audio = ctx.audio()
    await anext(audio)
    async for _ in audio:  # drain the turn (not timed by the caller's clock below)
        pass


async def part_turn(rounds: int, rtt: float, uvloop: bool) -> dict[str, float]:
    async with (
        emulator_process(uvloop) as (dg_port, el_port, ca),
        FaultProxy("127.0.0.1", dg_port, latency=rtt / 2) as dg_proxy,
        FaultProxy("127.0.0.1", el_port, latency=rtt / 2) as el_proxy,
    ):
        asr = DeepgramAdapter(
            url=f"wss://127.0.0.1:{dg_proxy.port}", api_key=KEY, ca_file=ca, interim_results=True
        )
        tts = ElevenLabsAdapter(url=f"wss://127.0.0.1:{el_proxy.port}", api_key=KEY, ca_file=ca)
        asr_settings = PoolSettings(concurrency=4, min_size=3, max_size=6)
        tts_settings = PoolSettings(concurrency=5, min_size=2, max_size=2)
        async with (
            Pool(asr, asr_settings, name="asr") as asr_pool,
            Pool(tts, tts_settings, name="tts") as tts_pool,
            asr_pool.acquire() as held_asr,
            tts_pool.acquire() as held_tts,
        ):
            steady_ctx = held_tts.conn.context(held_tts.stream_id)
            await asr_turn(held_asr.conn)  # the held stream has had its first turn

            async def asr_pooled() -> float:
                t0 = time.perf_counter()
                async with asr_pool.acquire() as lease:
                    await asr_turn(lease.conn)
                    return time.perf_counter() - t0

            async def asr_steady() -> float:
                t0 = time.perf_counter()
                await asr_turn(held_asr.conn)
                return time.perf_counter() - t0

            async def asr_cold() -> float:
                t0 = time.perf_counter()
                conn = await asr.connect()
                try:
                    await asr_turn(conn)
                    return time.perf_counter() - t0
                finally:
                    await asr.close(conn)

            async def tts_pooled() -> float:
                t0 = time.perf_counter()
                async with tts_pool.acquire() as lease:
                    ctx = lease.conn.context(lease.stream_id)
                    await ctx.send_text(TEXT)
                    await ctx.end()
                    audio = ctx.audio()
                    await anext(audio)
                    elapsed = time.perf_counter() - t0
                    async for _ in audio:
                        pass
                    return elapsed

            async def tts_steady() -> float:
                # A later turn on the context this call holds: text, flush, first chunk.
                t0 = time.perf_counter()
                await steady_ctx.send_text(TEXT, flush=True)
                got = 0
                expected = len(TEXT) * 32  # the emulator's bytes per character
                first = 0.0
                async for chunk in _until(steady_ctx, expected):
                    if not got:
                        first = time.perf_counter() - t0
                    got += len(chunk)
                return first

            async def tts_cold() -> float:
                t0 = time.perf_counter()
                conn = await tts.connect()
                try:
                    ctx = conn.context(1)
                    await ctx.send_text(TEXT)
                    await ctx.end()
                    audio = ctx.audio()
                    await anext(audio)
                    elapsed = time.perf_counter() - t0
                    async for _ in audio:
                        pass
                    return elapsed
                finally:
                    await tts.close(conn)

            cases: dict[str, Callable[[], Awaitable[float]]] = {
                "asr pooled": asr_pooled,
                "asr steady": asr_steady,
                "asr per call": asr_cold,
                "tts pooled": tts_pooled,
                "tts steady": tts_steady,
                "tts per call": tts_cold,
            }
            samples: dict[str, list[float]] = {name: [] for name in cases}
            for r in range(rounds + 2):
                names = list(cases)
                names = names[r % len(names) :] + names[: r % len(names)]  # interleave
                for name in names:
                    await _settle(asr_pool)
                    value = await cases[name]()
                    if r >= 2:  # two warm-up rounds
                        samples[name].append(value)
            return {name: statistics.median(v) * 1000 for name, v in samples.items()}


async def _until(ctx: Any, expected: int) -> AsyncIterator[bytes]:
    """Chunks of one flushed turn on a context that stays open (it has no final message)."""
    got = 0
    queue = ctx._queue
    while got < expected:
        chunk = await queue.get()
        got += len(chunk)
        yield chunk


async def _settle(pool: Pool[Any]) -> None:
    """Wait (untimed) until the SINGLE_USE pool has refilled its spares and the background close
    of the last used stream (CloseStream, about two round trips) is over."""
    for _ in range(500):
        s = pool.stats()
        if s.idle >= pool.min_size and s.opening == 0:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)


# -- part 2: memory and ping sweep ----------------------------------------------------------------


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def part_memory(sockets: int, uvloop: bool) -> dict[str, float]:
    async with emulator_process(uvloop) as (dg_port, _el_port, ca):
        asr = DeepgramAdapter(url=f"wss://127.0.0.1:{dg_port}", api_key=KEY, ca_file=ca)
        one = await asr.connect()  # load TLS and websockets machinery before the baseline
        await asr.close(one)
        gc.collect()
        before = rss_kib()
        settings = PoolSettings(
            concurrency=sockets,
            headroom=0,
            min_size=sockets,
            max_size=sockets,
            lease_mode=LeaseMode.EXCLUSIVE,
            connect_concurrency=64,
            connect_timeout=60,
            ping_interval=3600,
            ping_timeout=60,
        )
        t0 = time.perf_counter()
        async with Pool(asr, settings, name="mem") as pool:
            opened = time.perf_counter() - t0
            gc.collect()
            await asyncio.sleep(0.5)
            after = rss_kib()
            # Held through the sweeps (a SINGLE_USE release would close them), released after.
            leases = [await pool.lease() for _ in range(pool.stats().size)]
            conns = [lease.conn for lease in leases]
            sweeps: list[float] = []
            bare: list[float] = []
            for _ in range(5):
                for into, ping in ((sweeps, asr.ping), (bare, _bare_ping)):
                    c0 = time.process_time()
                    await asyncio.gather(*(asyncio.ensure_future(ping(c)) for c in conns))
                    into.append(time.process_time() - c0)
            stats = pool.stats()
            for lease in leases:
                await lease.release()
            assert stats.size == sockets, stats
        raw_rss, raw_sweep = await _raw_websockets(asr, sockets)
        return {
            "sockets": float(sockets),
            "open_s": opened,
            "rss_per_socket_kib": (after - before) / sockets,
            "sweep_cpu_ms": statistics.median(sweeps) * 1000,
            "bare_sweep_cpu_ms": statistics.median(bare) * 1000,
            "raw_rss_per_socket_kib": raw_rss,
            "raw_sweep_cpu_ms": raw_sweep,
        }


async def _raw_websockets(asr: DeepgramAdapter, sockets: int) -> tuple[float, float]:
    """The same figures for bare ``websockets`` clients (no pool, no reader task): the yardstick."""
    gc.collect()
    before = rss_kib()
    raws: list[Any] = []
    try:
        for start in range(0, sockets, 64):
            batch = min(64, sockets - start)
            raws += await asyncio.gather(*(asr.open_socket() for _ in range(batch)))
        gc.collect()
        await asyncio.sleep(0.5)
        rss = (rss_kib() - before) / sockets

        async def ping(ws: Any) -> None:
            await (await ws.ping())

        sweeps = []
        for _ in range(5):
            c0 = time.process_time()
            await asyncio.gather(*(asyncio.ensure_future(ping(ws)) for ws in raws))
            sweeps.append(time.process_time() - c0)
        return rss, statistics.median(sweeps) * 1000
    finally:
        await asyncio.gather(*(ws.close() for ws in raws), return_exceptions=True)


async def _bare_ping(conn: DeepgramConnection) -> None:
    """A WebSocket ping and its pong, without the provider keepalive (for comparison)."""
    await conn.ping([])


# -- main -----------------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> int:
    ok = True
    loop_name = "uvloop" if args.uvloop else "asyncio"
    if args.part in ("all", "turn"):
        r = await part_turn(args.rounds, args.rtt, args.uvloop)
        print(f"First turn at {args.rtt * 1000:g} ms RTT ({args.rounds} rounds, {loop_name}):")
        for kind in ("asr", "tts"):
            pooled, steady, cold = r[f"{kind} pooled"], r[f"{kind} steady"], r[f"{kind} per call"]
            what = "first transcript" if kind == "asr" else "first audio chunk"
            print(
                f"  {kind.upper()} {what}: pooled {pooled:.1f} ms, steady {steady:.1f} ms,"
                f" per call {cold:.1f} ms"
            )
            within = pooled / steady
            faster = cold / pooled
            verdict_a = "PASS" if within <= 1.10 else "FAIL"
            verdict_b = "PASS" if faster >= 2.5 else "FAIL"
            print(f"    pooled / steady = {within:.2f} (target <= 1.10) {verdict_a}")
            print(f"    per call / pooled = {faster:.2f}x (target >= 2.5x) {verdict_b}")
            ok = ok and verdict_a == "PASS" and verdict_b == "PASS"
    if args.part in ("all", "memory"):
        m = await part_memory(args.sockets, args.uvloop)
        print(f"Idle pooled TLS WebSockets ({int(m['sockets'])}, Deepgram adapter, {loop_name}):")
        print(f"  opened in {m['open_s']:.1f} s")
        raw_rss, raw_sweep = m["raw_rss_per_socket_kib"], m["raw_sweep_cpu_ms"]
        print(
            f"  RSS per socket: {m['rss_per_socket_kib']:.0f} KiB"
            f" (bare websockets client: {raw_rss:.0f} KiB)"
        )
        print(
            f"  CPU of one ping sweep over all (KeepAlive + ping/pong): {m['sweep_cpu_ms']:.1f} ms"
        )
        print(
            f"  same, WebSocket ping/pong only: {m['bare_sweep_cpu_ms']:.1f} ms"
            f" (bare websockets clients: {raw_sweep:.1f} ms,"
            f" ratio {m['bare_sweep_cpu_ms'] / raw_sweep:.2f})"
        )
    return 0 if ok else 1


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--rtt", type=float, default=0.020)
    p.add_argument("--sockets", type=int, default=1000)
    p.add_argument("--part", choices=["all", "turn", "memory"], default="all")
    p.add_argument("--uvloop", action="store_true")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args()


if __name__ == "__main__":
    args = parse()
    runner: Any = asyncio.run
    if args.uvloop:
        import uvloop

        runner = uvloop.run
    if args.serve:
        runner(serve())
        sys.exit(0)
    sys.exit(runner(main(args)))

"""SIP registrations: boot time, and what a warm registration saves each call, in one run.

    .venv/bin/python benchmarks/sip.py [--rounds 30] [--boot-rounds 8] [--rtt 0.020]
                                       [--registrar kamailio|emulator] [--transport udp|tcp]
    .venv/bin/python benchmarks/sip.py --faults [--transport udp|tcp] [--ping-interval 5]
                                       [--ping-timeout 5]

``--faults`` runs the fault matrix instead (registrar down and back, flapping, 503 storm, restart
under load): see ``benchmarks/sip_faults.py``.

The registrar is a real Kamailio with digest auth (``voicepool.testing.Kamailio``; falls back
to the in-process emulator when Kamailio is not installed). Traffic goes through a delay relay
with ``--rtt`` round trip (half each way): ``UdpDelayRelay`` for UDP, ``FaultProxy`` for TCP.
Every figure is a median (and p90) over rounds that interleave the variants; compare the ratios,
which are measured in this one run (these machines are noisy).

1. Time to the first usable registration at worker boot: ``Pool.start()`` + the first
   ``acquire()``. ``cold engine``: pjsua2 starts too (libCreate, libInit, transports,
   libStart); ``warm engine``: another SIP pool already runs.
2. Per call: registering inside the call (``connect()``: REGISTER, 401 challenge, authenticated
   REGISTER, 200 = 2 round trips; plus the un-REGISTER at hang-up, 2 more) vs leasing a warm
   registration from the pool (``async with pool.acquire()``, no network).
3. The pool's active health check, a refresh REGISTER (``SipAdapter.ping``), at the same RTT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from voicepool import Pool, PoolSettings
from voicepool.adapters.sip import SipAdapter, SipEngine, SipOptions, SipRegistration
from voicepool.testing.faultproxy import FaultProxy
from voicepool.testing.sip_registrar import SipRegistrar
from voicepool.testing.udp_delay import UdpDelayRelay

# The Kamailio runner is a repo-only test peer (tests/peers, not shipped): run from a checkout.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.peers.kamailio import Kamailio, kamailio_available

SETTINGS = PoolSettings(min_size=1, max_size=1, ping_interval=300, ping_timeout=5)


def stats(samples: list[float]) -> tuple[float, float]:
    """(median, p90) in milliseconds."""
    ordered = sorted(samples)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return statistics.median(ordered) * 1e3, p90 * 1e3


def header(title: str, base: str | None = None) -> str:
    extra = f"  {'vs ' + base:>11}" if base else ""
    return f"\n{title:<54} {'median ms':>10} {'p90 ms':>10}{extra}"


def row(label: str, samples: list[float], base: list[float] | None = None) -> str:
    med, p90 = stats(samples)
    ratio = ""
    if base is not None:
        ratio = f"  {med / stats(base)[0]:10.1f}x"  # same width as the header's column
    return f"  {label:<52} {med:10.3f} {p90:10.3f}{ratio}"


@contextlib.asynccontextmanager
async def registrar(kind: str, transport: str, rtt: float) -> AsyncIterator[tuple[str, str]]:
    """Yield (direct registrar URI, URI through the delay relay) and a description."""
    async with contextlib.AsyncExitStack() as stack:
        if kind == "kamailio":
            kam = await stack.enter_async_context(Kamailio(password="secret"))
            host, port, what = kam.host, kam.port, "Kamailio"
        else:
            emu = await stack.enter_async_context(SipRegistrar(users={"alice": "secret"}))
            host, port, what = emu.host, emu.port, "voicepool registrar emulator"
        if transport == "udp":
            relay = await stack.enter_async_context(UdpDelayRelay((host, port), delay=rtt / 2))
            relayed = relay.port
            how = "UdpDelayRelay"
        else:
            proxy = await stack.enter_async_context(FaultProxy(host, port, latency=rtt / 2))
            relayed = proxy.port
            how = "FaultProxy"
        print(f"registrar: {what} on {host}:{port} ({transport}); {rtt * 1e3:g} ms RTT via {how}")
        yield f"sip:{host}:{port}", f"sip:{host}:{relayed}"


def adapter_for(uri: str, transport: str) -> SipAdapter:
    return SipAdapter(
        SipOptions(
            aor="sip:alice@127.0.0.1",
            registrar=uri,
            password=SecretStr("secret"),
            transport=transport,
            expires=300,
            bind_address="127.0.0.1",
        )
    )


async def first_usable(adapter: SipAdapter) -> float:
    """Seconds from boot to the first lease on a registered account; the pool is closed after."""
    t0 = time.perf_counter()
    pool = Pool(adapter, SETTINGS, name="bench")
    await pool.start()
    try:
        async with pool.acquire() as lease:
            assert lease.conn.registered
            took = time.perf_counter() - t0
    finally:
        await pool.aclose()
    return took


async def boot_part(engine: SipEngine, direct: str, relayed: str, args: Any) -> None:
    cold: list[float] = []
    warm: list[float] = []
    cold_lo: list[float] = []
    for _ in range(args.boot_rounds):
        assert await engine.wait_stopped(10)
        cold.append(await first_usable(adapter_for(relayed, args.transport)))
        assert await engine.wait_stopped(10)
        cold_lo.append(await first_usable(adapter_for(direct, args.transport)))
        with engine.hold():
            await first_usable(adapter_for(direct, args.transport))  # start the engine
            warm.append(await first_usable(adapter_for(relayed, args.transport)))
    rtt = f"{args.rtt * 1e3:g} ms RTT"
    print(header("1. time to first usable registration at boot"))
    print(row(f"warm engine, {rtt}", warm))
    print(row(f"cold engine (pjsua2 start + REGISTER), {rtt}", cold))
    print(row("cold engine, loopback (0 RTT)", cold_lo))
    engine_cost = stats(cold)[0] - stats(warm)[0]
    tcp = ", +1 RTT for the TCP connection" if args.transport == "tcp" else ""
    print(f"  -> pjsua2 engine start adds ~{engine_cost:.1f} ms once per process; each pool's")
    print(f"     boot then costs one REGISTER exchange (2 RTT = {2 * args.rtt * 1e3:g} ms{tcp})")


async def per_call_part(engine: SipEngine, relayed: str, args: Any) -> None:
    adapter = adapter_for(relayed, args.transport)
    connect: list[float] = []
    connect_close: list[float] = []
    lease: list[float] = []
    ping: list[float] = []
    with engine.hold():
        async with Pool(adapter, SETTINGS, name="warm") as pool:
            for _ in range(args.rounds):
                # Registering inside the call: usable after connect(); un-REGISTER at hang-up.
                t0 = time.perf_counter()
                conn: SipRegistration = await adapter.connect()
                t1 = time.perf_counter()
                await adapter.close(conn)
                t2 = time.perf_counter()
                connect.append(t1 - t0)
                connect_close.append(t2 - t0)
                # Leasing the registration warmed at boot.
                t0 = time.perf_counter()
                async with pool.acquire() as held:
                    t1 = time.perf_counter()
                    conn = held.conn
                lease.append(t1 - t0)
                t0 = time.perf_counter()
                await adapter.ping(conn)
                ping.append(time.perf_counter() - t0)
    print(header(f"2. per call, {args.rtt * 1e3:g} ms RTT", "lease"))
    print(row("lease a warm registration (acquire)", lease, lease))
    print(row("register in the call (REGISTER 401 + 200)", connect, lease))
    print(row("register + un-REGISTER at hang-up", connect_close, lease))
    saved = stats(connect)[0] - stats(lease)[0]
    signalling = stats(connect_close)[0] - stats(lease)[0]
    ratio = stats(connect)[0] / stats(lease)[0]
    print(f"  -> a warm registration saves {saved:.1f} ms before each call can be placed")
    print(f"     ({ratio:.0f}x), and {signalling:.1f} ms of REGISTER signalling per call")
    print(header(f"3. active health check (refresh REGISTER), {args.rtt * 1e3:g} ms RTT"))
    print(row("SipAdapter.ping", ping))


async def main(args: Any) -> None:
    kind = args.registrar
    if kind == "kamailio" and not kamailio_available():
        print("kamailio is not installed: using the in-process registrar emulator instead")
        kind = "emulator"
    engine = SipEngine.get()
    async with registrar(kind, args.transport, args.rtt) as (direct, relayed):
        await boot_part(engine, direct, relayed, args)
        await per_call_part(engine, relayed, args)
    assert await engine.wait_stopped(10)


def parse(argv: list[str]) -> Any:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--boot-rounds", type=int, default=8)
    parser.add_argument("--rtt", type=float, default=0.020, help="round trip, seconds")
    parser.add_argument("--registrar", choices=["kamailio", "emulator"], default="kamailio")
    parser.add_argument("--transport", choices=["udp", "tcp"], default="udp")
    parser.add_argument("--faults", action="store_true", help="run the fault matrix instead")
    parser.add_argument(
        "--ping-interval", type=float, default=5.0, help="--faults: the pools' ping_interval"
    )
    parser.add_argument(
        "--ping-timeout",
        type=float,
        default=None,
        help="--faults: the pools' ping_timeout (default: shipped, at most --ping-interval)",
    )
    return parser.parse_args(argv)


def run(argv: list[str]) -> None:
    args = parse(argv)
    if args.faults:
        import sip_faults  # beside this file

        asyncio.run(sip_faults.run(args))
    else:
        asyncio.run(main(args))


if __name__ == "__main__":
    run(sys.argv[1:])

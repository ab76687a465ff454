"""Issue 19's figures that are counts, not timings: DNS lookups, and the second-SIGTERM exit.

    .venv/bin/python benchmarks/hardening.py [--connections 8] [--rounds 3]

DNS (``voicepool.dns``, a counting resolver seam; real WebSocket servers on 127.0.0.1 and
127.0.0.2): lookups to boot ``--connections`` connections to one host, lookups for the refill
after a loss, and, when an address leaves DNS, how many connections moved and what that cost.
Targets: 1 lookup to boot, 0 for a refill, every connection moved for 1 lookup (the refresh).

Shutdown (a real worker process, tests/settings/_drain_worker.py; drain_timeout 30 s with a call
that never ends): seconds from the second SIGTERM to exit, the exit status, and whether anything
was printed on stderr. Target: well under the 30 s drain, 143, nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from websockets.asyncio.server import ServerConnection, serve

from voicepool import Pool, PoolSettings
from voicepool.adapters.websocket import WebSocketAdapter
from voicepool.dns import Answer, Resolver, set_default_resolver

ROOT = Path(__file__).resolve().parents[1]
HOST = "svc.voicepool.test"


class Zone:
    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses
        self.lookups = 0

    async def __call__(self, host: str) -> list[Answer]:
        self.lookups += 1
        return [Answer(socket.AF_INET, ip, 300.0) for ip in self.addresses]


async def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the pool did not settle")
        await asyncio.sleep(0.01)


async def dns_round(connections: int) -> tuple[int, int, int, int]:
    """(lookups to boot, lookups for a refill, connections moved, lookups for the move)."""
    opened: list[ServerConnection] = []

    async def handler(ws: ServerConnection) -> None:
        opened.append(ws)
        try:
            await ws.wait_closed()
        finally:
            opened.remove(ws)

    first = await serve(handler, "127.0.0.1", 0)
    port = first.sockets[0].getsockname()[1]
    second = await serve(handler, "127.0.0.2", port)
    zone = Zone(["127.0.0.2", "127.0.0.1"])
    resolver = Resolver(lookup=zone)
    set_default_resolver(resolver)
    settings = PoolSettings(
        min_size=connections, max_size=connections, backoff_initial=0.05, backoff_max=0.1
    )
    try:
        adapter = WebSocketAdapter(url=f"ws://{HOST}:{port}/")
        async with Pool(adapter, settings, name="asr") as pool:
            boot = zone.lookups
            await opened[0].close()
            await _until(lambda: pool.stats().connects == connections + 1)
            await _until(lambda: pool.stats().size == connections)
            refill = zone.lookups - boot
            before = zone.lookups
            zone.addresses = ["127.0.0.1"]
            await resolver.refresh(HOST)
            await _until(
                lambda: sum(ws.local_address[0] == "127.0.0.1" for ws in opened) == connections
            )
            await _until(lambda: pool.stats().size == connections)
            return boot, refill, connections, zone.lookups - before
    finally:
        set_default_resolver(None)
        await resolver.aclose()
        for server in (first, second):
            server.close()
            await server.wait_closed()


async def shutdown_round() -> tuple[float, int | None, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-X",
        "dev",
        "-m",
        "tests.settings._drain_worker",
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(60):
            await proc.stdout.readline()  # ready
            proc.send_signal(signal.SIGTERM)
            await proc.stdout.readline()  # drain started
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            _, err = await proc.communicate()
            return time.monotonic() - t0, proc.returncode, err.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def main(args: argparse.Namespace) -> None:
    rounds = [await dns_round(args.connections) for _ in range(args.rounds)]
    boot, refill, moved, move = (max(r[i] for r in rounds) for i in range(4))
    print(f"dns: boot {args.connections} connections to one host: {boot} lookup(s) (target 1)")
    print(f"dns: refill after a loss: {refill} lookup(s) (target 0)")
    print(f"dns: address left DNS: {moved}/{args.connections} connections moved, {move} lookup(s)")
    exits = [await shutdown_round() for _ in range(args.rounds)]
    took = statistics.median(e[0] for e in exits)
    codes = sorted({e[1] for e in exits if e[1] is not None})
    stderr = sum(1 for e in exits if e[2])
    print(
        f"shutdown: second SIGTERM during a 30 s drain: exit after {took:.2f} s (median of"
        f" {len(exits)}), status {codes}, stderr non-empty in {stderr} of {len(exits)}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(main(parser.parse_args()))

"""Instructions per acquire+release, counted by valgrind: the acquire benchmark without the noise.

benchmarks/acquire.py times every row on a shared machine; its ratios are paired per slice, yet
a busy neighbour still moves them by 0.1x. Counting the instructions the CPU retires (callgrind,
``I refs``) is independent of load: each row runs twice in a fresh interpreter, with ``--small``
and ``--large`` operations, and the difference divided by the extra operations is the cost of one
acquire+release (interpreter start, imports and pool boot cancel out). Ratios are against the
floor of benchmarks/acquire.py counted the same way.

Instructions are not time: cache misses and branch mispredictions do not show, and an unoptimised
CPython build (pyenv's default) spends more instructions per bytecode than a distribution's.
Use it to compare variants and commits on one machine.

Run: ``.venv/bin/python benchmarks/instructions.py [--rows floor,exclusive,...]`` (needs
``valgrind``: ``apt-get install -y valgrind``; about 40 s a row).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import acquire as bench  # noqa: E402  (the rows' definitions: one source for both benchmarks)

from voicepool import LeaseMode, Pool, PoolSettings, telemetry  # noqa: E402

UNCONTENDED = ("floor", "floor+reset", "floor+drive", "exclusive", "exclusive+reset", "multiplexed")
CONTENDED = ("contended floor", "contended exclusive")
TASKS = 100  # contended: 100 tasks on 10 connections, as in benchmarks/acquire.py


async def _run(row: str, ops: int) -> None:
    """Child process: build ``row`` and run ``ops`` acquire+release of it."""
    telemetry.disable_default()
    name = row.removeprefix("contended ")
    acquire: Callable[[], Any]
    if name == "floor":
        acquire = bench.FloorPool(10).acquire
    elif name == "floor+reset":
        acquire = bench.FloorPool(10).acquire_reset
    elif name == "floor+drive":
        acquire = bench.FloorPool(10).acquire_drive
    else:
        adapter = {
            "exclusive": bench.NullAdapter(),
            "exclusive+reset": bench.TrivialResetAdapter(),
            "multiplexed": bench.NullAdapter(LeaseMode.MULTIPLEXED),
        }[name]
        min_size = 1 if name == "multiplexed" else 10
        settings = PoolSettings(min_size=min_size, max_size=10, idle_timeout=None)
        pool = Pool(adapter, settings, name=name)
        await pool.start()
        acquire = pool.acquire
    if row.startswith("contended "):
        await bench.contended(acquire, TASKS, max(1, ops // TASKS))()
    else:
        await bench.uncontended(acquire, ops)()


def count(row: str, ops: int) -> int:
    """Instructions retired by a child that runs ``ops`` operations of ``row``."""
    valgrind = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
    out = subprocess.run(
        [*valgrind, sys.executable, __file__, "--child", row, str(ops)],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    found = re.search(r"I\s+refs:\s+([\d,]+)", out.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count from valgrind for {row!r}:\n{out.stderr}")
    return int(found.group(1).replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--rows", default=",".join(UNCONTENDED + CONTENDED))
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--large", type=int, default=21000)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        asyncio.run(_run(args.child[0], int(args.child[1])))
        return
    if shutil.which("valgrind") is None:
        sys.exit("valgrind not found: apt-get install -y valgrind")
    rows = args.rows.split(",")
    per_op: dict[str, float] = {}
    for row in rows:
        extra = args.large - args.small
        per_op[row] = (count(row, args.large) - count(row, args.small)) / extra
    print(f"instructions per acquire+release (callgrind, {args.large} - {args.small} ops)")
    for row in rows:
        base = "contended floor" if row.startswith("contended ") else "floor"
        ratio = f"{per_op[row] / per_op[base]:6.2f}x" if base in per_op else ""
        print(f"{row:22}{per_op[row]:10.0f}  {ratio}")


if __name__ == "__main__":
    main()

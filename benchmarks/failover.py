"""A region outage under live traffic: a PoolGroup vs a framework-style fallback.

    .venv/bin/python benchmarks/failover.py [--rate 25] [--hold 4] [--standby-min 4]
                                            [--failback-after 3] [--seconds 4]

Two Deepgram emulators ("regions") behind FaultProxy at 20 and 60 ms round trip, Deepgram adapter
pools (EXCLUSIVE, Finalize as the reset; ``--no-reuse``: SINGLE_USE spares), Poisson call
arrivals at ``--rate`` a second, each call holding its stream ``--hold`` seconds (about rate x
hold calls in flight). A call's first turn is acquire + one audio frame + its interim transcript.
The regions (emulators and proxies) run in a child process, so their work does not share the
clients' event loop, controlled over its stdin. The primary is killed by resetting every
connection through its proxy and refusing new ones (what a crashed process looks like to a client).

Phases, one run, every loop bounded in count and time:

1. ``lowest_rtt`` picks the 20 ms region (the smoothed ping round trips are printed).
2. Normal traffic. All along, a control pool outside the group makes warm calls to the 60 ms
   region at 10 a second: the "normal" each outage window is compared with (paired in time).
3. Kill the primary mid-traffic (``--rounds`` times, each followed by 4.): calls in flight on it
   fail (counted apart: their socket died); new calls: acquire wait (max after the circuit
   opened, and for the first ones), failures, whether the first call on the standby paid a
   handshake, first-turn p50/p99 and its ratio to the control's p99 in the same window.
4. The primary returns: fail-back after ``failback_after`` of READY, the standby shrinks to
   ``standby_min``.
5. Flapping: the primary goes down and up every 2 s, 3 times: failovers counted.
6. The same outage with a framework-style fallback (LiveKit FallbackAdapter, Pipecat's failover
   switcher): each call connects to the primary, waits for its error, then connects cold to the
   fallback (the failed provider is skipped for 5 s after an error, then retried).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from voicepool import Pool, PoolGroup, PoolSettings, PoolState, telemetry
from voicepool.adapters.deepgram import DeepgramAdapter, DeepgramConnection
from voicepool.group import GroupObserver, add_group_observer_factory
from voicepool.testing.asr import DeepgramEmulator
from voicepool.testing.faultproxy import FaultProxy

KEY = "bench-key"


@dataclass
class Call:
    started: float  # perf_counter at arrival
    wait: float = 0.0  # seconds in acquire
    first_turn: float = 0.0  # acquire + audio + interim result
    member: str = ""
    error: str = ""


# -- the child process: both regions (emulator + proxy), killed and revived on command -----------


async def serve() -> None:
    """Run the two regions; print their proxy ports; obey "kill" / "revive" lines on stdin."""
    async with (
        DeepgramEmulator(api_key=KEY, idle_timeout=None) as em_near,
        DeepgramEmulator(api_key=KEY, idle_timeout=None) as em_far,
        FaultProxy("127.0.0.1", em_near.port, latency=0.010) as near_proxy,
        FaultProxy("127.0.0.1", em_far.port, latency=0.030) as far_proxy,
    ):
        print(f"ports near={near_proxy.port} far={far_proxy.port}", flush=True)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := (await reader.readline()).strip():
            if line == b"kill":  # what a crashed process looks like: RSTs, then refusals
                near_proxy.refuse(True)
                await near_proxy.reset_all()
            elif line == b"revive":
                near_proxy.refuse(False)
            print("ok", flush=True)


class Regions:
    """The parent's handle on the child process (stopped by its handle, never by name)."""

    def __init__(self, proc: asyncio.subprocess.Process, near: int, far: int) -> None:
        self.proc = proc
        self.near_port = near
        self.far_port = far

    async def command(self, what: str) -> None:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(f"{what}\n".encode())
        await self.proc.stdin.drain()
        async with asyncio.timeout(10):
            assert (await self.proc.stdout.readline()).strip() == b"ok"

    async def kill(self) -> None:
        await self.command("kill")

    async def revive(self) -> None:
        await self.command("revive")


@contextlib.asynccontextmanager
async def regions() -> AsyncIterator[Regions]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--serve",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            line = (await proc.stdout.readline()).decode()
        found = re.search(r"near=(\d+) far=(\d+)", line)
        if found is None:
            raise RuntimeError(f"regions did not start: {line!r}")
        yield Regions(proc, int(found.group(1)), int(found.group(2)))
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            async with asyncio.timeout(5):
                await proc.wait()
        except TimeoutError:
            proc.kill()  # by its handle (PID) only
            await proc.wait()


class Switches(GroupObserver):
    def __init__(self) -> None:
        self.seen: list[tuple[float, str, str, str, bool]] = []
        self.changed = asyncio.Event()

    def on_switch(self, group: PoolGroup[Any], old: str, new: str, why: str, back: bool) -> None:
        self.seen.append((time.perf_counter(), old, new, why, back))
        self.changed.set()


async def turn(stream: DeepgramConnection) -> None:
    await stream.send_audio(b"hello")
    await stream.recv()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


class Traffic:
    """Poisson arrivals of calls, each run by ``call()``; bounded by ``stop()`` and a call cap."""

    def __init__(
        self, rate: float, run: Callable[[Call], Coroutine[Any, Any, None]], cap: int
    ) -> None:
        self.rate = rate
        self.run = run
        self.cap = cap
        self.calls: list[Call] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self._rng = random.Random(7)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._arrivals())

    async def _arrivals(self) -> None:
        while not self._stop.is_set() and len(self.calls) < self.cap:
            call = Call(time.perf_counter())
            self.calls.append(call)
            task = asyncio.get_running_loop().create_task(self.run(call))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            try:
                async with asyncio.timeout(self._rng.expovariate(self.rate)):
                    await self._stop.wait()
            except TimeoutError:
                pass

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=30)

    def since(self, t0: float, t1: float = float("inf")) -> list[Call]:
        return [c for c in self.calls if t0 <= c.started < t1]


def settings(min_size: int | None) -> PoolSettings:
    return PoolSettings(
        concurrency=110,
        min_size=min_size,
        ping_interval=2.0,  # a spare being pinged is not lendable: ping no more than needed
        ping_timeout=0.4,
        connect_timeout=1.0,
        failure_threshold=1,
        backoff_initial=0.2,
        backoff_max=0.5,
        acquire_timeout=3.0,
        alarm_wait_p95_ms=1000,
    )


async def main(args: argparse.Namespace) -> None:
    telemetry.disable_default()
    switches = Switches()
    add_group_observer_factory(lambda group: switches)
    async with regions() as region:

        def adapter(port: int) -> DeepgramAdapter:
            return DeepgramAdapter(url=f"ws://127.0.0.1:{port}", api_key=KEY, reuse=args.reuse)

        near_port, far_port = region.near_port, region.far_port

        floor = None if args.reuse else args.spares  # EXCLUSIVE: the full warm floor
        near = Pool(adapter(near_port), settings(floor), name="asr_near")
        far = Pool(adapter(far_port), settings(floor), name="asr_far")
        control = Pool(
            adapter(far_port),
            settings(None).model_copy(update={"min_size": 4}),
            name="far_control",
        )
        await control.start()
        group = PoolGroup(
            [far, near],  # listed far first: lowest_rtt must still pick near
            name="asr",
            policy="lowest_rtt",
            standby_min=args.standby_min,
            failback_after=args.failback_after,
        )
        async with group:
            for _ in range(100):  # wait (bounded) until both members have ping round trips
                if group.rtt("asr_near") is not None and group.rtt("asr_far") is not None:
                    break
                await asyncio.sleep(0.1)
            # A few more pings: the first ones ran while the boot's handshakes loaded the loop.
            await asyncio.sleep(3 * 2.0)
            rtt_near, rtt_far = group.rtt("asr_near"), group.rtt("asr_far")
            print(
                f"1. lowest_rtt: active={group.active.name}  ping rtt near="
                f"{(rtt_near or 0) * 1e3:.1f} ms far={(rtt_far or 0) * 1e3:.1f} ms (switches"
                f" while booting: {len(switches.seen)})"
            )

            async def group_call(call: Call) -> None:
                try:
                    t_acquire = time.perf_counter()
                    async with group.acquire() as lease:
                        call.wait = time.perf_counter() - t_acquire
                        call.member = lease.pool.name
                        await turn(lease.conn)
                        call.first_turn = time.perf_counter() - call.started
                        await asyncio.sleep(args.hold)
                except Exception as exc:
                    call.error = type(exc).__name__

            # The control: warm calls to the far region on a pool outside the group, all along,
            # so the outage's figures are compared with calls made under the same load.
            control_turns: list[tuple[float, float]] = []
            control_done = asyncio.Event()

            async def control_calls() -> None:
                for _ in range(3000):  # bounded: 10 a second for at most 5 minutes
                    if control_done.is_set():
                        return
                    t0 = time.perf_counter()
                    async with control.acquire() as lease:
                        await turn(lease.conn)
                        control_turns.append((t0, time.perf_counter() - t0))
                    await asyncio.sleep(0.1)

            def control_window(t0: float, t1: float) -> list[float]:
                return [v for t, v in control_turns if t0 <= t < t1]

            traffic = Traffic(args.rate, group_call, cap=int(args.rate * 300))
            traffic.start()
            control_task = asyncio.get_running_loop().create_task(control_calls())
            t_normal = time.perf_counter()
            await asyncio.sleep(args.seconds)
            far_normal = control_window(t_normal, time.perf_counter())
            normal = [c.first_turn for c in traffic.since(t_normal) if not c.error and c.first_turn]
            print(
                f"2. normal: {len(normal)} calls on {group.active.name}, first turn p50"
                f" {pct(normal, 0.5):.1f} ms p99 {pct(normal, 0.99):.1f} ms; far region warm"
                f" (control pool) p50 {pct(far_normal, 0.5):.1f} ms"
                f" p99 {pct(far_normal, 0.99):.1f} ms;"
                f" far pool size {far.stats().size} (standby_min={args.standby_min} spares)"
            )

            ratios: list[float] = []
            for r in range(args.rounds):
                # -- 3. kill the primary mid-traffic ----------------------------------------------
                in_flight = [c for c in traffic.calls if c.member == "asr_near" and c.first_turn]
                in_flight = [c for c in in_flight if c.started > time.perf_counter() - args.hold]
                far_connects = far.stats().connects
                n_switch = len(switches.seen)
                t_kill = time.perf_counter()
                await region.kill()
                async with asyncio.timeout(5):
                    while len(switches.seen) == n_switch:
                        switches.changed.clear()
                        await switches.changed.wait()
                t_open = switches.seen[n_switch][0]
                await asyncio.sleep(args.seconds)
                new = traffic.since(t_kill, t_kill + args.seconds)
                after_open = [c for c in new if c.started >= t_open]
                before_open = [c for c in new if c.started < t_open]
                failed = [c for c in new if c.error]
                first_far = next((c for c in after_open if c.member == "asr_far"), None)
                turns = [c.first_turn for c in new if not c.error]
                far_outage = control_window(t_kill, t_kill + args.seconds)
                print(
                    f"3.{r + 1} kill: failover {(t_open - t_kill) * 1e3:.1f} ms after the kill"
                    f" ({switches.seen[n_switch][3]}); {len(in_flight)} calls in flight on the"
                    f" primary lost their socket; new calls {len(new)}: failed {len(failed)},"
                    f" max acquire wait after the circuit opened"
                    f" {max((c.wait for c in after_open), default=0) * 1e3:.2f} ms"
                    f" (p99 {pct([c.wait for c in after_open], 0.99):.2f} ms), before it"
                    f" {max((c.wait for c in before_open), default=0) * 1e3:.1f} ms"
                    f" ({len(before_open)} calls); waits > 1 ms after it:"
                    f" {sum(1 for c in after_open if c.wait > 0.001)}"
                )
                for c in failed:
                    print(
                        f"   failed: {c.error} {(c.started - t_open) * 1e3:+.1f} ms from the"
                        f" failover, on {c.member or 'no lease'}"
                    )
                first_wait = first_far.wait if first_far else 0.0
                print(
                    f"   first call on the standby waited {first_wait * 1e3:.2f}"
                    f" ms (a handshake is >= 2 x 60 ms); far connects before it: {far_connects};"
                    f" first turn p50 {pct(turns, 0.5):.1f} ms p99 {pct(turns, 0.99):.1f} ms"
                    f" = {pct(turns, 0.99) / pct(far_outage, 0.99):.2f}x the far region's warm p99"
                    f" measured beside it ({pct(far_outage, 0.99):.1f} ms; before the outage"
                    f" {pct(far_normal, 0.99):.1f} ms)"
                )
                ratios.append(pct(turns, 0.99) / pct(far_outage, 0.99))

                # -- 4. fail-back -----------------------------------------------------------------
                n_switch = len(switches.seen)
                await region.revive()
                t_back = time.perf_counter()
                ready_at = None
                async with asyncio.timeout(args.failback_after + 15):
                    while len(switches.seen) == n_switch:
                        if ready_at is None and near.state is PoolState.READY:
                            ready_at = time.perf_counter()
                        await asyncio.sleep(0.01)
                t_fb = switches.seen[n_switch][0]
                shrunk_after = None
                for _ in range(200):  # bounded: leased standby sockets close as their calls end
                    if far.stats().size <= args.standby_min:
                        shrunk_after = time.perf_counter() - t_fb
                        break
                    await asyncio.sleep(0.05)
                later = traffic.since(t_fb + 0.2, t_fb + 1.0)
                on_near = sum(1 for c in later if c.member == "asr_near")
                print(
                    f"4.{r + 1} fail-back {(t_fb - t_back):.2f} s after the primary returned"
                    f" ({(t_fb - (ready_at or t_back)):.2f} s after it was READY; failback_after"
                    f" {args.failback_after} s): {on_near}/{len(later)} new calls on the primary;"
                    f" standby min_size {far.min_size}, size {far.stats().size}"
                    f" (down to standby_min {shrunk_after or float('nan'):.1f} s after the"
                    f" fail-back; calls hold {args.hold} s)"
                )
                await asyncio.sleep(args.hold)  # the next round starts with calls on the primary

            group_p99_ratio = statistics.median(ratios)
            print(
                f"   group first-turn p99 during the outage / warm control p99 beside it, median"
                f" of {args.rounds} rounds: {group_p99_ratio:.2f}x"
                f" ({', '.join(f'{x:.2f}' for x in ratios)})"
            )
            control_done.set()
            await control_task

            # -- 5. flapping ----------------------------------------------------------------------
            n_switch = len(switches.seen)
            for _ in range(3):
                await region.kill()
                await asyncio.sleep(2.0)
                await region.revive()
                await asyncio.sleep(2.0)
            flaps = switches.seen[n_switch:]
            print(
                f"5. flapping (down/up every 2 s, 3 cycles, failback_after"
                f" {args.failback_after} s): {sum(1 for s in flaps if not s[4])} failovers,"
                f" {sum(1 for s in flaps if s[4])} fail-backs"
            )
            await traffic.stop()
            print(
                f"   over the run: {len(traffic.calls)} calls, failovers {group.failovers},"
                f" fail-backs {group.failbacks}"
            )

        # -- 6. the framework-style fallback, same outage ------------------------------------------
        await region.revive()
        control_turns.clear()
        control_done.clear()
        control_task = asyncio.get_running_loop().create_task(control_calls())
        primary, fallback = adapter(near_port), adapter(far_port)
        skip_until = 0.0

        async def framework_call(call: Call) -> None:
            nonlocal skip_until
            conn = None
            t_acquire = time.perf_counter()
            try:
                if time.perf_counter() >= skip_until:
                    try:
                        async with asyncio.timeout(1.0):
                            conn = await primary.connect()
                        call.member = "near"
                    except Exception:
                        skip_until = time.perf_counter() + 5.0
                if conn is None:
                    conn = await fallback.connect()
                    call.member = "far"
                call.wait = time.perf_counter() - t_acquire
                await turn(conn)
                call.first_turn = time.perf_counter() - call.started
                await asyncio.sleep(args.hold)
            except Exception as exc:
                call.error = type(exc).__name__
            finally:
                if conn is not None:
                    await (primary if call.member == "near" else fallback).close(conn)

        fw = Traffic(args.rate, framework_call, cap=int(args.rate * 30))
        fw.start()
        await asyncio.sleep(2.0)
        t_kill = time.perf_counter()
        await region.kill()
        await asyncio.sleep(args.seconds)
        await fw.stop()
        control_done.set()
        await control_task
        await control.aclose()
        new = fw.since(t_kill, t_kill + args.seconds)
        turns = [c.first_turn for c in new if not c.error]
        far_outage = control_window(t_kill, t_kill + args.seconds)
        print(
            f"6. framework fallback, same outage: new calls {len(new)}, failed"
            f" {sum(1 for c in new if c.error)}, first turn p50 {pct(turns, 0.5):.1f} ms"
            f" p99 {pct(turns, 0.99):.1f} ms = {pct(turns, 0.99) / pct(far_outage, 0.99):.2f}x"
            f" the far region's warm p99 beside it (group: {group_p99_ratio:.2f}x)"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=25.0, help="call arrivals a second")
    parser.add_argument("--hold", type=float, default=4.0, help="seconds a call holds its stream")
    parser.add_argument("--standby-min", type=int, default=10, help="standby's warm spares")
    parser.add_argument("--spares", type=int, default=10, help="active member's warm spares")
    parser.add_argument(
        "--reuse",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="EXCLUSIVE Deepgram sockets (Finalize as reset); --no-reuse: SINGLE_USE spares",
    )
    parser.add_argument("--failback-after", type=float, default=3.0)
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each phase")
    parser.add_argument("--rounds", type=int, default=3, help="outage + fail-back rounds")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parsed = parser.parse_args()
    asyncio.run(serve() if parsed.serve else main(parsed))

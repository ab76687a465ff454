"""A region outage under live traffic: a PoolGroup vs a framework-style fallback.

    .venv/bin/python benchmarks/failover.py [--rate 25] [--hold 4] [--standby adaptive|fixed]
                                            [--standby-min 1] [--failback-after 3] [--seconds 4]
                                            [--rounds 5] [--verbose] [--no-gc-freeze]
                                            [--cpu-clock-inside]

Two Deepgram emulators ("regions") behind FaultProxy at 20 and 60 ms round trip, Deepgram adapter
pools (EXCLUSIVE, Finalize as the reset; ``--no-reuse``: SINGLE_USE spares), Poisson call
arrivals at ``--rate`` a second, each call holding its stream ``--hold`` seconds (about rate x
hold calls in flight). A call's first turn is acquire + one audio frame + its interim transcript.
Each region (emulator + proxy) runs in a child process of its own, so its work does not share
the clients' event loop. The primary crashes as a process does: it resets every socket at once
(the listener too: new connections are refused by the kernel) and exits; it returns as a new
process on the same port.

How the time in acquire is measured (``Probe``, ``measured``): the wall-clock window holds the
acquire alone; the thread's CPU time, its run-queue delay (``/proc/thread-self/schedstat``), its
context switches (``getrusage(RUSAGE_THREAD)``) and the GC time (``gc.callbacks``) are read just
outside it, and a callback queued just before it tells whether the event loop ran meanwhile
(the acquire suspended). Every wait over 1 ms is printed with that breakdown. (A system call in
the window, such as reading the thread CPU clock, is where the kernel preempts a thread whose
slice ran out: measured that way, ``--cpu-clock-inside``, 1-8 ms "waits" of 0.05-0.1 ms CPU
appear that are the benchmark's own.) Once booted the process calls ``gc.freeze()``, as a
latency-sensitive worker should (``--no-gc-freeze``: not): a full collection under traffic then
walks only what was allocated since, not the imports, pools and warm connections (here: the
two full collections of a run took 39 ms of CPU with it, 49-68 ms without). The collections of
every generation are summed up at the end.

Phases, one run, every loop bounded in count and time:

1. ``lowest_rtt`` picks the 20 ms region (the smoothed ping round trips are printed).
2. Normal traffic. All along, a control pool outside the group makes warm calls to the 60 ms
   region, Poisson at the same rate: the "normal" each outage window is compared with (paired in
   time, under the same machine load, with as many samples: a p99 of ~100 samples is their
   maximum, so fewer control samples would bias the ratio).
3. Crash the primary mid-traffic (``--rounds`` times, each followed by 4.): calls in flight on it
   fail (counted apart: their socket died); new calls (arrived after the last reset): acquire
   wait (max after the circuit opened, and for the first ones), failures, whether the first call
   on the standby paid a handshake, first-turn p50/p99 and the ratio of the p99 to the control's
   in the same window. Calls that arrived during the resets themselves (the child resets ~200
   sockets in 10-20 ms) are counted apart. At the end: the p99 ratio over every outage window
   pooled (the headline: ~500 calls each side), the per-round ratios and their median.
4. The primary returns: fail-back after ``failback_after`` of READY, the standby shrinks to
   its standby floor (``standby_min`` with ``--standby fixed``; under traffic, the adaptive floor).
   At the end: the standby connections held on average (the idle cost of the standby floor).
5. Flapping: the primary goes down and up every 2 s, 3 times: failovers counted.
6. The same outage with a framework-style fallback (LiveKit FallbackAdapter, Pipecat's failover
   switcher): each call connects to the primary, waits for its error, then connects cold to the
   fallback (the failed provider is skipped for 5 s after an error, then retried).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import gc
import os
import random
import re
import resource
import socket
import stat
import statistics
import struct
import sys
import threading
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
    wait_cpu: float = 0.0  # CPU seconds of this thread in acquire (wait >> wait_cpu: descheduled)
    wait_runq: float = 0.0  # seconds this thread was runnable but not running (the kernel's count)
    wait_gc: float = 0.0  # seconds of garbage collection inside the acquire
    switches: tuple[int, int] = (0, 0)  # (voluntary, involuntary) context switches in acquire
    suspended: bool = False  # the acquire let the event loop run (a callback queued before ran)
    queued: bool = False  # the acquire found nothing free and waited for a connection
    fresh: bool = False  # the first lease of its connection (opened since the last call)
    first_turn: float = 0.0  # acquire + audio + interim result
    member: str = ""
    error: str = ""


# -- the regions: one child process each; a crash is a SIGKILL of the primary's process --------


async def serve(latency: float, port: int) -> None:
    """Run one region (emulator + proxy on ``port``, 0: any); print the port; exit at stdin EOF."""
    async with (
        DeepgramEmulator(api_key=KEY, idle_timeout=None) as emulator,
        FaultProxy("127.0.0.1", emulator.port, latency=latency, listen_port=port) as proxy,
    ):
        print(f"port {proxy.port}", flush=True)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            if line.strip() == b"crash":
                crash_now()


def crash_now() -> None:
    """Die as a crashed process does, all at once: RST every socket (the listener too, so new
    connections are refused by the kernel), in one synchronous loop, then exit. Prints the
    perf_counter (CLOCK_MONOTONIC, the parent's clock too) before and after the resets."""
    t0 = time.perf_counter()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError, ValueError):
            fd = int(name)
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            sock = socket.socket(fileno=fd)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
    print(f"crashed {t0:.9f} {time.perf_counter():.9f}", flush=True)
    os._exit(0)


class Region:
    """One region's child process, stopped by its handle (PID), never by name.

    :meth:`crash`: the process resets every socket in one synchronous loop and exits (see
    :func:`crash_now`), as when a provider's process dies: its sockets go at once and its port
    refuses new connections. (A reset through the proxy's transports, or a SIGKILL on this
    loaded machine, leaves some sockets alive for 20-120 ms while the others are gone: calls
    lent those meanwhile were in flight when they died, not new.) The crash instant is the
    child's, measured on the shared monotonic clock.
    """

    def __init__(self, latency: float) -> None:
        self.latency = latency
        self.port = 0
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Start the process (on the same port as before, if any) and wait until it listens."""
        assert self.proc is None, "the region is running"
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--serve",
            str(self.latency),
            str(self.port),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        self.proc = proc
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            line = (await proc.stdout.readline()).decode()
        found = re.search(r"port (\d+)", line)
        if found is None:
            raise RuntimeError(f"region did not start: {line!r}")
        self.port = int(found.group(1))

    async def crash(self) -> tuple[float, float]:
        """Crash the process; return the perf_counter before its first and after its last reset."""
        proc, self.proc = self.proc, None
        assert proc is not None
        assert proc.stdin is not None
        assert proc.stdout is not None
        proc.stdin.write(b"crash\n")
        await proc.stdin.drain()
        async with asyncio.timeout(10):
            line = (await proc.stdout.readline()).decode()
            await proc.wait()
        found = re.search(r"crashed ([\d.]+) ([\d.]+)", line)
        if found is None:
            raise RuntimeError(f"region did not crash: {line!r}")
        return float(found.group(1)), float(found.group(2))

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            async with asyncio.timeout(5):
                await proc.wait()
        except TimeoutError:
            proc.kill()  # by its handle (PID) only
            await proc.wait()


@contextlib.asynccontextmanager
async def regions() -> AsyncIterator[tuple[Region, Region]]:
    """The near (20 ms round trip) and far (60 ms) regions, started concurrently."""
    near, far = Region(0.010), Region(0.030)
    try:
        await asyncio.gather(near.start(), far.start())
        yield near, far
    finally:
        await asyncio.gather(near.stop(), far.stop())


class Probe:
    """Where an acquire's wall time went, measured (not inferred) for the calling thread:
    its CPU time, its run-queue delay (runnable, not running: the kernel's schedstat), its
    context switches (voluntary: it blocked; involuntary: it was preempted), garbage collection
    (gc.callbacks), and whether the event loop ran meanwhile (a callback queued just before the
    acquire ran before it returned: the acquire suspended)."""

    def __init__(self) -> None:
        # This thread's own counters (the loop's thread): opened here, read with pread.
        self._fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        self.gc_time = 0.0  # total seconds in collections
        # (start, wall seconds, CPU seconds, generation, run-queue seconds)
        self.pauses: list[tuple[float, float, float, int, float]] = []
        self._gc_start = self._gc_cpu = self._gc_runq = 0.0
        gc.callbacks.append(self._gc)

    def _gc(self, phase: str, info: dict[str, int]) -> None:
        now, cpu, runq = time.perf_counter(), time.thread_time(), self.runq()
        if phase == "start":
            self._gc_start, self._gc_cpu, self._gc_runq = now, cpu, runq
        else:
            self.gc_time += now - self._gc_start
            self.pauses.append(
                (
                    self._gc_start,
                    now - self._gc_start,
                    cpu - self._gc_cpu,
                    info["generation"],
                    runq - self._gc_runq,
                )
            )

    def runq(self) -> float:
        """Seconds this thread has waited on a run queue so far."""
        return int(os.pread(self._fd, 64, 0).split()[1]) / 1e9

    def close(self) -> None:
        gc.callbacks.remove(self._gc)
        os.close(self._fd)


@contextlib.asynccontextmanager
async def measured(
    call: Call, probe: Probe, cm: Any, syscall_inside: bool = False
) -> AsyncIterator[Any]:
    """``async with cm`` with the time in its ``__aenter__`` recorded on ``call``.

    The wall-clock window holds the acquire and nothing else: every probe that is a system call
    (thread CPU time, schedstat, rusage) is read before it opens and after it closes. A system
    call in the window is where the kernel preempts a thread whose time slice ran out:
    clock_gettime(CLOCK_THREAD_CPUTIME_ID) updates the scheduler's accounting of the caller
    (update_curr), which is how an expired slice is noticed between ticks, and the thread is
    switched out on that very call's return. ``syscall_inside`` (``--cpu-clock-inside``) puts one
    there, as this benchmark used to (its 1-8 ms "waits" of 0.05-0.1 ms CPU were those).
    """
    ran = [False]
    mark = asyncio.get_running_loop().call_soon(ran.__setitem__, 0, True)
    ru0 = resource.getrusage(resource.RUSAGE_THREAD)
    g0 = probe.gc_time
    if syscall_inside:
        q0 = probe.runq()
        t0 = time.perf_counter()
        cpu0 = time.thread_time()
    else:
        cpu0 = time.thread_time()
        q0 = probe.runq()
        t0 = time.perf_counter()
    entered = await cm.__aenter__()
    t1 = time.perf_counter()
    q1 = probe.runq()
    cpu1 = time.thread_time()
    g1 = probe.gc_time
    ru1 = resource.getrusage(resource.RUSAGE_THREAD)
    call.suspended = ran[0]
    mark.cancel()
    call.wait, call.wait_cpu, call.wait_runq, call.wait_gc = t1 - t0, cpu1 - cpu0, q1 - q0, g1 - g0
    call.switches = (ru1.ru_nvcsw - ru0.ru_nvcsw, ru1.ru_nivcsw - ru0.ru_nivcsw)
    try:
        yield entered
    except BaseException as exc:
        if not await cm.__aexit__(type(exc), exc, exc.__traceback__):
            raise
    else:
        await cm.__aexit__(None, None, None)


def preempted(c: Call) -> bool:
    """The kernel switched the thread out for most of the wait (it stayed runnable)."""
    return c.switches[1] > 0 and c.wait_runq > 0.5 * (c.wait - c.wait_cpu)


QUEUED: contextvars.ContextVar[bool] = contextvars.ContextVar("queued", default=False)


class Switches(GroupObserver):
    def __init__(self) -> None:
        self.seen: list[tuple[float, str, str, str, bool]] = []
        self.changed = asyncio.Event()

    def on_switch(self, group: PoolGroup[Any], old: str, new: str, why: str, back: bool) -> None:
        self.seen.append((time.perf_counter(), old, new, why, back))
        self.changed.set()

    def on_served(self, group: PoolGroup[Any], member: str, waited: float) -> None:
        QUEUED.set(True)  # called in the caller's task: its own context


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
        self,
        rate: float,
        run: Callable[[Call], Coroutine[Any, Any, None]],
        cap: int,
        seed: int = 7,
    ) -> None:
        self.rate = rate
        self.run = run
        self.cap = cap
        self.calls: list[Call] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self._rng = random.Random(seed)
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
    probe = Probe()
    switches = Switches()
    add_group_observer_factory(lambda group: switches)
    async with regions() as (near_region, far_region):

        def adapter(port: int) -> DeepgramAdapter:
            return DeepgramAdapter(url=f"ws://127.0.0.1:{port}", api_key=KEY, reuse=args.reuse)

        near_port, far_port = near_region.port, far_region.port

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
            standby=args.standby,
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
            if args.gc_freeze:
                # What a latency-sensitive worker does once booted: the objects of the imports,
                # the pools and their warm connections move to the permanent generation, so a
                # full collection during calls never walks them again (~50k objects after the
                # imports alone: ~28 ms of CPU to walk on this machine). Collections of the
                # young generations are unchanged. No gc.collect() first: that is the very pause
                # (a loop stalled 100 ms or more inflates the pings in flight and the group
                # switches to the far region), and freezing is a constant-time list splice.
                gc.freeze()
            print(
                f"1. lowest_rtt: active={group.active.name}  ping rtt near="
                f"{(rtt_near or 0) * 1e3:.1f} ms far={(rtt_far or 0) * 1e3:.1f} ms (switches"
                f" while booting: {len(switches.seen)})"
            )

            used: set[int] = set()  # ids of connections lent at least once

            async def group_call(call: Call) -> None:
                try:
                    async with measured(
                        call, probe, group.acquire(), args.cpu_clock_inside
                    ) as lease:
                        call.queued = QUEUED.get()
                        call.member = lease.pool.name
                        call.fresh = id(lease.conn) not in used
                        used.add(id(lease.conn))
                        await turn(lease.conn)
                        call.first_turn = time.perf_counter() - call.started
                        await asyncio.sleep(args.hold)
                except Exception as exc:
                    call.error = f"{type(exc).__name__}: {exc}"

            # The control: warm calls to the far region on a pool outside the group, at the same
            # rate, all along: each outage window is compared with calls made beside it, under
            # the same load, with as many samples (a p99 of fewer samples is a smaller maximum).
            async def control_call(call: Call) -> None:
                try:
                    async with control.acquire() as lease:
                        await turn(lease.conn)
                        call.first_turn = time.perf_counter() - call.started
                except Exception as exc:
                    call.error = f"{type(exc).__name__}: {exc}"

            def control_window(t0: float, t1: float) -> list[float]:
                return [c.first_turn for c in ctl.since(t0, t1) if c.first_turn and not c.error]

            held: list[int] = []  # standby connections (members not active), sampled
            steady: list[int] = []  # the same, in normal traffic only (phase 2, between rounds)
            in_steady = [True]

            async def sample_standbys() -> None:
                for _ in range(20_000):  # bounded: every 50 ms, cancelled at the end of phase 5
                    n = sum(p.stats().size for p in group.members if p is not group.active)
                    held.append(n)
                    if in_steady[0]:
                        steady.append(n)
                    await asyncio.sleep(0.05)

            sampler = asyncio.get_running_loop().create_task(sample_standbys())
            ctl = Traffic(args.rate, control_call, cap=int(args.rate * 400), seed=11)
            ctl.start()
            traffic = Traffic(args.rate, group_call, cap=int(args.rate * 300))
            traffic.start()
            t_normal = time.perf_counter()
            await asyncio.sleep(args.seconds)
            far_normal = control_window(t_normal, time.perf_counter())
            normal = [c.first_turn for c in traffic.since(t_normal) if not c.error and c.first_turn]
            print(
                f"2. normal: {len(normal)} calls on {group.active.name}, first turn p50"
                f" {pct(normal, 0.5):.1f} ms p99 {pct(normal, 0.99):.1f} ms; far region warm"
                f" (control pool) p50 {pct(far_normal, 0.5):.1f} ms"
                f" p99 {pct(far_normal, 0.99):.1f} ms;"
                f" far pool size {far.stats().size}, min_size {far.min_size}"
                f" (standby {args.standby}, standby_min={args.standby_min})"
            )

            ratios: list[float] = []
            outage_group: list[float] = []
            outage_control: list[float] = []
            totals = {
                "new": 0,
                "failed": 0,
                "slow_waits": 0,
                "queued": 0,
                "suspended": 0,
                "preempted": 0,
                "in_gc": 0,
                "crashing": 0,
                "crash_failed": 0,
            }
            all_after_open_wait: list[float] = []
            cpu_after_open: list[float] = []
            suspended_after_open = 0
            fresh_turns: list[float] = []
            reused_turns: list[float] = []
            for r in range(args.rounds):
                # -- 3. the primary crashes mid-traffic -------------------------------------------
                in_flight = [c for c in traffic.calls if c.member == "asr_near" and c.first_turn]
                in_flight = [c for c in in_flight if c.started > time.perf_counter() - args.hold]
                n_switch = len(switches.seen)
                in_steady[0] = False
                t_crash, t_dead = await near_region.crash()  # its first and last reset
                async with asyncio.timeout(5):
                    while len(switches.seen) == n_switch:
                        switches.changed.clear()
                        await switches.changed.wait()
                t_open = switches.seen[n_switch][0]
                await asyncio.sleep(args.seconds)
                window = traffic.since(t_crash, t_crash + args.seconds)
                crashing = [c for c in window if c.started < t_dead]  # during the resets
                new = [c for c in window if c.started >= t_dead]
                after_open = [c for c in new if c.started >= t_open]
                before_open = [c for c in new if c.started < t_open]
                failed = [c for c in new if c.error]
                first_far = next(c for c in window if c.member == "asr_far" and c.first_turn)
                turns = [c.first_turn for c in window if c.first_turn]
                beside = control_window(t_crash, t_crash + args.seconds)
                outage_group += turns
                outage_control += beside
                ratio = pct(turns, 0.99) / pct(beside, 0.99)
                ratios.append(ratio)
                slow_waits = sum(1 for c in after_open if c.wait > 0.001)
                totals["new"] += len(new)
                totals["failed"] += len(failed)
                totals["slow_waits"] += slow_waits
                slow = [c for c in after_open if c.wait > 0.001]
                all_after_open_wait += [c.wait for c in after_open]
                cpu_after_open += [c.wait_cpu for c in after_open]
                suspended_after_open += sum(1 for c in after_open if c.suspended)
                totals["queued"] += sum(1 for c in slow if c.queued)
                totals["suspended"] += sum(1 for c in slow if c.suspended)
                totals["preempted"] += sum(1 for c in slow if preempted(c))
                totals["in_gc"] += sum(1 for c in slow if c.wait_gc > 0.5 * c.wait)
                fresh_turns += [c.first_turn for c in window if c.first_turn and c.fresh]
                reused_turns += [c.first_turn for c in window if c.first_turn and not c.fresh]
                totals["crashing"] += len(crashing)
                totals["crash_failed"] += sum(1 for c in crashing if c.error)
                print(
                    f"3.{r + 1} crash: failover {(t_open - t_crash) * 1e3:.1f} ms after the"
                    f" crash ({switches.seen[n_switch][3]}); {len(in_flight)} calls in flight"
                    f" on the primary lost their socket; new calls {len(new)}: failed"
                    f" {len(failed)}; acquire wait after the circuit opened max"
                    f" {max((c.wait for c in after_open), default=0) * 1e3:.2f} ms, > 1 ms:"
                    f" {slow_waits} of {len(after_open)}; before it max"
                    f" {max((c.wait for c in before_open), default=0) * 1e3:.2f} ms"
                    f" ({len(before_open)} calls); during the resets"
                    f" ({(t_dead - t_crash) * 1e3:.1f} ms) {len(crashing)} calls,"
                    f" {sum(1 for c in crashing if c.error)} failed"
                )
                for c in after_open:
                    if c.wait > 0.001:
                        print(
                            f"   waited {c.wait * 1e3:.2f} ms"
                            f" ({'queued for a connection' if c.queued else 'nothing queued'},"
                            f" {'the loop ran others' if c.suspended else 'never suspended'}):"
                            f" CPU {c.wait_cpu * 1e3:.2f} ms (GC {c.wait_gc * 1e3:.2f}),"
                            f" run queue {c.wait_runq * 1e3:.2f} ms, context switches"
                            f" {c.switches[0]} voluntary {c.switches[1]} involuntary; started"
                            f" {(c.started - t_crash) * 1e3:+.0f} ms from the crash"
                        )
                pauses = [g for g in probe.pauses if t_open <= g[0] < t_crash + args.seconds]
                worst = max(pauses, key=lambda g: g[1], default=(0.0, 0.0, 0.0, 0, 0.0))
                print(
                    f"   after the circuit opened: {len(pauses)} GC pauses, max"
                    f" {worst[1] * 1e3:.2f} ms (CPU {worst[2] * 1e3:.2f}, run queue"
                    f" {worst[4] * 1e3:.2f}, generation {worst[3]}; generations"
                    f" {sorted({g[3] for g in pauses})}); calls that suspended in acquire"
                    f" {sum(1 for c in after_open if c.suspended)}, of them queued"
                    f" {sum(1 for c in after_open if c.suspended and c.queued)}; threads"
                    f" {threading.active_count()}; CPU in acquire p50"
                    f" {pct([c.wait_cpu for c in after_open], 0.5):.3f} max"
                    f" {pct([c.wait_cpu for c in after_open], 1.0):.3f} ms"
                )
                for c in [*crashing, *new]:
                    if c.error:
                        print(
                            f"   failed: {c.error} (started {(c.started - t_crash) * 1e3:+.2f} ms"
                            f" from the crash, on {c.member or 'no lease'})"
                        )
                print(
                    f"   first call on the standby: acquire {first_far.wait * 1e3:.2f} ms"
                    f" ({'queued' if first_far.queued else 'not queued'},"
                    f" {first_far.wait_cpu * 1e3:.2f} ms CPU; a handshake is >= 2 round trips ="
                    f" 120 ms); first turn group p50"
                    f" {pct(turns, 0.5):.1f} p99 {pct(turns, 0.99):.1f} ms ({len(turns)} calls),"
                    f" warm control beside it p50 {pct(beside, 0.5):.1f} p99"
                    f" {pct(beside, 0.99):.1f} ms ({len(beside)} calls): {ratio:.2f}x"
                )
                if args.verbose:
                    for c in sorted(window, key=lambda c: -c.first_turn)[:5]:
                        print(
                            f"   slowest: {c.first_turn * 1e3:.1f} ms, started"
                            f" {(c.started - t_crash) * 1e3:+.0f} ms from the crash, acquire"
                            f" {c.wait * 1e3:.2f} ms on {c.member}; control calls > 80 ms"
                            f" within 300 ms: "
                            + str(
                                [
                                    round((k.started - c.started) * 1e3)
                                    for k in ctl.since(c.started - 0.3, c.started + 0.3)
                                    if k.first_turn > 0.08
                                ]
                            )
                        )

                # -- 4. fail-back -----------------------------------------------------------------
                n_switch = len(switches.seen)
                await near_region.start()
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
                    if far.stats().size <= far.min_size:
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
                    f" (down to its floor {shrunk_after or float('nan'):.1f} s after the"
                    f" fail-back; calls hold {args.hold} s)"
                )
                in_steady[0] = True
                await asyncio.sleep(args.hold)  # the next round starts with calls on the primary

            max_after_open = max(all_after_open_wait, default=0.0)
            group_p99_ratio = pct(outage_group, 0.99) / pct(outage_control, 0.99)
            print(
                f"   over {args.rounds} outages: {totals['new']} new calls, {totals['failed']}"
                f" failed, {totals['slow_waits']} waited > 1 ms after the circuit opened"
                f" (of them: {totals['queued']} queued for a connection, {totals['suspended']}"
                f" suspended, {totals['preempted']} preempted by the kernel, {totals['in_gc']}"
                f" mostly in GC); acquire wall time max after the circuit opened"
                f" {max_after_open * 1e3:.2f} ms, CPU in acquire p50"
                f" {pct(cpu_after_open, 0.5):.3f} ms max {pct(cpu_after_open, 1.0):.3f} ms, calls"
                f" that suspended {suspended_after_open} of {len(cpu_after_open)};"
                f" {totals['crashing']} calls during the resets, {totals['crash_failed']}"
                f" failed. First turn p99 group {pct(outage_group, 0.99):.1f} ms"
                f" ({len(outage_group)} calls) / warm control beside it"
                f" {pct(outage_control, 0.99):.1f} ms ({len(outage_control)}):"
                f" {group_p99_ratio:.2f}x pooled; per round {', '.join(f'{x:.2f}' for x in ratios)}"
                f" (median {statistics.median(ratios):.2f}x). Group calls on a connection's first"
                f" lease (a standby spare, or one the standby opened as it grew): p50"
                f" {pct(fresh_turns, 0.5):.1f}"
                f" p99 {pct(fresh_turns, 0.99):.1f} ms ({len(fresh_turns)}); on one used before:"
                f" p50 {pct(reused_turns, 0.5):.1f} p99 {pct(reused_turns, 0.99):.1f} ms"
                f" ({len(reused_turns)})"
            )

            # -- 5. flapping ----------------------------------------------------------------------
            n_switch = len(switches.seen)
            in_steady[0] = False
            for _ in range(3):
                await near_region.crash()
                await asyncio.sleep(2.0)
                await near_region.start()
                await asyncio.sleep(2.0)
            flaps = switches.seen[n_switch:]
            print(
                f"5. flapping (down/up every 2 s, 3 cycles, failback_after"
                f" {args.failback_after} s): {sum(1 for s in flaps if not s[4])} failovers,"
                f" {sum(1 for s in flaps if s[4])} fail-backs"
            )
            await traffic.stop()
            sampler.cancel()
            by_gen = [[g for g in probe.pauses if g[3] == gen] for gen in range(3)]
            print(
                f"   GC over the run (gc.freeze() after boot: {'yes' if args.gc_freeze else 'no'}):"
                + "; ".join(
                    f" generation {gen}: {len(ps)} collections, CPU p50"
                    f" {pct([g[2] for g in ps], 0.5):.2f} max {pct([g[2] for g in ps], 1.0):.2f} ms"
                    for gen, ps in enumerate(by_gen)
                )
            )
            print(
                f"   over the run: {len(traffic.calls)} calls, failovers {group.failovers},"
                f" fail-backs {group.failbacks}; standby connections held (standby"
                f" {args.standby}, standby_min {args.standby_min}): in normal traffic (phase 2,"
                f" and between rounds once shrunk) mean {statistics.fmean(steady):.1f} max"
                f" {max(steady)} ({len(steady)} samples); over the whole run (with the old"
                f" active's leased sockets after each fail-back) mean {statistics.fmean(held):.1f}"
                f" max {max(held)}"
            )

        # -- 6. the framework-style fallback, same outage ------------------------------------------
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
        t_crash, _ = await near_region.crash()
        await asyncio.sleep(args.seconds)
        await fw.stop()
        await ctl.stop()
        await control.aclose()
        new = fw.since(t_crash, t_crash + args.seconds)
        turns = [c.first_turn for c in new if not c.error]
        beside = control_window(t_crash, t_crash + args.seconds)
        print(
            f"6. framework fallback, same outage: new calls {len(new)}, failed"
            f" {sum(1 for c in new if c.error)}, first turn p50 {pct(turns, 0.5):.1f} ms"
            f" p99 {pct(turns, 0.99):.1f} ms = {pct(turns, 0.99) / pct(beside, 0.99):.2f}x"
            f" the far region's warm p99 beside it (group: {group_p99_ratio:.2f}x)"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=25.0, help="call arrivals a second")
    parser.add_argument("--hold", type=float, default=4.0, help="seconds a call holds its stream")
    parser.add_argument(
        "--standby", choices=("adaptive", "fixed"), default="adaptive", help="standby floor"
    )
    parser.add_argument(
        "--standby-min", type=int, default=1, help="standby's warm spares (at least, if adaptive)"
    )
    parser.add_argument("--spares", type=int, default=10, help="active member's warm spares")
    parser.add_argument(
        "--reuse",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="EXCLUSIVE Deepgram sockets (Finalize as reset); --no-reuse: SINGLE_USE spares",
    )
    parser.add_argument("--failback-after", type=float, default=3.0)
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each phase")
    parser.add_argument("--rounds", type=int, default=5, help="outage + fail-back rounds")
    parser.add_argument("--verbose", action="store_true", help="the slowest calls of each outage")
    parser.add_argument(
        "--gc-freeze",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="gc.freeze() once booted, as a worker should (--no-gc-freeze: leave the GC as is)",
    )
    parser.add_argument(
        "--cpu-clock-inside",
        action="store_true",
        help="read the thread CPU clock inside the acquire's timed window (the old, unsound way)",
    )
    if sys.argv[1:2] == ["--serve"]:  # a region's child process: --serve LATENCY PORT
        asyncio.run(serve(float(sys.argv[2]), int(sys.argv[3])))
        sys.exit(0)
    asyncio.run(main(parser.parse_args()))

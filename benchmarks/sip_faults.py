"""The SIP fault matrix (``benchmarks/sip.py --faults``): what a SIP pool hands out while its
registrar fails, measured against real registrars on 127.0.0.1.

    .venv/bin/python benchmarks/sip.py --faults [--transport udp|tcp] [--ping-interval 5]
                                       [--ping-timeout 5]

Shipped pool settings except ``min_size = max_size`` and ``ping_interval`` (printed). During each
scenario a load loop takes a lease every 10 ms with zero hold time and records, for each one,
whether the registrar really held that registration's binding at that moment ("truth": Kamailio's
location table, polled every 100 ms through kamcmd, or the emulator's bindings), and every
acquire that failed. Figures:

* seconds to detect: from the fault until the pool stops lending (the first acquire that fails);
* seconds to recover: from the heal until a lease of a registration the registrar holds again;
* leases handed out unregistered: leases whose binding the registrar did not hold (the failure
  the pool exists to prevent);
* REGISTERs a second during a 503 storm (SIPp answering every REGISTER 503);
* beside down-and-back and the restart, what an OPTIONS keepalive (1 s, 1 s timeout; measured
  here, not done by the adapter) would have seen: a registrar gone silent after about a second,
  but not a restart's lost bindings (a restarted registrar answers OPTIONS at once).

Scenarios: registrar down and back (Kamailio stopped until the pool notices, at most 40 s, then
started), flapping (the emulator accepts for 3 s, then answers 503 for 3 s, three times), 503
storm (SIPp, 6 s), restart under load (Kamailio stopped and started at once: its location table
comes back empty). Every loop is bounded in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from pydantic import SecretStr

from voicepool import Pool, PoolError, PoolSettings
from voicepool.adapters.sip import SipAdapter, SipEngine, SipOptions, SipRegistration
from voicepool.testing.sip_registrar import SipRegistrar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.peers.kamailio import Kamailio, options_ok
from tests.peers.sipp import Sipp

TICK = 0.01  # one zero-hold lease every 10 ms


@dataclass
class Sample:
    at: float
    ok: bool  # the acquire succeeded
    bound: bool = False  # ... and the registrar held that registration's binding


class Background:
    """A loop (``_run``) that runs in its own task while ``async with`` lasts, cancelled at exit."""

    _task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


@dataclass
class Load(Background):
    """Zero-hold leases in a loop; each sample records the registrar's truth at lease time."""

    pool: Pool[SipRegistration]
    truth: Callable[[SipRegistration], bool]
    samples: list[Sample] = field(default_factory=list)

    async def _run(self) -> None:
        while True:
            t = time.monotonic()
            try:
                async with self.pool.acquire(timeout=0.2) as lease:
                    self.samples.append(Sample(t, True, self.truth(lease.conn)))
            except PoolError:
                self.samples.append(Sample(t, False))
            await asyncio.sleep(TICK)

    def detect(self, fault: float) -> float | None:
        return next((s.at - fault for s in self.samples if s.at >= fault and not s.ok), None)

    def recover(self, heal: float) -> float | None:
        return next((s.at - heal for s in self.samples if s.at >= heal and s.bound), None)

    def recovered(self, heal: float) -> bool:
        return self.recover(heal) is not None

    def unregistered(self, start: float, end: float = float("inf")) -> tuple[int, int]:
        """(leases handed out unregistered, leases handed out) between start and end."""
        leases = [s for s in self.samples if start <= s.at < end and s.ok]
        return sum(not s.bound for s in leases), len(leases)


class KamailioTruth(Background):
    """Which registrations Kamailio holds, from ``kamcmd ul.dump`` every 100 ms."""

    def __init__(self, kam: Kamailio) -> None:
        self.kam = kam
        self.up = True
        self.started_at = 0.0  # monotonic time the running instance was started
        self.tags: set[str] = set()

    def __call__(self, reg: SipRegistration) -> bool:
        # A 200 from the running instance means its table holds the binding (the 100 ms poll
        # may not show it yet); before that, the polled table is the truth.
        return self.up and (reg.registered_at >= self.started_at or reg.contact_tag in self.tags)

    async def _run(self) -> None:
        while True:
            if self.up:
                with contextlib.suppress(Exception):
                    contacts = await self.kam.contacts()
                    self.tags = {
                        part[4:] for c in contacts for part in c.address.split(";")
                        if part.startswith("vpl=")
                    }  # fmt: skip
            await asyncio.sleep(0.1)

    async def __aenter__(self) -> Self:
        await super().__aenter__()
        await asyncio.sleep(0.3)  # the first polls fill the table
        return self

    async def stop(self) -> None:
        self.up = False
        self.tags = set()
        await self.kam.stop()

    async def start(self) -> None:
        await self.kam.start()
        self.tags = set()  # usrloc is in memory: the table starts empty
        self.started_at = time.monotonic()
        self.up = True


class OptionsWatch(Background):
    """What an OPTIONS keepalive would see (not something the adapter does): one OPTIONS to the
    registrar every ``interval`` s over UDP, unanswered after ``timeout`` s counting as down.
    Measured beside the pool to compare with its detection (a refresh REGISTER as the ping)."""

    def __init__(self, kam: Kamailio, interval: float = 1.0, timeout: float = 1.0) -> None:
        self.kam, self.interval, self.timeout = kam, interval, timeout
        self.failed: list[float] = []  # when each unanswered probe was sent
        self.sent = 0

    async def _run(self) -> None:
        while True:
            t = time.monotonic()
            self.sent += 1
            if not await options_ok(self.kam.host, self.kam.port, self.timeout):
                self.failed.append(t)
            await asyncio.sleep(max(0.0, t + self.interval - time.monotonic()))

    def detect(self, fault: float) -> float | None:
        """Seconds from ``fault`` to the end of the first unanswered probe sent after it."""
        late = [t for t in self.failed if t >= fault]
        return late[0] + self.timeout - fault if late else None


def adapter_for(uri: str, transport: str) -> SipAdapter:
    return SipAdapter(
        SipOptions(
            aor="sip:alice@127.0.0.1", registrar=uri, password=SecretStr("secret"),
            transport=transport, expires=10 if transport == "udp" else 30,
            bind_address="127.0.0.1", unregister_timeout=0.5,
        )
    )  # fmt: skip


async def until(check: Callable[[], bool], cap: float) -> float:
    """Seconds until ``check()`` holds (polled every 20 ms), at most ``cap``."""
    t0 = time.monotonic()
    # State no event announces (the samples of the load loop, a registrar's table): poll it.
    while not check() and time.monotonic() - t0 < cap:  # noqa: ASYNC110
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


def fmt(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f} s"


async def down_and_back(settings: PoolSettings, transport: str) -> None:
    async with Kamailio(password="secret") as kam, KamailioTruth(kam) as truth:
        pool = Pool(adapter_for(kam.uri, transport), settings, name="sip-faults")
        async with pool, Load(pool, truth) as load, OptionsWatch(kam) as options:
            await asyncio.sleep(1.0)
            fault = time.monotonic()
            await truth.stop()
            # Down until the pool stops lending, at most 40 s (ping interval + timeout + lapse).
            await until(lambda: load.detect(fault) is not None, 40.0)
            await until(lambda: options.detect(fault) is not None, 3.0)
            heal = time.monotonic()
            await truth.start()
            await until(lambda: load.recover(heal) is not None, 40.0)
            await asyncio.sleep(0.5)
        bad, total = load.unregistered(fault, heal)
        print(f"  down and back ({transport})      detect {fmt(load.detect(fault)):>8}"
              f"   recover {fmt(load.recover(heal)):>8}   leases while down: {bad} of {total}"
              f" unregistered")  # fmt: skip
        print(f"    an OPTIONS probe every {options.interval:g} s ({options.timeout:g} s timeout)"
              f" would have seen it down after {fmt(options.detect(fault))}")  # fmt: skip


async def restart_under_load(settings: PoolSettings, transport: str) -> None:
    async with Kamailio(password="secret") as kam, KamailioTruth(kam) as truth:
        pool = Pool(adapter_for(kam.uri, transport), settings, name="sip-faults")
        async with pool, Load(pool, truth) as load, OptionsWatch(kam) as options:
            await asyncio.sleep(1.0)
            fault = time.monotonic()
            await truth.stop()
            await truth.start()
            heal = time.monotonic()
            # Every registration bound again, or 15 s.
            await until(lambda: len(truth.tags) >= (pool.min_size or 1), 15.0)
            rebound = time.monotonic() - heal
            await asyncio.sleep(0.5)
        bad_after, total_after = load.unregistered(heal, heal + rebound)
        bad_down, total_down = load.unregistered(fault, heal)
        print(
            f"  restart under load ({transport}) restart took {heal - fault:.2f} s; all"
            f" re-bound {fmt(rebound)} after it; unregistered leases:"
            f" {bad_down} of {total_down} during, {bad_after} of {total_after} after"
        )
        missed = sum(1 for t in options.failed if t >= fault - options.timeout)
        print(f"    an OPTIONS probe every {options.interval:g} s: {missed} of {options.sent}"
              " unanswered around the restart (then answered, the bindings gone)")  # fmt: skip


async def flapping(settings: PoolSettings) -> None:
    async with SipRegistrar(users={"alice": "secret"}) as emu:

        def bound(reg: SipRegistration) -> bool:
            return any(f"vpl={reg.contact_tag}" in b.contact for b in emu.bindings("alice"))

        pool = Pool(adapter_for(emu.uri, "udp"), settings, name="sip-faults")
        detects: list[float] = []
        recovers: list[float] = []
        async with pool, Load(pool, bound) as load:
            t_start = time.monotonic()
            for _ in range(3):
                await asyncio.sleep(3.0)
                emu.mode = "503"
                fault = time.monotonic()
                await asyncio.sleep(3.0)
                emu.mode = "ok"
                heal = time.monotonic()
                detected = load.detect(fault)
                if detected is not None and detected < heal - fault:
                    detects.append(detected)
                await until(functools.partial(load.recovered, heal), 10.0)
                if (rec := load.recover(heal)) is not None:
                    recovers.append(rec)
        bad, total = load.unregistered(t_start)
        rates = per_second(emu.register_times)
        seen = (
            f"{len(detects)} of 3 503-phases seen, median detect"
            if detects
            else "no 503 phase seen"
        )
        med = f" {statistics.median(detects):.2f} s" if detects else ""
        med_rec = f"{statistics.median(recovers):.2f} s" if recovers else "never"
        print(f"  flapping (3 s ok / 3 s 503 x3) {seen}{med}; median recover {med_rec};"
              f" {bad} of {total} leases unregistered; REGISTERs/s max {max(rates)}")  # fmt: skip


def per_second(times: list[float]) -> list[int]:
    if not times:
        return [0]
    start = min(times)
    buckets = Counter(int(t - start) for t in times)
    return [buckets.get(i, 0) for i in range(max(buckets) + 1)]


async def storm(settings: PoolSettings, transport: str) -> None:
    async with Sipp("reg503", transport=transport) as sipp:
        pool = Pool(adapter_for(sipp.uri, transport), settings, name="sip-faults")
        await pool.start(require_ready=False)
        try:
            await asyncio.sleep(6.0)  # the window measured
        finally:
            await pool.aclose()
        registers = sipp.registers()
    rates = per_second([t for t, _, _ in registers])
    attempts = Counter(call_id for _, call_id, _ in registers)
    print(
        f"  503 storm ({transport}, {pool.min_size} registrations) REGISTERs/s: max"
        f" {max(rates)}, mean {statistics.mean(rates):.1f} over {len(rates)} s;"
        f" at most {max(attempts.values())} REGISTER per account (no retry of pjsua's own)"
    )


async def run(args: Any) -> None:
    timeout = args.ping_timeout
    if timeout is None:
        timeout = min(PoolSettings().ping_timeout, args.ping_interval)
    base = PoolSettings(
        min_size=2, max_size=2, ping_interval=args.ping_interval, ping_timeout=timeout
    )
    print(f"SIP fault matrix ({args.transport}; shipped settings, min=max=2,"
          f" ping_interval {base.ping_interval:g} s, ping_timeout {base.ping_timeout:g} s,"
          f" backoff {base.backoff_initial:g}..{base.backoff_max:g} s)")  # fmt: skip
    engine = SipEngine.get()
    with engine.hold():
        await down_and_back(base, args.transport)
        await restart_under_load(
            base.model_copy(update={"min_size": 4, "max_size": 4}), args.transport
        )
        await flapping(base)
        await storm(base.model_copy(update={"min_size": 4, "max_size": 4}), args.transport)
    assert await engine.wait_stopped(10)


__all__ = ["run"]

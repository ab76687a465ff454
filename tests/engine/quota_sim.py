"""Several `PoolCore`s with fleet quotas on one virtual clock, sharing an in-memory backend.

``MemoryFleet`` keeps the rules of voicepool.quota's Lua script (expiry first, a holding set to
``want`` up to the limit, spares yield to holders with callers waiting, re-registration of what
is held open) in Python, so the core's side of the quota is tested with no Redis and no loop;
tests/fleet runs the real script on a real redis-server.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from voicepool import LeaseMode, PoolSettings
from voicepool._engine.actions import Close, QuotaSync
from voicepool._engine.core import PoolCore
from voicepool._engine.quota import QuotaGrant
from voicepool._engine.record import ConnRecord
from voicepool.pool import _gate as quota_gate

from .sim import Sim


@dataclass
class MemoryFleet:
    limit: int
    ttl: float
    up: bool = True
    held: dict[str, tuple[int, float]] = field(default_factory=dict)  # holder -> (n, expiry)
    waiting: dict[str, int] = field(default_factory=dict)
    busy: dict[str, int] = field(default_factory=dict)
    calls: int = 0
    max_used: int = 0
    recover: float = 1.0  # after a data loss, no new tokens for this long (the pools' 2 refresh)
    epoch: int = 0
    recover_until: float = -1.0
    last: float = -1.0  # the last sync of anyone
    known: dict[str, int] = field(default_factory=dict)  # holder -> epoch it saw (its client)

    def lose_data(self) -> None:
        """Redis restarted without persistence: every token and demand entry is gone."""
        self.held.clear()
        self.waiting.clear()
        self.busy.clear()
        self.epoch += 1

    def _evict(self, now: float) -> None:
        for h, (_n, exp) in list(self.held.items()):
            if exp <= now:
                del self.held[h]
                self.waiting.pop(h, None)
                self.busy.pop(h, None)

    def used(self, now: float) -> int:
        self._evict(now)
        return sum(n for n, _ in self.held.values())

    def sync(self, now: float, holder: str, a: QuotaSync, step: int = 1) -> QuotaGrant:
        self.calls += 1
        had = any(n or self.busy.get(h) or self.waiting.get(h) for h, (n, _) in self.held.items())
        if had and self.last >= 0 and now - self.last > self.recover:
            self.recover_until = max(self.recover_until, now + self.recover)  # after an outage
        self.last = now
        self._evict(now)
        if holder in self.known and self.known[holder] != self.epoch:
            self.recover_until = max(self.recover_until, now + self.recover)
        elif holder in self.known and a.claimed > 0 and holder not in self.held:
            self.recover_until = max(self.recover_until, now + self.recover)  # expired meanwhile
        self.known[holder] = self.epoch
        recovering = now < self.recover_until
        present = self.held.get(holder, (0, 0.0))[0]
        others = sum(v for h, v in self.waiting.items() if h != holder)
        room = self.limit - sum(n for n, _ in self.held.values())
        g = min(a.want, present)
        back = min(a.want, a.claimed) - g
        if back > 0 and room > 0:
            back = min(back, room)
            g, room = g + back, room - back
        if a.want > g and room > 0 and not recovering and not (a.waiting == 0 and others > 0):
            g += min(a.want - g, room)
        g -= g % step
        self.held[holder] = (g, now + self.ttl)
        if a.waiting:
            self.waiting[holder] = a.waiting
        else:
            self.waiting.pop(holder, None)
        self.busy[holder] = a.busy
        used = sum(n for n, _ in self.held.values())
        self.max_used = max(self.max_used, used)
        holders = sum(1 for n, _ in self.held.values() if n)
        workers = len(self.held)
        busy = sum(self.busy.values())
        return QuotaGrant(g, used, holders, others, busy, "mem", False, workers)


class QuotaSim(Sim):
    """A Sim whose core has a quota gate; its QuotaSync actions go to ``fleet`` after ``rtt``."""

    def __init__(
        self,
        settings: PoolSettings,
        fleet: MemoryFleet,
        name: str,
        *,
        mode: LeaseMode = LeaseMode.EXCLUSIVE,
        max_streams: int = 1,
        seed: int = 1,
    ) -> None:
        super().__init__(settings, mode=mode, max_streams=max_streams, seed=seed)
        self.core.quota = quota_gate(settings, mode, max_streams)
        assert self.core.quota is not None, "a QuotaSim needs settings with a quota"
        self.fleet = fleet
        self.name = name
        self.syncs: list[QuotaSync] = []

    def apply(self, actions: Any) -> None:
        rest = []
        for a in actions:
            if isinstance(a, Close):
                self._closed_later(a.rec)
            if isinstance(a, QuotaSync):
                self.actions.append(a)
                self.syncs.append(a)
                self._sync(a)
            else:
                rest.append(a)
        super().apply(rest)

    def _closed_later(self, rec: ConnRecord[Any]) -> None:
        self.at(self.now + self.rtt, lambda: self.apply(self.core.quota_closed(rec, self.now)))

    def _sync(self, a: QuotaSync) -> None:
        def answer() -> None:
            if not self.fleet.up:
                self.apply(self.core.quota_failed(self.now))
                return
            per = self.core.quota.per if self.core.quota is not None else 1
            grant = self.fleet.sync(self.now, self.name, a, per)
            self.apply(self.core.quota_synced(grant, self.now))

        self.at(self.now + self.rtt, answer)


def lockstep(sims: list[QuotaSim], t_end: float, dt: float = 0.005) -> None:
    """Run every sim to ``t_end`` in steps of ``dt`` (their backend's clock is the step's)."""
    t = max(s.now for s in sims)
    while t < t_end - 1e-12:
        t = min(t_end, t + dt)
        for s in sims:
            s.run_until(t)


def open_conns(core: PoolCore[Any]) -> int:
    return len(core.conns) + core.opening


INF = math.inf

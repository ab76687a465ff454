"""The core state machine (tests/engine/test_state_machine.py) with a fleet quota on the pool.

The machine plays the quota's backend too: a sync stays in flight until a rule answers it
(granting from what the rest of the fleet leaves free, which another rule changes) or fails
it; a retired connection's close stays in flight until a rule completes it. Besides every
invariant of the base machine: the connections open, opening or still closing never need more
tokens than the backend holds for this pool, and one sync at most is in flight.
"""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, precondition, rule

from tests.engine.test_state_machine import MACHINE_SETTINGS, Conn, CoreMachine
from voicepool import LeaseMode
from voicepool._engine.actions import Action, Close, QuotaSync
from voicepool._engine.quota import QuotaGate, QuotaGrant
from voicepool._engine.record import ConnRecord


class QuotaMachine(CoreMachine):
    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[QuotaSync] = []
        self.closes: list[ConnRecord[Conn]] = []
        self.limit = 4
        self.others = 0  # tokens the rest of the fleet holds
        self.others_waiting = 0  # callers waiting in the rest of the fleet
        self.backend = 0  # tokens the backend holds for this pool
        self.draining = False

    def perform(self, a: Action) -> None:
        if isinstance(a, QuotaSync):
            assert not self.syncs, "two syncs in flight"
            self.syncs.append(a)
            return
        super().perform(a)
        if isinstance(a, Close):
            self.closes.append(a.rec)

    def apply(self, actions: object) -> None:
        super().apply(actions)
        while self.draining and (self.syncs or self.closes):
            if self.closes:
                super().apply(self.c.quota_closed(self.closes.pop(), self.now))
            else:
                self._answer(room=True)

    @initialize(
        mode=st.sampled_from(list(LeaseMode)),
        max_size=st.integers(1, 4),
        min_size=st.integers(0, 4),
        seed=st.integers(0, 2**16),
        limit=st.integers(1, 6),
    )
    def start(  # replaces the base machine's initialize: the same pool, with a quota
        self, mode: LeaseMode, max_size: int, min_size: int, seed: int, limit: int = 4
    ) -> None:
        self.limit = limit
        quota = {"key": "sm", "limit": limit, "unit": "stream", "ttl": 4, "refresh": 2}
        self.launch(mode, max_size, min_size, seed, quota=quota)

    def _gate(self) -> QuotaGate:
        q = self.c.quota
        assert q is not None
        return q

    def _answer(self, room: bool) -> None:
        a = self.syncs.pop()
        free = self.limit - self.others - self.backend
        if room:
            free = max(free, a.want)  # teardown: the fleet makes room
        g = min(a.want, self.backend + max(0, free))
        g -= g % self._gate().per
        self.backend = g
        waiting = 0 if room else self.others_waiting
        busy = a.busy + waiting
        grant = QuotaGrant(g, g + self.others, 1 + bool(self.others), waiting, busy, "e", False, 2)
        super().apply(self.c.quota_synced(grant, self.now))

    @precondition(lambda self: bool(self.syncs))
    @rule(ok=st.booleans())
    def sync_done(self, ok: bool) -> None:
        if ok:
            self._answer(room=False)
        else:
            self.syncs.pop()
            self.apply(self.c.quota_failed(self.now))

    @precondition(lambda self: bool(self.closes))
    @rule(data=st.data())
    def close_done(self, data: st.DataObject) -> None:
        rec = data.draw(st.sampled_from(self.closes))
        self.closes.remove(rec)
        self.apply(self.c.quota_closed(rec, self.now))

    @rule(others=st.integers(0, 6), waiting=st.integers(0, 2))
    def fleet_changes(self, others: int, waiting: int) -> None:
        # Others take only what is free (the backend never over-grants); callers waiting there
        # make this pool give up idle spares when the account is full.
        self.others = min(others, max(0, self.limit - self.backend))
        self.others_waiting = waiting

    @invariant()
    def within_backend(self) -> None:
        if not self.started or self.c.quota is None:
            return
        q = self._gate()
        held = len(self.c.conns) + self.c.opening + len(q.closing)
        assert held * q.per <= self.backend, (held, q.per, self.backend, q)
        assert q.in_flight == bool(self.syncs)

    def teardown(self) -> None:
        if not self.started:
            return
        self.draining = True
        self.others = 0
        self.apply([])
        super().teardown()


QuotaMachine.TestCase.settings = settings(MACHINE_SETTINGS, max_examples=300)

TestQuotaStateMachine = pytest.mark.timeout(300)(QuotaMachine.TestCase)

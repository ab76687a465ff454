"""An open circuit always has a way to probe, a full pool included: on the pure core, virtual time.

The circuit closes only on a successful connect (the half-open probe; a proof must not close it:
a 401 learned on a request must keep it open). A pool at ``max_size`` whose circuit opened
while no connection was lost (a fatal error the adapter learnt on a connection it keeps open,
such as a 401 on a request) has no free slot for that probe: the probe takes the slot of an
idle connection, the unproven one first, then the least recently used.
"""

from __future__ import annotations

from typing import Any

import pytest

from voicepool import LeaseMode, PoolSettings, PoolState
from voicepool._engine.actions import Close, Connect
from voicepool._engine.record import ConnState
from voicepool.errors import ConnectError

from .sim import Sim


def cfg(**kw: Any) -> PoolSettings:
    return PoolSettings.model_validate(kw)


def circuit_open(sim: Sim) -> bool:
    """(A call, so mypy does not keep the core's flag narrowed across the runs.)"""
    return sim.core.circuit_open


def rejected() -> ConnectError:
    return ConnectError("sim://provider answered HTTP 401", fatal=True, status=401)


MODES = [(LeaseMode.EXCLUSIVE, 1), (LeaseMode.SINGLE_USE, 1), (LeaseMode.MULTIPLEXED, 4)]


@pytest.mark.parametrize(("mode", "streams"), MODES)
@pytest.mark.parametrize("learnt_at", [0.5, 3.0])  # while every connection is unproven; after
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_full_pool_whose_circuit_opened_probes_and_closes_it(
    mode: LeaseMode, streams: int, learnt_at: float, seed: int
) -> None:
    """2 of 2 connections open; the adapter learns a 401 on one and keeps it open: the circuit
    opens with nothing lost, so no slot is free. The provider answers again: within
    backoff_max + 2 s the probe has replaced one idle connection, the circuit is closed and the
    pool is full and READY (it stayed UNAVAILABLE for good)."""
    s = cfg(min_size=2, max_size=2, backoff_max=5.0)
    sim = Sim(s, mode=mode, max_streams=streams, seed=seed)
    sim.start()
    sim.run_until(learnt_at)
    core = sim.core
    assert len(core.conns) == 2
    assert all(not r.proven for r in core.conns.values()) is (learnt_at < s.min_healthy)
    sim.learn(sim.conns[0], rejected())
    opened = core.circuit_open
    assert opened
    assert len(core.conns) == core.max_size  # nothing was lost: no free slot
    before = len(sim.connects)
    t = sim.now
    while sim.core.circuit_open:
        t += 0.05
        sim.run_until(t)
        assert t - learnt_at <= s.backoff_max + 2.0, sim.core.stats()
    assert len(sim.connects) - before == 1  # one probe, one connect at a time
    probed = [a for a in sim.actions if isinstance(a, Close) and a.reason == "probe"]
    assert len(probed) == 1
    sim.run_until(t + s.min_healthy + 0.1)
    assert len(sim.core.conns) == 2
    assert sim.core.state is PoolState.READY


def test_the_probe_replaces_the_discredited_then_the_unproven_connection() -> None:
    """Which idle connection makes room: one the adapter reports refused (a 401 on it) first,
    then an unproven one (it says the least), then the least recently used."""
    s = cfg(min_size=3, max_size=3)
    sim = Sim(s, seed=1)
    sim.hold = 10.0
    sim.start()
    sim.run_until(3.0)  # three connections, proven by min_healthy
    core = sim.core
    assert sim.acquire(1.0) is None  # one is held until 13 s
    (held,) = [r for r in core.conns.values() if r.state is ConnState.IN_USE]
    lost = next(r for r in core.idle if r is not held)
    sim.kill(lost.conn)  # a mature loss: its replacement comes within backoff_initial
    sim.run_until(4.5)
    young = [r for r in core.conns.values() if not r.proven]
    assert len(young) == 1
    assert len(core.conns) == 3
    sim.learn(held.conn, rejected())  # a 401 on the held connection's request
    assert circuit_open(sim)
    sim.run_until(4.5 + s.backoff_initial + 0.05)
    (probe,) = [a for a in sim.actions if isinstance(a, Close) and a.reason == "probe"]
    assert probe.rec is young[0]
    assert not circuit_open(sim)
    # Opened again on an idle connection: that one is replaced, not the healthy others.
    (proven,) = [r for r in core.idle if r.proven]
    sim.learn(proven.conn, rejected())
    assert circuit_open(sim)
    sim.run_until(sim.now + 2 * s.backoff_initial * s.backoff_multiplier)
    probes = [a.rec for a in sim.actions if isinstance(a, Close) and a.reason == "probe"]
    assert probes[1:] == [proven]


def test_a_full_pool_with_every_connection_held_probes_at_the_first_release() -> None:
    """Nothing idle to replace: no probe (a held connection is never interrupted) until a lease
    ends; then that connection makes room and the probe runs."""
    s = cfg(min_size=2, max_size=2)
    sim = Sim(s, seed=4)
    sim.hold = 10.0  # callers hold their connections for 10 s
    sim.start()
    sim.run_until(0.1)
    assert sim.acquire(1.0) is None
    assert sim.acquire(1.0) is None
    sim.learn(sim.conns[0], rejected())
    assert sim.core.circuit_open
    before = len(sim.connects)
    sim.run_until(5.0)
    assert len(sim.connects) == before  # every connection is held: nothing to replace
    assert sim.core.circuit_open
    sim.run_until(10.2)  # both leases ended cleanly
    assert len(sim.connects) == before + 1
    assert not sim.core.circuit_open


def test_no_probe_replaces_a_connection_while_the_backoff_runs() -> None:
    """The probe waits for its retry time like any probe: a fatal error learnt again and again
    draws one replacement per backoff step, not one per error."""
    s = cfg(min_size=2, max_size=2, backoff_initial=1.0, backoff_max=8.0)
    sim = Sim(s, seed=5)
    sim.start()
    sim.run_until(0.1)
    t = 0.1
    probes = 0
    while t < 30.0:
        for conn in sim.conns:
            if conn.open and not conn.closed and conn.error is None:
                sim.learn(conn, rejected())  # every connection's next request: 401 again
                break
        t += 0.25
        sim.run_until(t)
        probes = sum(1 for a in sim.actions if isinstance(a, Close) and a.reason == "probe")
    assert 1 <= probes <= 12, probes
    assert sim.core.steps >= 3


def test_probe_connects_are_counted_as_connects() -> None:
    s = cfg(min_size=1, max_size=1)
    sim = Sim(s, seed=6)
    sim.start()
    sim.run_until(0.1)
    sim.learn(sim.conns[0], rejected())
    assert sim.core.circuit_open
    sim.run_until(3.0)
    assert [type(a) for a in sim.actions if isinstance(a, Connect | Close)][-2:] == [Close, Connect]
    assert sim.core.stats().connects == 2
    assert sim.core.stats().closed == {"probe": 1}

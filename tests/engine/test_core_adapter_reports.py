"""What an adapter reports about a connection it retires (``Adapter.close_reason`` and
``Adapter.connection_error``) reaches the core's close reasons, ``last_error`` and circuit:
driven on the pure core, no event loop."""

from __future__ import annotations

import random
from dataclasses import dataclass

from voicepool import LeaseMode, PoolSettings, PoolState
from voicepool._engine.actions import Close, Connect, Fail
from voicepool._engine.core import PoolCore
from voicepool._engine.waitqueue import Waiter
from voicepool.errors import ConnectError, PoolUnavailable
from voicepool.pool_settings import ResolvedSizing


@dataclass(eq=False)
class Conn:
    reason: str | None = None
    error: BaseException | None = None


def _core(conns: int, min_healthy: float = 0.0) -> tuple[PoolCore[Conn], list[Conn]]:
    cfg = PoolSettings(min_size=conns, max_size=conns, failure_threshold=5, min_healthy=min_healthy)
    core: PoolCore[Conn] = PoolCore(
        "llm",
        cfg,
        ResolvedSizing(LeaseMode.MULTIPLEXED, 4, conns, conns),
        ping_interval=30,
        rng=random.Random(1),
        is_open=lambda conn: True,
        describe="fake://llm",
        close_reason=lambda conn: conn.reason,
        connection_error=lambda conn: conn.error,
        is_fatal=lambda exc: isinstance(exc, ConnectError) and exc.fatal,
    )
    attempts = [a for a in core.start(0.0) if isinstance(a, Connect)]
    made = [Conn() for _ in attempts]
    for attempt, conn in zip(attempts, made, strict=True):
        core.connected(attempt, conn, 0.1, cap=4)
    core.check()
    return core, made


def test_a_drain_the_adapter_names_goaway_is_counted_as_goaway() -> None:
    core, (conn,) = _core(1)
    conn.reason = "goaway"
    closes = [a for a in core.changed(conn, True, 0, 5.0) if isinstance(a, Close)]
    assert [c.reason for c in closes] == ["goaway"]  # not "expired"
    assert core.stats().closed == {"goaway": 1}
    core.check()


def test_a_protocol_error_becomes_last_error_without_opening_the_circuit() -> None:
    core, (conn,) = _core(1)
    conn.error = ConnectionError("HTTP/2 protocol error from https://llm: bad frame")
    core.changed(conn, False, 0, 5.0)
    assert core.last_error is conn.error
    assert core.state is not PoolState.UNAVAILABLE
    core.check()


def test_a_fatal_error_on_draining_connections_opens_the_circuit_once() -> None:
    core, conns = _core(2)
    rejected = ConnectError("https://llm answered HTTP 401", fatal=True, status=401)
    for conn in conns:  # a 401 drains every connection with the same error
        conn.error = rejected
        conn.reason = "rejected"
        core.changed(conn, True, 0, 5.0)
    assert core.state is PoolState.UNAVAILABLE
    assert core.stats().connect_failures == 1  # one signal, not one per connection
    assert core.stats().closed == {"rejected": 2}
    waiter = Waiter(deadline=100.0, timeout=95.0)
    (fail,) = [a for a in core.wait(waiter, 5.1) if isinstance(a, Fail)]
    assert isinstance(fail.error, PoolUnavailable)
    assert fail.error.__cause__ is rejected
    core.check()


def test_a_young_loss_keeps_the_adapters_fatal_error_and_its_status() -> None:
    """A SIP refresh refused with 403 inside min_healthy: the circuit opens with that error."""
    core, (conn,) = _core(1, min_healthy=2.0)
    conn.error = ConnectError(
        "registrar answered the refresh REGISTER with 403", fatal=True, status=403
    )
    core.changed(conn, False, 0, 0.5)
    assert core.state is PoolState.UNAVAILABLE
    assert core.last_error is conn.error
    assert core.stats().connect_failures == 1
    core.check()


def test_a_young_loss_wraps_a_retryable_error_and_keeps_its_status() -> None:
    core, (conn,) = _core(1, min_healthy=2.0)
    conn.error = ConnectError("registrar answered the refresh REGISTER with 503", status=503)
    core.changed(conn, False, 0, 0.5)
    last = core.last_error
    assert isinstance(last, ConnectError)
    assert last.status == 503
    assert last.__cause__ is conn.error
    assert "lost 400 ms after it opened" in str(last)
    core.check()


def test_a_young_loss_does_not_fail_waiters_that_can_wait_for_the_retry() -> None:
    """A GOAWAY right after the handshake: the server answers, so a waiter whose deadline is
    after the scheduled reconnect waits for it (the refused streams' retries), instead of
    failing fast as for a provider that refuses connections."""
    core, (conn,) = _core(1, min_healthy=2.0)
    conn.reason = "goaway"
    actions = core.changed(conn, False, 0, 0.3)
    # A young loss is a failed connect: its reconnect waits for the backoff, none starts now.
    assert not [a for a in actions if isinstance(a, Connect)]
    assert not core.conns
    assert not core.opening
    assert core.retry_at > 0.31
    waiter = Waiter(deadline=100.0, timeout=99.7)
    assert not [a for a in core.wait(waiter, 0.31) if isinstance(a, Fail)]
    core.check()

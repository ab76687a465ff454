"""Opening connections: how many to open (``grow``), the connect itself, backoff and the circuit.

``grow`` is the one place that decides connects. It is synchronous: it counts a slot in
``pool._opening`` before spawning each connect task, so racing acquires can never over-open.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections import deque
from typing import TYPE_CHECKING, Any

from voicepool._engine.record import ConnRecord, ConnState
from voicepool._redact import describe_error
from voicepool.errors import ConnectError, PoolUnavailable, VoicepoolError

if TYPE_CHECKING:
    from voicepool.pool import Pool

log = logging.getLogger("voicepool.pool")


def grow(pool: Pool[Any]) -> None:
    """Decide how many connects to start now, and start them (synchronous, no awaits).

    Demand is the waiters not covered by connects in flight, plus the warm floor
    (``min_size``; SINGLE_USE: spares). While connects are failing, one at a time, after the
    backoff delay. Never more than ``max_size`` open + opening.
    """
    if not pool._started or pool._warming or pool._closing:
        return
    if pool._retry_at and pool._clock() < pool._retry_at:
        return  # backing off: the health task wakes at _retry_at (never poke here: it spins)
    size = len(pool._conns) + pool._opening
    room = pool.max_size - size
    if room <= 0:
        return
    waiting = len(pool._waiters)
    if pool._mux:
        per = pool.max_streams
        free = sum(max(0, r.cap - r.streams) for r in pool._mux_conns) + pool._opening * per
        short = waiting - free
        need = -(-short // per) if short > 0 else 0
        if free == 0 and pool._mux_conns:
            need = max(need, 1)  # saturated: one more before the next caller has to wait
        need = max(need, pool.min_size - size)
    elif pool._single_use:
        # Spares being pinged are out of the idle deque but still spares: counting them as
        # missing would open (and bill) an extra socket at every ping.
        spares = len(pool._idle) + sum(
            1 for r in pool._conns.values() if r.state is ConnState.PINGING
        )
        need = max(waiting - pool._opening, pool.min_size + waiting - spares - pool._opening)
    else:
        need = max(waiting - pool._opening, pool.min_size - size)
    if need <= 0:
        return
    if pool._consecutive_failures:
        limit = 1 - pool._opening  # probing: one connect at a time
    else:
        limit = pool.settings.connect_concurrency - pool._opening
    for _ in range(min(need, room, limit)):
        spawn_connect(pool)


def spawn_connect(pool: Pool[Any]) -> None:
    """Count a slot, then connect into it in a pool task."""
    pool._opening += 1
    started = [False]
    # The current context: a connect started for a waiting caller is part of its trace (it
    # shows why the call waited); one started by the health task has that task's empty one.
    task = asyncio.get_running_loop().create_task(open_one(pool, started, pool._generation))
    pool._work.add(task)

    def done(task: asyncio.Task[None]) -> None:
        pool._work.discard(task)
        if not started[0]:  # cancelled before it ran: _open_one never freed its slot
            pool._opening -= 1
            pool._check_drained()

    task.add_done_callback(done)


async def open_one(
    pool: Pool[Any], started: list[bool] | None = None, generation: int | None = None
) -> None:
    """Open one connection into a slot already counted in ``_opening`` (which it frees)."""
    if started is not None:
        started[0] = True
    token = [obs.connect_started(pool) for obs in pool._observers]
    if generation is None:
        generation = pool._generation
    t0 = pool._clock()
    try:
        async with asyncio.timeout(pool.settings.connect_timeout):
            conn = await pool.adapter.connect()
    except BaseException as exc:
        pool._opening -= 1
        if isinstance(exc, TimeoutError) and not isinstance(exc, VoicepoolError):
            err: BaseException = ConnectError(
                f"connect to {pool.adapter.describe()} timed out after"
                f" {pool.settings.connect_timeout:g}s"
            )
            err.__cause__ = exc
        else:
            err = exc
        duration = pool._clock() - t0
        for obs, tok in zip(pool._observers, token, strict=True):
            obs.on_connected(pool, tok, duration, err)
        if isinstance(exc, Exception):
            connect_failed(pool, err)
        pool._check_drained()
        if not isinstance(exc, Exception):
            raise
        return
    pool._opening -= 1
    duration = pool._clock() - t0
    for obs, tok in zip(pool._observers, token, strict=True):
        obs.on_connected(pool, tok, duration, None)
    if pool._closing:
        pool._spawn(pool._close_conn(conn), pool._closers)
        pool._check_drained()
        return
    pool._n_connects += 1
    rec = new_record(pool, conn)
    if generation != pool._generation:
        rec.expires = -math.inf  # started before expire_all(): old credentials; serve, then retire
    connect_succeeded(pool)
    log.debug(
        "pool %s: connection #%d open in %.1f ms",
        pool.name,
        rec.id,
        duration * 1e3,
        extra=pool._extra,
    )
    if pool._mux:
        pool._serve_streams(rec)
    else:
        pool._deliver(rec)
    pool._poke()  # the health task schedules this connection's ping, lifetime and idle time
    grow(pool)


def new_record(pool: Pool[Any], conn: Any) -> ConnRecord[Any]:
    now = pool._clock()
    pool._next_id += 1
    lifetime = pool.settings.max_lifetime
    # Jitter lifetimes and ping periods down by up to 10% so a pool opened at once does not
    # expire or ping at once.
    expires = now + lifetime * (1 - 0.1 * random.random()) if lifetime else math.inf
    period = pool._ping_interval * (1 - 0.1 * random.random())
    cap = min(pool.max_streams, pool.adapter.stream_capacity(conn)) if pool._mux else 1
    rec = ConnRecord(conn, pool._next_id, now, expires, period, cap)
    pool._conns[rec.id] = rec
    pool._by_conn[id(conn)] = rec
    if pool._mux:
        rec.state = ConnState.IN_USE
        pool._mux_conns.append(rec)
    return rec


def connect_failed(pool: Pool[Any], err: BaseException) -> None:
    if not isinstance(err, ConnectError):
        wrapped = ConnectError(
            f"connect to {pool.adapter.describe()} failed: {describe_error(err)}",
            fatal=pool.adapter.is_fatal(err),
        )
        wrapped.__cause__ = err
        err = wrapped
    pool._n_connect_failures += 1
    pool._consecutive_failures += 1
    pool._last_error = err
    fatal = pool.adapter.is_fatal(err) or (isinstance(err, ConnectError) and err.fatal)
    s = pool.settings
    cap = min(
        s.backoff_max,
        s.backoff_initial * s.backoff_multiplier ** (pool._consecutive_failures - 1),
    )
    pool._retry_at = pool._clock() + random.uniform(0, cap)  # full jitter
    log.debug(
        "pool %s: connect failed (%d in a row): %s",
        pool.name,
        pool._consecutive_failures,
        err,
        extra=pool._extra,
    )
    if (fatal or pool._consecutive_failures >= s.failure_threshold) and not pool._circuit_open:
        open_circuit(pool, err, fatal)
    pool._poke()


def connect_succeeded(pool: Pool[Any]) -> None:
    pool._consecutive_failures = 0
    pool._retry_at = 0.0
    if pool._circuit_open:
        pool._circuit_open = False
        log.warning(
            "pool %s: circuit closed, provider reachable again", pool.name, extra=pool._extra
        )
    pool._report_state()


def open_circuit(pool: Pool[Any], err: BaseException, fatal: bool) -> None:
    pool._circuit_open = True
    why = "fatal error" if fatal else f"{pool._consecutive_failures} connect failures in a row"
    log.warning("pool %s: circuit open (%s): %s", pool.name, why, err, extra=pool._extra)
    pool._report_state()
    waiters, pool._waiters = pool._waiters, deque()
    for fut, _deadline in waiters:
        if not fut.done():
            pool._n_unavailable += 1
            e = PoolUnavailable(f"pool {pool.name!r} is unavailable ({why}): {err}", pool=pool.name)
            e.__cause__ = err
            fut.set_exception(e)

"""Out-of-band health of a pool: pings, lifetime and idle retirement, refill, the wait alarm.

One task per pool runs :func:`run_health`. Each pass calls the synchronous
:func:`maintain`, which decides what is due, starts pings as tasks, and returns when
it next needs to run; adapters and the engine wake it early through ``_poke()``. Nothing here runs
on the acquire path.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from voicepool._engine.record import ConnRecord, ConnState

if TYPE_CHECKING:
    from voicepool.pool import Pool

log = logging.getLogger("voicepool.pool")

_MAX_SLEEP = 3600.0
_FLUSH_EVERY = 1.0  # seconds between hand-offs of buffered hold times to observers


async def run_health(pool: Pool[Any]) -> None:
    """Loop until cancelled by aclose(): maintain, then sleep until due or poked."""
    wake = pool._wake
    assert wake is not None
    while True:
        wake.clear()
        due = maintain(pool, pool._clock())
        delay = max(0.0, min(due - pool._clock(), _MAX_SLEEP))
        if delay > 0:
            try:
                async with asyncio.timeout(delay):
                    await wake.wait()
            except TimeoutError:
                pass
        else:
            await asyncio.sleep(0)


def maintain(pool: Pool[Any], now: float) -> float:
    """One health pass at time ``now``; returns the time of the next due item.

    Retires expired, remotely closed and (above ``min_size``) long-idle connections, starts
    pings of idle connections whose turn has come, refills, rotates the alarm window.
    """
    due = now + _MAX_SLEEP
    if pool._closing or not pool._started:
        return due
    if now >= pool._window.end:
        rotate_window(pool, now)
    due = min(due, pool._window.end)
    if pool._observers and (
        pool._use_times or pool._n_acquired != pool._flushed[0] or pool._n_timeouts
    ):
        flush(pool, now)
        due = min(due, now + _FLUSH_EVERY)
    idle_timeout = pool.settings.idle_timeout
    surplus = len(pool._conns) - pool.min_size
    candidates = pool._mux_conns if pool._mux else pool._idle
    for rec in list(candidates):  # oldest first: the idle deque is LIFO at the right
        if rec.state is ConnState.CLOSED:
            continue
        if pool._mux and rec.streams:
            # Busy multiplexed connections are still pinged (an HTTP/2 PING or a WebSocket ping
            # runs beside the streams): a black-holed connection under load is found by its ping.
            if rec.expires <= now:
                rec.cap = 0  # expired while busy: drain, close when the last stream ends
            elif rec.next_ping <= now and not rec.pinging:
                start_ping(pool, rec)
            else:
                due = min(due, rec.next_ping, rec.expires)
            continue
        if not pool._is_open(rec.conn):
            pool._retire(rec, "remote_closed")
            surplus -= 1
        elif rec.expires <= now or (pool._mux and rec.cap == 0):
            pool._retire(rec, "expired")
            surplus -= 1
        elif idle_timeout is not None and surplus > 0 and now - rec.last_used >= idle_timeout:
            pool._retire(rec, "idle")
            surplus -= 1
        elif (ping_at := _ping_at(pool, rec)) <= now:
            # (a release does not reschedule the ping: it only stamps last_used)
            if not rec.pinging:
                start_ping(pool, rec)
        else:
            nxt = min(ping_at, rec.expires)
            if idle_timeout is not None and surplus > 0:
                nxt = min(nxt, rec.last_used + idle_timeout)
            due = min(due, nxt)
    # Connections in use are not scheduled here (the release path stays free of timers), so
    # wake at least every quarter ping interval: a ping is then at most 25% late, and a surplus
    # connection is retired at most idle_timeout/4 after its idle time is up.
    due = min(due, now + pool._ping_interval / 4)
    if idle_timeout is not None and surplus > 0:
        due = min(due, now + idle_timeout / 4)
    pool._grow()
    if pool._retry_at > now:
        due = min(due, pool._retry_at)
    return due


def _ping_at(pool: Pool[Any], rec: ConnRecord[Any]) -> float:
    """When an idle connection is pinged: a ping period after the last ping, and after its last
    use when a lease proves the connection alive (``Adapter.use_proves_liveness``). A
    connection leased back to back is then never pinged, which only holds when each lease
    carried traffic over it: a SIP registration lent with zero hold time did no I/O.
    """
    if pool._use_proves_liveness:
        return max(rec.next_ping, rec.last_used + rec.ping_period)
    return rec.next_ping


def start_ping(pool: Pool[Any], rec: ConnRecord[Any]) -> None:
    rec.pinging = True
    if not pool._mux:
        # Out of the idle deque: no acquire can take a connection while it is pinged.
        pool._idle.remove(rec)
        rec.state = ConnState.PINGING
    pool._spawn(ping_one(pool, rec), pool._work)


async def ping_one(pool: Pool[Any], rec: ConnRecord[Any]) -> None:
    t0 = pool._clock()
    error: BaseException | None = None
    try:
        async with asyncio.timeout(pool.settings.ping_timeout):
            await pool.adapter.ping(rec.conn)
    except asyncio.CancelledError:
        rec.pinging = False
        if rec.state is ConnState.PINGING:
            pool._retire(rec, "shutdown")
        raise
    except Exception as exc:
        error = exc
    rec.pinging = False
    duration = pool._clock() - t0
    for obs in pool._observers:
        obs.on_ping(pool, duration, error)
    if rec.state is ConnState.CLOSED:
        return
    if error is not None or not pool._is_open(rec.conn):
        log.debug("pool %s: ping of #%d failed: %r", pool.name, rec.id, error, extra=pool._extra)
        pool._retire(rec, "ping_failed")
        return
    rec.next_ping = pool._clock() + rec.ping_period
    if rec.state is ConnState.PINGING:
        pool._deliver(rec)
    pool._poke()


def rotate_window(pool: Pool[Any], now: float) -> None:
    p95, count = pool._window.rotate(now, pool._n_acquired)
    limit = pool.settings.alarm_wait_p95_ms / 1000.0
    if count and p95 > limit:
        pool._alarm_firing = True
        log.warning(
            "pool %s: acquire-wait p95 %.1f ms is above %.1f ms over the last %gs (%d acquires,"
            " size %d/%d, waiters %d)",
            pool.name,
            p95 * 1e3,
            limit * 1e3,
            pool._window.length,
            count,
            len(pool._conns),
            pool.max_size,
            len(pool._waiters),
            extra=pool._extra,
        )
        for obs in pool._observers:
            obs.on_alarm(pool, p95, True)
    elif pool._alarm_firing:
        pool._alarm_firing = False
        log.warning(
            "pool %s: acquire-wait p95 back to %.1f ms (threshold %.1f ms)",
            pool.name,
            p95 * 1e3,
            limit * 1e3,
            extra=pool._extra,
        )
        for obs in pool._observers:
            obs.on_alarm(pool, p95, False)


def flush(pool: Pool[Any], now: float) -> None:
    """Hand buffered hold times and the no-wait acquire count to observers (background)."""
    uses, pool._use_times = pool._use_times, []
    acquired, waited = pool._n_acquired, pool._n_waited
    zero = (acquired - pool._flushed[0]) - (waited - pool._flushed[1])
    pool._flushed = (acquired, waited)
    for obs in pool._observers:
        obs.on_flush(pool, uses, max(0, zero))


__all__ = ["maintain", "run_health"]

"""Waiting for a connection: FIFO waiters, their deadlines on one pool timer, giving up.

A waiter is a future in ``pool._waiters`` with its deadline. One TimerHandle per pool, armed for
the earliest deadline, fails expired waiters with :class:`WaitExpired` (a TimerHandle per waiter
would churn the loop's heap under contention). A waiter that gives up after being handed a
connection passes it on (:func:`abandon`), so nothing is ever assigned to nobody.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from typing import TYPE_CHECKING, Any

from voicepool._engine.record import ConnRecord

if TYPE_CHECKING:
    from voicepool.pool import Pool

Waiter = asyncio.Future[tuple[ConnRecord[Any], int | None]]


class WaitExpired(Exception):
    """Set on a waiter's future by the pool timer when its acquire deadline passes."""


def exhausted_message(pool: Pool[Any], timeout: float, extra_waiter: int = 0) -> str:
    s = pool.stats()
    cause = f"; last connect error: {pool._last_error}" if pool._last_error else ""
    return (
        f"pool {pool.name!r} exhausted: no connection within {timeout:g}s"
        f" (size={s.size}/{s.max_size}, in_use={s.in_use}, idle={s.idle},"
        f" opening={s.opening}, waiters={s.waiters + extra_waiter}){cause}"
    )


def arm_timer(pool: Pool[Any], loop: asyncio.AbstractEventLoop, when: float) -> None:
    if pool._timer is not None:
        pool._timer.cancel()
    pool._timer_at = when
    pool._timer = loop.call_at(when, expire_waiters, pool)


def expire_waiters(pool: Pool[Any]) -> None:
    """Pool timer: fail waiters whose deadline passed, re-arm for the next deadline."""
    pool._timer = None
    pool._timer_at = math.inf
    loop = asyncio.get_running_loop()
    now = loop.time()
    keep: deque[tuple[Waiter, float]] = deque()
    nxt = math.inf
    for fut, deadline in pool._waiters:
        if fut.done():
            continue
        if deadline <= now:
            fut.set_exception(WaitExpired())
        else:
            keep.append((fut, deadline))
            nxt = min(nxt, deadline)
    pool._waiters = keep
    if nxt < math.inf:
        arm_timer(pool, loop, nxt)


def abandon(pool: Pool[Any], fut: Waiter) -> None:
    """A waiter gave up. If it was already handed a connection, pass that on."""
    if not fut.done():
        fut.cancel()
    if fut.cancelled():  # (a task cancelled while awaiting fut cancels fut itself)
        for entry in pool._waiters:
            if entry[0] is fut:
                pool._waiters.remove(entry)
                break
        return
    if fut.exception() is not None:
        return
    rec, _sid = fut.result()
    if pool._mux:
        rec.streams -= 1
        pool._after_stream_end(rec)
    else:
        pool._deliver(rec)

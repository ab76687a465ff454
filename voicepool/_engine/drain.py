"""Closing a pool: stop lending, drain leases up to a deadline (or a hard close), close all."""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from typing import TYPE_CHECKING, Any

from voicepool._engine.health import flush
from voicepool._engine.record import ConnState
from voicepool._engine.state import PoolState
from voicepool.errors import PoolClosed

if TYPE_CHECKING:
    from voicepool.pool import Pool

log = logging.getLogger("voicepool.pool")

_CLOSE_TIMEOUT = 5.0  # an adapter's polite close gets this long before we stop waiting for it


async def close(pool: Pool[Any], timeout: float) -> None:
    pool._closing = True
    pool._set_lifecycle(PoolState.CLOSING)
    waiters, pool._waiters = pool._waiters, deque()
    if pool._timer is not None:
        pool._timer.cancel()
        pool._timer, pool._timer_at = None, math.inf
    for fut, _deadline in waiters:
        if not fut.done():
            fut.set_exception(PoolClosed(f"pool {pool.name!r} is closing", pool=pool.name))
    tasks = list(pool._work)
    if pool._health_task is not None:
        tasks.append(pool._health_task)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for rec in list(pool._conns.values()):
        if rec.state is not ConnState.IN_USE or (pool._mux and not rec.streams):
            pool._retire(rec, "shutdown")
    if pool._busy():
        if pool._drained is None:
            pool._drained = asyncio.Event()
        assert pool._hard_close is not None
        pool._check_drained()
        drained = asyncio.ensure_future(pool._drained.wait())
        hard = asyncio.ensure_future(pool._hard_close.wait())
        try:
            await asyncio.wait([drained, hard], timeout=timeout, return_when="FIRST_COMPLETED")
        finally:
            drained.cancel()
            hard.cancel()
        held = sum(
            1
            for r in pool._conns.values()
            if r.state is ConnState.IN_USE and (not pool._mux or r.streams)
        )
        if held:
            log.warning(
                "pool %s: %d leases still held at the drain deadline; closing them",
                pool.name,
                held,
                extra=pool._extra,
            )
    for rec in list(pool._conns.values()):
        pool._retire(rec, "shutdown")
    if pool._closers:
        await asyncio.wait(list(pool._closers), timeout=_CLOSE_TIMEOUT + 1)
    pool.adapter.unwatch(pool._on_conn_changed)
    if pool._observers:
        flush(pool, pool._clock())
    pool._set_lifecycle(PoolState.CLOSED)
    for obs in pool._observers:
        obs.on_pool_closed(pool)

"""Releases that are not the inlined fast path: reset, discard, error, single use, end of stream.

Cancellation-safe: the bookkeeping runs in ``finally``; a cancelled reset discards the connection
(its state is unknown), a cancelled stream release keeps the shared connection while it is open.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from voicepool._engine.record import ConnRecord, ConnState
from voicepool.errors import VoicepoolError

if TYPE_CHECKING:
    from voicepool.lease import Lease
    from voicepool.pool import Pool

log = logging.getLogger("voicepool.pool")


async def release_slow(pool: Pool[Any], lease: Lease[Any], exc: BaseException | None) -> None:
    """Release with a reset, a discard, an error, single use or a stream to end.

    Cancellation-safe: bookkeeping happens in ``finally``; a cancelled reset discards the
    connection, since its state is then unknown.
    """
    rec = lease._rec
    assert rec is not None
    reason = lease._discard
    if reason is None and exc is not None:
        reason = "error"
    if pool._mux:
        await release_stream(pool, lease, rec, exc, reason)
        return
    now = pool._clock()
    if pool._observers:
        pool._record_use(now - lease._t0)
    rec.last_used = now
    if reason is not None:
        pool._retire(rec, "discarded" if lease._discard is not None else "error")
    elif pool._single_use:
        pool._retire(rec, "used")
    elif rec.expires <= now:
        pool._retire(rec, "expired")
    elif not pool._is_open(rec.conn):
        pool._retire(rec, "remote_closed")
    else:
        ok = False
        try:
            # connect_timeout, not ping_timeout: a reset may wait for a provider round trip
            # (Deepgram's Finalize) and the adapter bounds it more tightly if it wants.
            async with asyncio.timeout(pool.settings.connect_timeout):
                await pool.adapter.reset(rec.conn)
            ok = pool._is_open(rec.conn)
        except Exception as err:
            log.debug("pool %s: reset failed: %r", pool.name, err, extra=pool._extra)
        finally:
            if ok:
                rec.next_ping = pool._clock() + rec.ping_period
                pool._deliver(rec)
            else:
                pool._retire(rec, "error")


async def release_stream(
    pool: Pool[Any],
    lease: Lease[Any],
    rec: ConnRecord[Any],
    exc: BaseException | None,
    reason: str | None,
) -> None:
    keep = False
    err: BaseException | None = exc
    if err is None and reason is not None:
        err = VoicepoolError(f"lease discarded: {reason}")
    try:
        if rec.state is not ConnState.CLOSED:
            keep = await pool.adapter.release_stream(rec.conn, lease.stream_id or 0, err)
    except asyncio.CancelledError:
        # Cancelled mid-release: the stream's fate is the adapter's (it frees its local state
        # before its first await); the shared connection is judged by is_open alone.
        keep = pool._is_open(rec.conn)
        raise
    except Exception as e:
        log.debug("pool %s: release_stream failed: %r", pool.name, e, extra=pool._extra)
    finally:
        now = pool._clock()
        if pool._observers:
            pool._record_use(now - lease._t0)
        rec.streams -= 1
        rec.last_used = now
        if not keep:
            if lease._discard is not None:
                why = "discarded"
            elif exc is not None:
                why = "error"
            else:  # a clean release the adapter refused: the peer closed or drained it
                why = "remote_closed"
            pool._retire(rec, why)
        after_stream_end(pool, rec)


def after_stream_end(pool: Pool[Any], rec: ConnRecord[Any]) -> None:
    """A stream on ``rec`` ended: close a drained connection, or serve waiters with it."""
    if rec.state is ConnState.CLOSED:
        pool._check_drained()
        return
    if rec.streams == 0 and (pool._closing or rec.cap == 0 or rec.expires <= pool._clock()):
        pool._retire(rec, "shutdown" if pool._closing else "expired")
        return
    pool._serve_streams(rec)

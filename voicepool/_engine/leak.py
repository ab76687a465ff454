"""Leak detection: one warning when a lease is held longer than ``leak_threshold``.

The acquiring stack is captured only when the threshold is set (it costs microseconds).
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from voicepool.lease import Lease
    from voicepool.pool import Pool

log = logging.getLogger("voicepool.pool")


def watch_leak(pool: Pool[Any], lease: Lease[Any]) -> None:
    stack = "".join(traceback.format_list(traceback.extract_stack(limit=12)[:-2]))
    assert pool._leak_threshold is not None
    lease._leak = asyncio.get_running_loop().call_later(
        pool._leak_threshold, report_leak, pool, lease, stack
    )


def report_leak(pool: Pool[Any], lease: Lease[Any], stack: str) -> None:
    log.warning(
        "pool %s: a lease has been held for more than %gs (possible leak); acquired at:\n%s",
        pool.name,
        pool._leak_threshold,
        stack,
        extra=pool._extra,
    )

"""The adapter awaits, under their timeouts, with errors translated: the driver's only I/O.

Nothing here decides anything; each function does one adapter call and says how it ended.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar

from voicepool.adapter import Adapter
from voicepool.errors import ConnectError, VoicepoolError

log = logging.getLogger("voicepool.pool")

C = TypeVar("C")

CLOSE_TIMEOUT = 5.0  # an adapter's polite close gets this long before we stop waiting for it


async def connect(adapter: Adapter[C], timeout: float) -> C:
    """``adapter.connect()`` under ``timeout``. Raises ConnectError (chaining the adapter's error;
    ``fatal`` as the adapter classifies it), or CancelledError."""
    try:
        async with asyncio.timeout(timeout):
            return await adapter.connect()
    except asyncio.CancelledError:
        raise
    except ConnectError:
        raise
    except TimeoutError as exc:
        if isinstance(exc, VoicepoolError):
            raise
        raise ConnectError(
            f"connect to {adapter.describe()} timed out after {timeout:g}s",
            fatal=adapter.is_fatal(exc),
        ) from exc
    except Exception as exc:
        raise ConnectError(
            f"connect to {adapter.describe()} failed: {type(exc).__name__}: {exc}",
            fatal=adapter.is_fatal(exc),
        ) from exc


def is_fatal(adapter: Adapter[Any], err: BaseException) -> bool:
    return adapter.is_fatal(err) or (isinstance(err, ConnectError) and err.fatal)


async def ping(adapter: Adapter[C], conn: C, timeout: float) -> BaseException | None:
    """``adapter.ping(conn)`` under ``timeout``: None when it answered, else the error.

    CancelledError propagates (the pool is closing)."""
    try:
        async with asyncio.timeout(timeout):
            await adapter.ping(conn)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        return exc
    return None


async def close(adapter: Adapter[C], conn: C, name: str) -> None:
    """``adapter.close(conn)`` under CLOSE_TIMEOUT; failures are logged, never raised."""
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await adapter.close(conn)
    except Exception as err:
        log.debug("pool %s: close failed: %r", name, err, extra={"voicepool.pool.name": name})


class Resume:
    """Await the rest of a coroutine that was already driven once with ``send(None)``.

    ``first`` is what it yielded (the future it waits on): handed up to the task, which resumes
    us when it is done. This lets a reset that completes without suspending cost no task and no
    timer: only one that really waits pays for ``asyncio.timeout``.
    """

    __slots__ = ("coro", "first")

    def __init__(self, coro: Coroutine[Any, Any, Any], first: Any) -> None:
        self.coro = coro
        self.first = first

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, yielded = self.coro, self.first
        while True:
            try:
                sent = yield yielded
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:
                try:
                    yielded = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    yielded = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


async def finish_reset(coro: Coroutine[Any, Any, None], first: Any, timeout: float) -> None:
    """The rest of a reset that suspended, under ``timeout`` (connect_timeout: a reset may wait
    for a provider round trip, Deepgram's Finalize). Raises what the reset raised, TimeoutError,
    or CancelledError."""
    async with asyncio.timeout(timeout):
        await Resume(coro, first)


async def release_stream(
    adapter: Adapter[C], conn: C, stream_id: int, error: BaseException | None, name: str
) -> bool:
    """``adapter.release_stream``: whether the shared connection is kept. A failing adapter
    drops it; CancelledError propagates (the caller judges the connection by ``is_open``)."""
    try:
        return await adapter.release_stream(conn, stream_id, error)
    except asyncio.CancelledError:
        raise
    except Exception as e:
        log.debug(
            "pool %s: release_stream failed: %r", name, e, extra={"voicepool.pool.name": name}
        )
        return False

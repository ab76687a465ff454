"""`GracefulShutdown`: the two-stage SIGTERM handling a voice worker needs.

An orchestrator (Kubernetes, systemd, a supervisor) sends SIGTERM, waits a grace period, then kills.
A voice worker should use that period to finish the calls it has and take no new ones; if asked
again, it should stop at once instead of waiting for calls that may last minutes::

    async def main() -> int:
        manager = PoolManager.from_settings()
        async with GracefulShutdown() as shutdown, manager:
            await serve_calls(manager, until=shutdown)   # stop accepting when shutdown.draining
        return shutdown.exit_code                        # 0, or 128 + signal after a hard close

    sys.exit(asyncio.run(main()))

* First SIGTERM or SIGINT: :attr:`~GracefulShutdown.draining` becomes true and
  :meth:`~GracefulShutdown.wait` returns. The worker stops accepting calls, lets those in flight
  finish, and leaves ``async with manager``, which drains the pools within ``drain_timeout``.
* Second signal (or ``hard_after`` seconds after the first): the task that entered the block is
  cancelled. Call tasks inside it (a TaskGroup) are cancelled with it, their leases released; the
  manager sees the cancellation and closes every pool at once. The helper absorbs the cancellation
  it caused, so the code after the block runs; :attr:`~GracefulShutdown.exit_code` is then
  128 + the signal number (143 for SIGTERM, 130 for SIGINT), as if killed by it.
* A third signal gets the default action (the handlers are removed at the hard stage): a worker
  stuck in a close can always be killed with one more Ctrl-C.

Unix signals with ``loop.add_signal_handler``: the block must run in the main thread's event loop
(elsewhere, or where the loop cannot add handlers, ``signal.signal`` is used and callbacks are
handed to the loop thread-safely).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterable
from types import FrameType, TracebackType
from typing import Any

from voicepool._redact import get_logger

__all__ = ["GracefulShutdown"]

log = get_logger("voicepool.shutdown")

_DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class GracefulShutdown:
    """Async context manager: the first signal asks to drain, the second closes hard.

    ``signals`` defaults to SIGTERM and SIGINT. ``hard_after`` escalates by itself that many
    seconds after the first signal (keep it below the orchestrator's grace period).
    :meth:`request` and :meth:`close_hard` trigger the stages from code (an admin endpoint, a
    test). Entering never raises for a missing loop feature; it raises RuntimeError outside a
    running task. Not reentrant: one ``async with`` per instance.
    """

    def __init__(
        self,
        signals: Iterable[signal.Signals] = _DEFAULT_SIGNALS,
        *,
        hard_after: float | None = None,
    ) -> None:
        self._signals = tuple(signals)
        self._hard_after = hard_after
        self._count = 0
        self._first: signal.Signals | None = None
        self._hard_signal: signal.Signals | None = None
        self._hard = False
        self._we_cancelled = False
        self._event: asyncio.Event | None = None
        self._task: asyncio.Task[Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_handlers: list[signal.Signals] = []
        self._previous: dict[signal.Signals, Any] = {}
        self._timer: asyncio.TimerHandle | None = None

    # -- state ----------------------------------------------------------------------------------

    @property
    def draining(self) -> bool:
        """True once the first signal (or :meth:`request`) arrived."""
        return self._count > 0

    @property
    def hard(self) -> bool:
        """True once the hard stage began (second signal, ``hard_after``, :meth:`close_hard`)."""
        return self._hard

    @property
    def received_signal(self) -> signal.Signals | None:
        """The first signal received (None if none, or if the drain was requested in code)."""
        return self._first

    @property
    def exit_code(self) -> int:
        """0 unless closed hard; then 128 + the signal number (SIGTERM when requested in code)."""
        if not self._hard:
            return 0
        return 128 + int(self._hard_signal or signal.SIGTERM)

    async def wait(self) -> None:
        """Return once draining was requested. Cancellation-safe; raises RuntimeError if the
        context manager was not entered."""
        if self._event is None:
            raise RuntimeError("use `async with GracefulShutdown() as shutdown:` first")
        await self._event.wait()

    # -- triggers -------------------------------------------------------------------------------

    def request(self) -> None:
        """Stage one from code: start draining (idempotent). Event loop thread only."""
        self._advance(None, escalate=False)

    def close_hard(self) -> None:
        """Stage two from code: cancel the protected task now. Event loop thread only."""
        if self._count == 0:
            self._advance(None, escalate=False)
        self._go_hard(None)

    def _on_signal(self, signum: signal.Signals) -> None:
        self._advance(signum, escalate=True)

    def _advance(self, signum: signal.Signals | None, *, escalate: bool) -> None:
        self._count += 1
        if self._count == 1:
            self._first = signum
            if self._event is not None:
                self._event.set()
            name = signum.name if signum is not None else "request"
            log.warning("voicepool: %s: draining (signal again to close hard)", name)
            if self._hard_after is not None and self._loop is not None:
                self._timer = self._loop.call_later(self._hard_after, self._go_hard, None)
        elif escalate:
            self._go_hard(signum)
        else:
            self._count -= 1  # a repeated request() is not a second signal

    def _go_hard(self, signum: signal.Signals | None) -> None:
        if self._hard:
            return
        self._hard = True
        self._hard_signal = signum or self._first
        if self._timer is not None:
            self._timer.cancel()
        log.warning("voicepool: closing hard (%s)", signum.name if signum else "requested")
        # From now on a signal gets the default action: the way out of a stuck close.
        self._remove_handlers()
        if self._task is not None and not self._task.done():
            self._we_cancelled = True
            self._task.cancel("voicepool: hard shutdown")

    # -- context manager ------------------------------------------------------------------------

    async def __aenter__(self) -> GracefulShutdown:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("GracefulShutdown must be entered from an asyncio task")
        if self._task is not None:
            raise RuntimeError("a GracefulShutdown can be entered only once")
        self._task = task
        self._loop = loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        for sig in self._signals:
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
                self._loop_handlers.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                # No loop support (Windows) or not the main thread's loop: a plain handler that
                # hands the signal to the loop; outside the main thread even that is refused.
                try:
                    self._previous[sig] = signal.signal(sig, self._threadsafe_handler)
                except ValueError:
                    log.warning("voicepool: cannot handle %s outside the main thread", sig.name)
        return self

    def _threadsafe_handler(self, signum: int, frame: FrameType | None) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._on_signal, signal.Signals(signum))

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        self._remove_handlers()
        if self._timer is not None:
            self._timer.cancel()
        if not self._we_cancelled or self._task is None:
            return False
        self._we_cancelled = False
        remaining = self._task.uncancel()
        # The cancellation is ours and nobody else asked for one: end the block normally so the
        # worker can report and exit with exit_code. (If the block swallowed it, uncancel still
        # balances the count.)
        return (
            exc_type is not None and issubclass(exc_type, asyncio.CancelledError) and remaining == 0
        )

    def _remove_handlers(self) -> None:
        if self._loop is not None:
            for sig in self._loop_handlers:
                self._loop.remove_signal_handler(sig)
        self._loop_handlers.clear()
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

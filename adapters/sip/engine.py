"""The process-wide pjsua2 engine: one owner thread runs every pjsua2 call.

Why a thread of its own (measured on ``pjsua2-pybind11`` 0.1a3, see sip-pjsua2.md): the binding
never releases the GIL, aborts the process when called from a thread other than the one that ran
``libCreate`` (or when an ``Account`` is dropped on another thread), deadlocks with PJSIP's own
worker threads, and aborts (it does not raise) on a 9th account. So:

* One :class:`SipEngine` per process (:meth:`SipEngine.get`). Its thread runs ``libCreate`` /
  ``libInit`` with ``threadCnt = 0``, then loops: run queued commands, then poll PJSIP through
  ``pjsua_handle_events`` via ctypes, which releases the GIL while it polls. Submitting a command
  wakes the poll at once with a CRLF keep-alive datagram to a loopback transport of the engine.
* Account callbacks therefore run on that thread and reach asyncio through
  ``loop.call_soon_threadsafe``; asyncio code only awaits commands submitted to the thread.
* Every pjsua2 object is created and dropped on that thread (:mod:`._owner`); PJSIP limits are
  checked in Python before PJSIP is called; callbacks never let an exception into C++.
* Users keep the engine up: each account, each pool attached to a SIP adapter, each
  :meth:`~SipEngine.hold`. The thread starts with the first account (lazily, so building a pool
  costs nothing) and stops when the last user goes: un-REGISTER whatever is left, ``shutdown``,
  ``libDestroy``. It can start again later in the same process; at interpreter exit it is
  stopped the same way (atexit), so a worker that forgets to close leaves no binding behind.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures as cf
import contextlib
import itertools
import logging
import queue
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from typing import Any, TypeVar

from voicepool.errors import ConnectError

from ._binding import PJSUA_MAX_ACC  # noqa: TID251
from ._owner import Owner, OwnerContext  # noqa: TID251
from ._types import AccountSpec, EngineConfig, EngineStats, RegEvent  # noqa: TID251

__all__ = ["SipEngine", "configure_engine"]

log = logging.getLogger("voicepool.sip")
T = TypeVar("T")

_WAKE = b"\r\n\r\n"  # a SIP keep-alive: PJSIP's transport drops it, but the poll returns
_Command = tuple[Callable[[Owner], Any], cf.Future[Any]]


@dataclass
class _Run:
    """One run of the owner thread (the engine can start again after a run ends)."""

    thread: threading.Thread
    ready: cf.Future[None] = field(default_factory=cf.Future)
    done: cf.Future[None] = field(default_factory=cf.Future)
    stop: bool = False
    wake_addr: tuple[str, int] | None = None


_engine: SipEngine | None = None
_engine_lock = threading.Lock()
_atexit_registered = False


def configure_engine(**changes: Any) -> EngineConfig:
    """Change :class:`EngineConfig` fields; they apply at the engine's next start.

    Raises ValueError for an unknown field or a bad value. Returns the new configuration.
    """
    engine = SipEngine.get()
    unknown = set(changes) - {f.name for f in fields(EngineConfig)}
    if unknown:
        raise ValueError(f"unknown SIP engine setting(s): {', '.join(sorted(unknown))}")
    engine.config = replace(engine.config, **changes)
    return engine.config


class SipEngine:
    """The one pjsua2 engine of this process; see the module docstring.

    Thread-safe and never raising: :meth:`retain`, :meth:`release`, :meth:`hold`, :meth:`remove`,
    :meth:`stats`. Coroutines (:meth:`add_account`, :meth:`refresh`, :meth:`run`,
    :meth:`ensure_started`, :meth:`wait_stopped`) may run on any event loop.
    """

    def __init__(self) -> None:
        self.config = EngineConfig()
        self._lock = threading.Lock()
        self._state = "stopped"
        self._run: _Run | None = None
        self._users = 0
        self._slots: set[int] = set()  # account keys holding one of the PJSUA_MAX_ACC slots
        self._closing: set[int] = set()
        self._slot_waiters: list[cf.Future[None]] = []
        self._keys = itertools.count(1)
        self._cmds: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._wake_sock: socket.socket | None = None
        self._starts = 0

    @classmethod
    def get(cls) -> SipEngine:
        """The process-wide engine (created on first call; its thread starts on first use)."""
        global _engine
        with _engine_lock:
            if _engine is None:
                _engine = cls()
            return _engine

    # -- users and lifecycle -----------------------------------------------------------------------

    def retain(self) -> None:
        """Count one user: the engine does not stop while it has users."""
        with self._lock:
            self._users += 1

    def release(self) -> None:
        """Drop one user; when the last goes, the engine stops in the background."""
        with self._lock:
            self._users = max(0, self._users - 1)
            if self._users == 0 and self._state == "running":
                self._request_stop_locked()

    @contextlib.contextmanager
    def hold(self) -> Iterator[SipEngine]:
        """``with engine.hold():`` keeps the engine up across pools (benchmarks, test sessions)."""
        self.retain()
        try:
            yield self
        finally:
            self.release()

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(
                self._state, self._users, len(self._slots), len(self._closing), self._starts
            )

    async def ensure_started(self) -> None:
        """Start the owner thread if needed and wait until PJSIP is ready.

        Cancellation-safe: the start goes on for the next caller. Raises ConnectError when PJSIP
        cannot start (``fatal`` when pjsua2 is not installed).
        """
        while True:
            with self._lock:
                run = self._run
                if run is None:
                    run = self._start_locked()
                waiting_for = run.done if self._state == "stopping" else run.ready
            await asyncio.shield(_bridge(waiting_for))
            if waiting_for is run.ready:
                return

    async def wait_stopped(self, timeout: float = 10.0) -> bool:
        """Wait until no owner thread runs. Returns False if it still runs after ``timeout``.

        ``run.done`` is set by the owner thread as its last step, but the thread has not exited
        then: join it too (off the loop), so a True here means the thread is gone.
        """
        with self._lock:
            run = self._run
        if run is None:
            return True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(_bridge(run.done))
        except TimeoutError:
            return False
        if run.thread.is_alive():
            await asyncio.to_thread(run.thread.join, max(0.0, deadline - loop.time()))
        return not run.thread.is_alive()

    def _start_locked(self) -> _Run:
        global _atexit_registered
        run = _Run(threading.Thread(target=self._main, name="voicepool-pjsua", daemon=True))
        self._run = run
        self._state = "starting"
        self._starts += 1
        if not _atexit_registered:
            atexit.register(_stop_at_exit)
            _atexit_registered = True
        run.thread.start()
        return run

    def _request_stop_locked(self) -> None:
        if self._run is not None:
            self._run.stop = True
            self._state = "stopping"
            self._wake_locked()

    def _wake_locked(self) -> None:
        run = self._run
        if run is not None and run.wake_addr is not None and self._wake_sock is not None:
            with contextlib.suppress(OSError):
                self._wake_sock.sendto(_WAKE, run.wake_addr)

    # -- commands ----------------------------------------------------------------------------------

    def _submit(self, fn: Callable[[Owner], T]) -> cf.Future[T]:
        fut: cf.Future[T] = cf.Future()
        with self._lock:
            if self._state not in ("starting", "running"):
                fut.set_exception(ConnectError("the SIP engine is not running"))
                return fut
            self._cmds.put((fn, fut))
            self._wake_locked()
        return fut

    async def _call(self, fn: Callable[[Owner], T]) -> T:
        """Run ``fn(owner)`` on the owner thread; cancelled before it ran, it never runs."""
        return await _bridge(self._submit(fn), cancel=True)

    async def run(self, key: int, fn: Callable[[OwnerContext], T]) -> T:
        """Run ``fn(ctx)`` on the owner thread for account ``key``; return its result.

        Raises ConnectError if the account is closed; exceptions of ``fn`` propagate (pjsua2
        errors are RuntimeError). ``fn`` blocks every SIP account while it runs: keep it short.
        """
        return await self._call(lambda owner: owner.run_for(key, fn))

    # -- accounts ----------------------------------------------------------------------------------

    async def add_account(self, spec: AccountSpec, sink: Callable[[RegEvent], None]) -> int:
        """Create an account that REGISTERs at once and return its key; ``sink(event)`` then runs
        on the caller's event loop for every ``onRegState`` of the account.

        Refuses a 9th account with ConnectError before PJSIP sees it (it waits for a slot while
        other accounts are still closing). Cancellation-safe: a cancelled add leaves no account
        (one already created is un-REGISTERed and removed in the background).
        """
        loop = asyncio.get_running_loop()
        key = next(self._keys)
        await self._reserve(key)
        try:
            await self.ensure_started()
            await self._call(lambda owner: owner.create(key, spec, loop, sink))
        except BaseException:
            self.remove(key)
            raise
        return key

    async def _reserve(self, key: int) -> None:
        while True:
            with self._lock:
                if len(self._slots) < PJSUA_MAX_ACC:
                    self._slots.add(key)
                    self._users += 1
                    return
                if not self._closing:
                    raise ConnectError(
                        f"pjsua2 allows at most {PJSUA_MAX_ACC} SIP accounts per process and"
                        f" {len(self._slots)} are open: lower the SIP pools' max_size (together"
                        " they must stay within the limit) or run another worker process"
                    )
                waiter: cf.Future[None] = cf.Future()
                self._slot_waiters.append(waiter)
            await _bridge(waiter, cancel=True)

    def _free_slot(self, key: int) -> None:
        """Give the slot of ``key`` back (idempotent); wake those waiting for a slot."""
        with self._lock:
            if key not in self._slots:
                return
            self._slots.discard(key)
            self._closing.discard(key)
            waiters, self._slot_waiters = self._slot_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        self.release()

    async def refresh(self, key: int) -> bool:
        """Send a refresh REGISTER for ``key`` (True), or join the one in flight (False).

        The outcome arrives as the account's next RegEvent. Raises ConnectError if closed.
        """
        return await self._call(lambda owner: owner.refresh(key))

    def remove(self, key: int, *, unregister: bool = True) -> cf.Future[None]:
        """Close account ``key``: un-REGISTER (bounded by its ``unregister_timeout``), then
        ``shutdown``, on the owner thread. Never raises; the future resolves once the account is
        gone. It runs to completion whether or not anyone awaits it.
        """
        done: cf.Future[None] = cf.Future()
        started: cf.Future[None] = cf.Future()

        def engine_gone(f: cf.Future[None]) -> None:
            # The thread ended before running the close: its teardown already shut accounts down.
            if f.cancelled() or f.exception() is not None:
                self._free_slot(key)
                if not done.done():
                    done.set_result(None)

        started.add_done_callback(engine_gone)
        with self._lock:
            if key not in self._slots:
                done.set_result(None)
                return done
            self._closing.add(key)
            running = self._state in ("starting", "running", "stopping")
            if running:
                self._cmds.put((lambda owner: owner.begin_close(key, unregister, done), started))
                self._wake_locked()
        if not running:
            self._free_slot(key)
            done.set_result(None)
        return done

    # -- the owner thread --------------------------------------------------------------------------

    def _main(self) -> None:
        with self._lock:
            run = self._run
            config = self.config
        assert run is not None
        owner = Owner(config, self._free_slot)
        try:
            wake_addr = owner.boot()
        except BaseException as exc:
            log.warning("SIP engine failed to start: %s", exc)
            owner.teardown()
            err = ConnectError(f"the SIP engine (pjsua2) failed to start: {exc}")
            if isinstance(exc, ImportError):
                err = ConnectError(str(exc), fatal=True)
            err.__cause__ = exc
            self._finish(run, err)
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        with self._lock:
            self._wake_sock = sock
            run.wake_addr = wake_addr
            self._state = "stopping" if run.stop else "running"
            if self._users == 0:
                self._request_stop_locked()  # every user left while PJSIP was starting
        run.ready.set_result(None)
        try:
            self._loop(owner, run, config)
        except BaseException:  # pragma: no cover - a bug; keep the process alive regardless
            log.exception("SIP engine loop failed; stopping it")
        owner.teardown()
        self._finish(run, ConnectError("the SIP engine stopped"))

    def _loop(self, owner: Owner, run: _Run, config: EngineConfig) -> None:
        poll_ms = max(1, round(config.poll_interval * 1000))
        stop_deadline: float | None = None
        while True:
            self._run_commands(owner)
            now = time.monotonic()
            owner.expire(now)
            if run.stop:
                if stop_deadline is None:
                    stop_deadline = now + config.stop_timeout
                    owner.close_all()
                if owner.idle or now >= stop_deadline:
                    return
            owner.poll(poll_ms)

    def _run_commands(self, owner: Owner) -> None:
        while True:
            try:
                fn, fut = self._cmds.get_nowait()
            except queue.Empty:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                result = fn(owner)
            except BaseException as exc:
                _detach(exc)
                fut.set_exception(exc)
            else:
                fut.set_result(result)

    def _finish(self, run: _Run, err: ConnectError) -> None:
        """Thread exit: fail the commands still queued, resolve the run's futures."""
        with self._lock:
            self._state = "stopped"
            self._run = None
            sock, self._wake_sock = self._wake_sock, None
            leftovers: list[_Command] = []
            while True:
                try:
                    leftovers.append(self._cmds.get_nowait())
                except queue.Empty:
                    break
        if sock is not None:
            sock.close()
        for _fn, fut in leftovers:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(err)
        if not run.ready.done():
            run.ready.set_exception(err)
        run.done.set_result(None)


def _detach(exc: BaseException) -> None:
    """Clear the locals of the frames an exception carries to another thread.

    A traceback keeps every frame's locals alive: a pjsua2 Account or Endpoint among them would
    later be dropped on the thread that drops the exception, which aborts the process. Line
    numbers stay, so the traceback still prints.
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        item = todo.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        if item.__traceback__ is not None:
            traceback.clear_frames(item.__traceback__)
        todo += [item.__cause__, item.__context__]
        if isinstance(item, BaseExceptionGroup):
            todo += list(item.exceptions)


def _bridge(fut: cf.Future[T], *, cancel: bool = False) -> asyncio.Future[T]:
    """An asyncio future following ``fut``, like ``asyncio.wrap_future`` except that a closed
    loop is ignored rather than logged, and cancelling reaches ``fut`` only when ``cancel``.
    """
    loop = asyncio.get_running_loop()
    out: asyncio.Future[T] = loop.create_future()

    def settle(src: cf.Future[T]) -> None:
        if out.done():
            return
        if src.cancelled():
            out.cancel()
        elif (exc := src.exception()) is not None:
            out.set_exception(exc)
        else:
            out.set_result(src.result())

    def on_done(src: cf.Future[T]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(settle, src)

    fut.add_done_callback(on_done)
    if cancel:
        out.add_done_callback(lambda o: fut.cancel() if o.cancelled() else None)
    return out


def _stop_at_exit() -> None:
    """At interpreter exit: un-REGISTER what is left and destroy PJSIP on the owner thread."""
    engine = _engine
    if engine is None:
        return
    with engine._lock:
        run = engine._run
        if run is None:
            return
        engine._request_stop_locked()
    with contextlib.suppress(Exception):
        run.done.result(timeout=engine.config.stop_timeout + 2.0)

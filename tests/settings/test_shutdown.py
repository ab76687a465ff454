"""GracefulShutdown with real signals sent to this process (handlers are installed only inside the
block, and restored after it): the first drains, the second closes hard."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from tests.settings.conftest import EchoServer, echo_pool
from voicepool import GracefulShutdown, PoolManager
from voicepool.manager import ManagerState
from voicepool.settings import VoicePoolSettings

ROOT = Path(__file__).resolve().parents[2]
MakeServer = Callable[..., Awaitable[EchoServer]]


def kill_self(sig: signal.Signals, after: float = 0.0) -> None:
    loop = asyncio.get_running_loop()
    loop.call_later(after, os.kill, os.getpid(), sig)


async def test_first_signal_drains() -> None:
    async with GracefulShutdown() as shutdown:
        assert shutdown.received_signal is None
        kill_self(signal.SIGTERM)
        await asyncio.wait_for(shutdown.wait(), 5)
        assert shutdown.draining
        assert not shutdown.hard
        assert shutdown.received_signal is signal.SIGTERM
    assert shutdown.exit_code == 0
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
async def test_second_signal_cancels_the_block(sig: signal.Signals, code: int) -> None:
    reached_end = False
    async with GracefulShutdown() as shutdown:
        kill_self(sig)
        await shutdown.wait()
        kill_self(sig, after=0.05)
        await asyncio.sleep(30)  # a drain that would take too long
        reached_end = True
    assert not reached_end
    assert shutdown.hard
    assert shutdown.exit_code == code
    current = asyncio.current_task()
    assert current is not None
    assert current.cancelling() == 0  # the cancellation was absorbed: this task lives on
    await asyncio.sleep(0)


async def test_hard_after_escalates_by_itself() -> None:
    t0 = time.monotonic()
    async with GracefulShutdown(hard_after=0.2) as shutdown:
        shutdown.request()
        shutdown.request()  # idempotent: not a second stage
        assert not shutdown.hard
        await asyncio.sleep(30)
    assert 0.15 < time.monotonic() - t0 < 5
    assert shutdown.hard
    assert shutdown.received_signal is None
    assert shutdown.exit_code == 143


async def test_outside_cancellation_is_not_absorbed() -> None:
    entered = asyncio.Event()

    async def body() -> None:
        async with GracefulShutdown():
            entered.set()
            await asyncio.sleep(30)

    task = asyncio.create_task(body())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_misuse_raises() -> None:
    shutdown = GracefulShutdown()
    with pytest.raises(RuntimeError, match="async with"):
        await shutdown.wait()
    async with shutdown:
        pass
    with pytest.raises(RuntimeError, match="only once"):
        async with shutdown:
            pass


async def _serve_one_call(
    server: EchoServer, hold: asyncio.Event | None, drain_timeout: float
) -> tuple[GracefulShutdown, PoolManager, list[str]]:
    """A minimal worker: one call holding a lease; the first signal stops it from taking more."""
    settings = VoicePoolSettings(
        pools={"asr": echo_pool(server.port, min_size=1, max_size=1, drain_timeout=drain_timeout)}
    )
    manager = PoolManager.from_settings(settings)
    log: list[str] = []
    started = asyncio.Event()

    async def call() -> None:
        async with manager.acquire("asr") as lease:
            started.set()
            if hold is not None:
                await hold.wait()
            log.append(await lease.conn.request("bye"))

    async with GracefulShutdown() as shutdown, manager, asyncio.TaskGroup() as calls:
        calls.create_task(call())
        await started.wait()
        kill_self(signal.SIGTERM)
        await shutdown.wait()
        log.append("draining")
        if hold is not None:
            kill_self(signal.SIGTERM, after=0.05)  # the call never ends: ask again
    return shutdown, manager, log


async def test_worker_drains_on_first_signal(echo_server: MakeServer) -> None:
    server = await echo_server()
    shutdown, manager, log = await _serve_one_call(server, hold=None, drain_timeout=5)
    assert sorted(log) == ["bye", "draining"]
    assert shutdown.exit_code == 0
    assert manager.state is ManagerState.CLOSED


async def test_worker_closes_hard_on_second_signal(echo_server: MakeServer) -> None:
    server = await echo_server()
    t0 = time.monotonic()
    shutdown, manager, log = await _serve_one_call(server, hold=asyncio.Event(), drain_timeout=30)
    assert time.monotonic() - t0 < 5  # not the 30 s drain
    assert log == ["draining"]  # the call was cancelled, never said bye
    assert shutdown.exit_code == 143
    assert manager.state is ManagerState.CLOSED
    await server.all_closed()


async def test_second_sigterm_during_the_manager_drain_cuts_it_short() -> None:
    """A real worker process: SIGTERM, the drain starts (30 s, a call still holds its lease),
    SIGTERM again: the later, shorter deadline reaches the drain under way, and the process
    exits 143 at once with every pool closed, no task pending and nothing on stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-X",
        "dev",  # asyncio debug mode: un-awaited coroutines and pending tasks are reported
        "-m",
        "tests.settings._drain_worker",
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(20):
            assert await proc.stdout.readline() == b"ready\n"
            proc.send_signal(signal.SIGTERM)
            assert await proc.stdout.readline() == b"drain started\n"
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert time.monotonic() - t0 < 5  # not the 30 s drain
    assert err.decode() == ""
    assert out.decode().splitlines() == ["manager closed pools asr=closed pending 0"]
    assert proc.returncode == 143

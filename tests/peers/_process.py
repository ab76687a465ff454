"""What every real peer runner in tests/peers shares: finding its binary, a free port, waiting
(bounded) until the process it started serves, and stopping that process by its PID.

The runners (Kamailio, SIPp, nginx, redis-server, node) differ in their configuration and in
what "ready" means; these are the parts that do not.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
from collections.abc import Awaitable, Callable

__all__ = [
    "find_binary",
    "free_port",
    "free_sip_port",
    "poll_ready",
    "port_bound",
    "stop_process",
]


def find_binary(name: str, *folders: str) -> str | None:
    """Path of ``name`` on ``PATH``, else the first executable ``folder/name``, else None."""
    found = shutil.which(name)
    if found:
        return found
    for folder in folders:
        path = os.path.join(folder, name)
        if os.access(path, os.X_OK):
            return path
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (bind to port 0, read it, close).

    Another process may take it before you bind it: use it at once, for servers such as nginx
    whose config must name a port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def free_sip_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP on ``host`` a moment ago (SIP serves both on one)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port: int = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((host, port))
                except OSError:
                    continue
                return port
    raise OSError(f"no port free for both UDP and TCP on {host}")


def port_bound(host: str, port: int, kind: int = socket.SOCK_DGRAM) -> bool:
    """Whether someone holds ``host:port`` (a bind attempt fails): a readiness probe that sends
    nothing, so a server running a strict scenario (SIPp) sees no stray message.
    """
    with socket.socket(socket.AF_INET, kind) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


async def poll_ready(
    proc: asyncio.subprocess.Process,
    ready: Callable[[], Awaitable[bool]],
    *,
    timeout: float,
    exited: Callable[[int], Exception],
    late: Callable[[], Exception],
    interval: float = 0.02,
) -> None:
    """Return once ``ready()`` is true; raise ``exited(status)`` if ``proc`` exits first, and
    ``late()`` when ``timeout`` seconds pass. None of the peers announces that it has bound its
    sockets, so this polls, bounded. Cancellation-safe (it starts nothing)."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                if proc.returncode is not None:
                    raise exited(proc.returncode)
                if await ready():
                    return
                await asyncio.sleep(interval)
    except TimeoutError:
        raise late() from None


async def stop_process(
    proc: asyncio.subprocess.Process, timeout: float, *, group: bool = False
) -> None:
    """Stop ``proc`` by its PID: SIGTERM, then SIGKILL after ``timeout`` seconds (to its whole
    process group with ``group``: a runner that started it with ``start_new_session`` owns that
    group, workers included); reap it. Never raises for a process that is already gone."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            async with asyncio.timeout(timeout):
                await proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if group:
                    os.killpg(proc.pid, signal.SIGKILL)
                else:
                    proc.kill()
            await proc.wait()
    else:
        await proc.wait()

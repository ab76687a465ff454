"""A worker process for test_shutdown: one call holds a lease forever, the first SIGTERM drains
(drain_timeout 30 s), the second arrives during that drain. Prints its milestones on stdout."""

from __future__ import annotations

import asyncio
import logging
import sys

from tests.settings.conftest import EchoServer, echo_pool
from voicepool import GracefulShutdown, PoolManager
from voicepool.settings import VoicePoolSettings


class _Milestones(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if "-> closing" in record.getMessage():
            print("drain started", flush=True)


async def main() -> int:
    logging.getLogger("voicepool.pool").addHandler(_Milestones(logging.DEBUG))
    logging.getLogger("voicepool.pool").setLevel(logging.DEBUG)
    server = await EchoServer().start()
    settings = VoicePoolSettings(
        pools={"asr": echo_pool(server.port, min_size=1, max_size=1, drain_timeout=30)}
    )
    manager = PoolManager.from_settings(settings)
    hold = asyncio.Event()
    held = asyncio.Event()

    async def call() -> None:
        async with manager.acquire("asr"):
            held.set()
            await hold.wait()  # a call that outlasts any drain

    async with GracefulShutdown() as shutdown, manager:
        task = asyncio.get_running_loop().create_task(call())
        await held.wait()
        print("ready", flush=True)
        await shutdown.wait()
        # Leaving `async with manager` drained (30 s) until the second SIGTERM cut it short.
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await server.aclose()
    current = asyncio.current_task()
    pending = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
    states = ",".join(f"{n}={p.state.value}" for n, p in manager.pools.items())
    print(f"manager {manager.state.value} pools {states} pending {len(pending)}", flush=True)
    return shutdown.exit_code


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

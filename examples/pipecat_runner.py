"""A FastAPI runner for Pipecat bots sharing one set of voicepool pools, offline.

Pipecat's runner starts each call's ``bot()`` as a task in one process; the pools are started
once, in the app's lifespan, and every ``bot()`` builds its services as usual (the pooled
imports): its sockets come warm from the shared pools. Here the emulators start with the app and
each ``POST /calls`` runs a simulated call (examples/pipecat_bot.py); in a real worker ``bot()``
gets the call's transport from the runner instead.

    python examples/pipecat_runner.py     # serves 127.0.0.1:7860; POST /calls, GET /health
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI

sys.path.insert(0, str(Path(__file__).parent))
import pipecat_bot as calls

from voicepool.integrations.pipecat import PipecatPools


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with calls.emulated_services() as stack:
        pools = PipecatPools(
            concurrency=10,
            audio_in_sample_rate=calls.IN_RATE,
            audio_out_sample_rate=calls.OUT_RATE,
        )
        pools.declare(*calls.make_services(stack))  # the pools, from the bot's own services
        async with pools:  # one PoolManager for every bot() task of this process
            app.state.stack, app.state.pools, app.state.tasks = stack, pools, set()
            yield
            await asyncio.gather(*app.state.tasks, return_exceptions=True)


app = FastAPI(lifespan=lifespan)


async def bot(stack: calls.Stack) -> calls.CallResult:
    """One call, as Pipecat's runner would start it: services built here, per call."""
    return await calls.run_call(calls.make_services(stack), turns=2)


@app.post("/calls")
async def start_call() -> dict[str, Any]:
    task = asyncio.get_running_loop().create_task(bot(app.state.stack))
    app.state.tasks.add(task)
    task.add_done_callback(app.state.tasks.discard)
    return {"started": True, "calls_in_progress": len(app.state.tasks)}


@app.get("/health")
async def health() -> dict[str, Any]:
    pools: PipecatPools = app.state.pools
    report = pools.manager.health()
    report["pool_misses"] = sum(pools.index.misses.values())
    return report


if __name__ == "__main__":
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    config = Config()
    config.bind = ["127.0.0.1:7860"]
    # At boot, after the imports: their ~400k objects out of the collector's reach, or a full
    # collection stops every call in this process for ~250 ms now and then.
    gc.collect()
    gc.freeze()
    asyncio.run(serve(app, config))  # type: ignore[arg-type]

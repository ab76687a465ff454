"""A FastAPI service whose pools live in the lifespan, with a readiness probe from manager.health().

    VOICEPOOL_CONFIG=voicepool.toml hypercorn examples.fastapi_app:app     (or uvicorn)
    python examples/fastapi_app.py --config voicepool.toml --port 8000

* The pools boot before the first request is accepted (all of them concurrently) and drain after
  the last one; a required pool that cannot connect stops the startup with an error naming it.
* ``GET /healthz`` is the readiness probe: ``manager.health()`` as JSON, 200 while the worker can
  take calls (ready or degraded), 503 when it cannot (a required pool unavailable, starting,
  closing). Credentials never appear in it.
* ``GET /livez`` is the liveness probe: the process answers.
* ``POST /pools/{name}/probe`` leases a warm connection and pings it once (the request handler
  pattern: ``async with manager.acquire(name) as lease``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from voicepool import (
    PoolClosed,
    PoolExhausted,
    PoolManager,
    PoolUnavailable,
    VoicePoolSettings,
)


def create_app(settings: VoicePoolSettings | None = None) -> FastAPI:
    """The app; ``settings`` None reads them at startup (environment, .env, VOICEPOOL_CONFIG)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        manager = PoolManager.from_settings(settings)
        async with manager:  # boot; leaving drains every pool within its drain_timeout
            yield {"pools": manager}  # lifespan state: request.state.pools

    app = FastAPI(title="voice worker", lifespan=lifespan)

    @app.get("/healthz")
    async def healthz(request: Request) -> JSONResponse:
        report = request.state.pools.health()
        return JSONResponse(report, status_code=200 if report["ready"] else 503)

    @app.get("/livez")
    async def livez() -> dict[str, str]:
        return {"status": "alive"}

    @app.post("/pools/{name}/probe")
    async def probe(name: str, request: Request) -> dict[str, Any]:
        manager: PoolManager = request.state.pools
        if name not in manager:
            raise HTTPException(404, f"no pool named {name!r}")
        t0 = time.perf_counter()
        try:
            async with manager.acquire(name) as lease:
                acquired = time.perf_counter()
                await lease.pool.adapter.ping(lease.conn)
        except (PoolExhausted, PoolUnavailable, PoolClosed) as exc:
            raise HTTPException(503, str(exc)) from exc
        return {
            "pool": name,
            "acquire_ms": round((acquired - t0) * 1000, 3),
            "ping_ms": round((time.perf_counter() - acquired) * 1000, 3),
        }

    return app


app = create_app()


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the example app with hypercorn.")
    parser.add_argument("--config", type=Path, help="TOML file (default: VOICEPOOL_CONFIG)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()

    import asyncio

    from hypercorn.asyncio import serve  # pip install hypercorn (or run it under uvicorn)
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"{args.host}:{args.port}"]
    settings = VoicePoolSettings(config=args.config) if args.config else None
    asyncio.run(serve(create_app(settings), config))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()

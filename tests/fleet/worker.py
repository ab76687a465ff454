"""One voice worker process for the fleet tests: ``python -m tests.fleet.worker '<json>'``.

It opens a Deepgram pool (SINGLE_USE streams, sized for 10 calls with spares) on the emulator
named in its argument, with or without a fleet quota, then obeys JSON lines on stdin and answers
one JSON line each on stdout:

- ``{"cmd": "load", "calls": N, "seconds": S, "hold": H}``: N concurrent callers for S seconds,
  each acquiring a stream, holding it H seconds and releasing it, again and again; the answer
  counts calls served and failed (by error type, and ConnectError statuses such as 429);
- ``{"cmd": "stats"}``: the pool's stats; ``{"cmd": "exit"}``: close the pool and exit.

Every loop is bounded by its ``seconds``; the process exits when stdin closes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from collections import Counter
from typing import Any

from voicepool import Pool, PoolSettings
from voicepool.adapters.deepgram import DeepgramAdapter
from voicepool.errors import ConnectError


def _out(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def _load(pool: Pool[Any], calls: int, seconds: float, hold: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    served = 0
    errors: Counter[str] = Counter()

    async def caller() -> None:
        nonlocal served
        while loop.time() < end:
            try:
                async with pool.acquire():
                    await asyncio.sleep(hold)  # the call's turn-taking, paced by the test
                served += 1
            except Exception as err:
                errors[type(err).__name__] += 1
                await asyncio.sleep(0.05)  # a failed call is not retried in a tight loop

    await asyncio.gather(*(caller() for _ in range(calls)))
    return {"served": served, "failed": sum(errors.values()), "errors": dict(errors)}


async def main(config: dict[str, Any]) -> None:
    rejected: Counter[int] = Counter()
    adapter = DeepgramAdapter(url=config["url"], api_key=config["api_key"])
    real_connect = adapter.connect

    async def counting_connect() -> Any:
        try:
            return await real_connect()
        except ConnectError as err:
            rejected[err.status or 0] += 1
            raise

    adapter.connect = counting_connect
    settings: dict[str, Any] = {
        "concurrency": 10,
        "acquire_timeout": config.get("acquire_timeout", 8.0),
        "backoff_initial": 0.2,
        "backoff_max": 1.0,
        "failure_threshold": 1000,  # a 429 storm must not open the circuit: count them instead
    }
    if config.get("redis"):
        settings["quota"] = {
            "key": "deepgram-project",
            "limit": config["limit"],
            "backend": config["redis"],
            "ttl": config.get("ttl", 2.0),
            "refresh": config.get("refresh", 0.5),
            "poll": 0.05,
            "timeout": 0.25,
        }
    pool: Pool[Any] = Pool(adapter, PoolSettings.model_validate(settings), name=config["name"])
    await pool.start(require_ready=False)
    holder = getattr(pool, "_holder", None)
    _out({"ready": True, "holder": holder, "min_size": pool.min_size, "max_size": pool.max_size})
    loop = asyncio.get_running_loop()
    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            cmd = json.loads(line)
            if cmd["cmd"] == "load":
                result = await _load(pool, cmd["calls"], cmd["seconds"], cmd["hold"])
                result["rejected"] = {str(k): v for k, v in rejected.items()}
                _out(result)
            elif cmd["cmd"] == "stats":
                stats = dataclasses.asdict(pool.stats())
                stats["state"] = pool.state.value
                stats["rejected"] = {str(k): v for k, v in rejected.items()}
                _out(stats)
            elif cmd["cmd"] == "exit":
                break
    finally:
        await pool.aclose(2.0)
    _out({"closed": True})


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))

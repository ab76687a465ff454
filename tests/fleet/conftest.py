"""Fleet-quota tests run against a real redis-server (tests/peers/redis.py), one per test."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.peers.redis import RedisServer, redis_available

needs_redis = pytest.mark.skipif(
    not redis_available(),
    reason="redis-server is not installed (scripts/install-system-deps.sh installs it)",
)


@pytest.fixture
async def redis_server() -> AsyncIterator[RedisServer]:
    async with RedisServer() as server:
        yield server

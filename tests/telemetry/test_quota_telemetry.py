"""Fleet quota telemetry (issue 15): reserved / used / limit per key, and the exhaustion event
that says it was the fleet quota. On a real redis-server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.fleet.conftest import needs_redis
from tests.peers.redis import RedisServer
from tests.telemetry.conftest import Otel
from voicepool import Pool, PoolExhausted, PoolSettings
from voicepool.telemetry import names as n
from voicepool.testing import FakeAdapter

pytestmark = needs_redis


def _settings(url: str, **kw: object) -> PoolSettings:
    quota = {"key": "acct", "limit": 2, "backend": url, "ttl": 2.0, "refresh": 0.2}
    return PoolSettings.model_validate({"quota": quota, **kw})


@pytest.fixture
async def redis() -> AsyncIterator[RedisServer]:
    async with RedisServer() as server:
        yield server


async def test_quota_metrics_and_the_exhaustion_event(otel: Otel, redis: RedisServer) -> None:
    async with (
        Pool(FakeAdapter(), _settings(redis.url, min_size=2, max_size=2), name="a") as a,
        Pool(FakeAdapter(), _settings(redis.url, min_size=0, max_size=3), name="b") as b,
    ):
        held = [await a.lease(), await a.lease()]
        with otel.tracer.start_as_current_span("call"), pytest.raises(PoolExhausted):
            async with b.acquire(timeout=0.3):
                pass
        metrics = otel.metrics()
        key = {"voicepool__pool__name": "a", "voicepool__quota__key": "acct"}
        assert otel.value(n.QUOTA_RESERVED, metrics, **key) == 2
        assert otel.value(n.QUOTA_USED, metrics, **key) == 2
        assert otel.value(n.QUOTA_LIMIT, metrics, **key) == 2
        assert otel.value(n.QUOTA_BACKEND_ERRORS, metrics, **key) == 0
        for lease in held:
            await lease.release()
    (span,) = otel.spans("call")
    (event,) = [e for e in span.events if e.name == n.EVENT_EXHAUSTED]
    attrs = dict(event.attributes or {})
    assert attrs[n.ATTR_EXHAUSTED_BY] == "fleet_quota"
    assert attrs[n.ATTR_QUOTA_KEY] == "acct"
    assert attrs[n.ATTR_QUOTA_LIMIT] == 2

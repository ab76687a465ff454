"""The pool's side of an urgent quota ask, with a backend that answers in its first step: the
pool drives an urgent sync up to its first suspension in the step that asked (so the request
goes out before that step ends); one that completes or fails there is handled like any other."""

from __future__ import annotations

import pytest

from voicepool import Pool, PoolExhausted, PoolSettings
from voicepool._engine.quota import QuotaGrant
from voicepool.testing import FakeAdapter


class InstantBackend:
    """A fleet quota backend (QuotaBackend) that never suspends: it grants what is asked up to
    ``limit`` at once, or raises at once (``down``)."""

    def __init__(self, *, down: bool = False) -> None:
        self.down = down
        self.urgent: list[bool] = []

    def holder(self, pool: str) -> str:
        return pool

    async def sync(
        self,
        key: str,
        holder: str,
        *,
        want: int,
        claimed: int,
        waiting: int,
        busy: int,
        limit: int,
        ttl: float,
        step: int = 1,
        recover: float | None = None,
        urgent: bool = False,
    ) -> QuotaGrant:
        self.urgent.append(urgent)
        if self.down:
            raise ConnectionError("backend down")
        granted = min(want, limit)
        return QuotaGrant(granted, granted, 1 if granted else 0, 0, busy)

    async def aclose(self) -> None:
        pass


def _settings() -> PoolSettings:
    quota = {"key": "acct", "limit": 3, "backend": "redis://127.0.0.1:1/0", "timeout": 0.1}
    return PoolSettings.model_validate(
        {"min_size": 0, "max_size": 2, "acquire_timeout": 0.3, "quota": quota}
    )


async def test_an_urgent_ask_answered_in_its_first_step_grants() -> None:
    backend = InstantBackend()
    pool = Pool(FakeAdapter(), _settings(), name="asr", quota=backend)
    async with pool, pool.acquire():
        assert pool.stats().quota_reserved == 1
    assert True in backend.urgent


async def test_an_urgent_ask_that_fails_in_its_first_step_is_a_backend_error() -> None:
    backend = InstantBackend(down=True)
    async with Pool(FakeAdapter(), _settings(), name="asr", quota=backend) as pool:
        with pytest.raises(PoolExhausted, match="backend unreachable"):
            async with pool.acquire():
                pass
        assert pool.stats().quota_backend_errors >= 1
    assert True in backend.urgent

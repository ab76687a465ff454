"""Fixtures of the HTTP/2 and REST pool tests: a real LLM emulator over TLS + HTTP/2 on 127.0.0.1,
pools of Http2Adapter against it, and an httpx client on the pooled transport."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import httpx2
import pytest

from voicepool import Pool, PoolSettings
from voicepool.adapters.http2 import H2Connection, Http2Adapter, PooledTransport, PooledTransport2
from voicepool.testing.llm import LlmEmulator
from voicepool.testing.tls import test_certificates

API_KEY = "sk-test-0123456789"

MakePool = Callable[..., Awaitable[Pool[H2Connection]]]


def settings(**kw: Any) -> PoolSettings:
    """Pool settings shrunk for tests: fast backoff, short drain."""
    base: dict[str, Any] = {
        "min_size": 1,
        "max_size": 2,
        "acquire_timeout": 5.0,
        "connect_timeout": 5.0,
        "drain_timeout": 1.0,
        "backoff_initial": 0.05,
        "backoff_max": 0.2,
    }
    base.update(kw)
    return PoolSettings(**base)


def adapter_for(url: str, **kw: Any) -> Http2Adapter:
    opts: dict[str, Any] = {
        "base_url": url,
        "api_key": API_KEY,
        "ca_file": str(test_certificates().ca_path),
    }
    opts.update(kw)
    return Http2Adapter(**opts)


@pytest.fixture
async def llm() -> AsyncIterator[LlmEmulator]:
    async with LlmEmulator(api_key=API_KEY, ttft=0.02, tokens=10, tokens_per_second=200.0) as emu:
        yield emu


@pytest.fixture
async def make_pool() -> AsyncIterator[MakePool]:
    """``await make_pool(url, settings=..., **adapter_options)``: a started pool, closed after."""
    pools: list[Pool[H2Connection]] = []

    async def make(
        url: str, pool_settings: PoolSettings | None = None, **adapter_kw: Any
    ) -> Pool[H2Connection]:
        pool = Pool(adapter_for(url, **adapter_kw), pool_settings or settings(), name="llm")
        await pool.start()
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        await pool.aclose(1.0)


@pytest.fixture
async def pool(llm: LlmEmulator, make_pool: MakePool) -> Pool[H2Connection]:
    return await make_pool(llm.url, warmup_path="/v1/models")


@pytest.fixture
async def client(pool: Pool[H2Connection]) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=PooledTransport(pool)) as http:
        yield http


@pytest.fixture
async def sdk_client(pool: Pool[H2Connection]) -> AsyncIterator[httpx2.AsyncClient]:
    """The httpx2 client on PooledTransport2: the flavour the openai and anthropic SDKs take."""
    async with httpx2.AsyncClient(transport=PooledTransport2(pool)) as http:
        yield http

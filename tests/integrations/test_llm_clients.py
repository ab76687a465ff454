"""voicepool.integrations.openai / .anthropic: the SDK client on a pooled HTTP/2 transport,
``max_retries=0``, the key from the pool's settings."""

from __future__ import annotations

import pytest

from voicepool import Pool, PoolSettings
from voicepool.adapters.http2 import Http2Adapter
from voicepool.integrations import anthropic as vp_anthropic
from voicepool.integrations import openai as vp_openai
from voicepool.testing import LlmEmulator, test_certificates

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
KEY = "llm-key"
CA = str(test_certificates().ca_path)


async def test_openai_client_streams_on_the_pool_with_the_pools_key() -> None:
    async with LlmEmulator(api_key=KEY, ttft=0.0, tokens=3) as server:
        adapter = Http2Adapter(base_url=server.base_url, api_key=KEY, ca_file=CA)
        async with Pool(adapter, PoolSettings(concurrency=2), name="llm") as pool:
            client = vp_openai.client(pool)
            assert client.max_retries == 0
            stream = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            assert text
            assert server.connections_accepted == pool.stats().connects  # nothing beside the pool
            await client.close()  # leaves the shared pool open
            assert pool.stats().size >= 1


async def test_anthropic_client_on_the_pool() -> None:
    async with LlmEmulator(api_key=KEY, ttft=0.0, tokens=3) as server:
        adapter = Http2Adapter(
            base_url=server.url, api_key=KEY, api_key_header="x-api-key", ca_file=CA
        )
        async with Pool(adapter, PoolSettings(concurrency=2), name="claude") as pool:
            client = vp_anthropic.client(pool)
            assert client.max_retries == 0
            reply = await client.messages.create(
                model="m", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
            )
            assert reply.content
            assert server.connections_accepted == pool.stats().connects


def test_a_pool_without_a_key_is_refused() -> None:
    pool = Pool(Http2Adapter(base_url="https://127.0.0.1:9/v1"), PoolSettings(), name="llm")
    with pytest.raises(ValueError, match="no api_key"):
        vp_openai.client(pool)

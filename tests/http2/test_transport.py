"""The official SDKs and httpx on PooledTransport, against the HTTP/2 LLM emulator."""

from __future__ import annotations

import asyncio

import anthropic
import httpx
import httpx2
import openai
import pytest

from tests.http2.conftest import API_KEY, MakePool, settings
from voicepool import Pool
from voicepool.adapters.http2 import H2Connection, PooledTransport, PooledTransport2
from voicepool.testing import wait_until
from voicepool.testing.llm import LlmEmulator


async def test_openai_sdk_streams_on_a_connection_opened_at_boot(
    llm: LlmEmulator, pool: Pool[H2Connection], sdk_client: httpx2.AsyncClient
) -> None:
    assert pool.stats().size == 1
    assert llm.requests["/v1/models"] == 1  # the warm-up ran at boot
    accepted = llm.connections_accepted
    sdk = openai.AsyncOpenAI(base_url=llm.base_url, api_key=API_KEY, http_client=sdk_client)

    stream = await sdk.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    assert pool.stats().streams_in_use == 1  # the SSE response holds its stream
    text, usage = [], None
    async with stream:
        async for chunk in stream:
            if chunk.choices:
                text.append(chunk.choices[0].delta.content or "")
            else:
                usage = chunk.usage

    assert "".join(text) == "".join(f"tok{i} " for i in range(10))
    assert usage is not None
    assert usage.completion_tokens == 10
    assert llm.connections_accepted == accepted  # no handshake during the request
    assert pool.stats().streams_in_use == 0
    assert pool.stats().connects == 1


async def test_cancelling_an_openai_stream_resets_it_at_once(
    llm: LlmEmulator, pool: Pool[H2Connection], sdk_client: httpx2.AsyncClient
) -> None:
    sdk = openai.AsyncOpenAI(base_url=llm.base_url, api_key=API_KEY, http_client=sdk_client)
    got_token = asyncio.Event()

    async def speak() -> None:
        stream = await sdk.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "tell me a long story"}],
            stream=True,
            extra_headers={"x-emulator-tokens": "100000"},
        )
        async for _ in stream:  # no `async with`: cancellation alone must free the stream
            got_token.set()

    turn = asyncio.create_task(speak())
    await got_token.wait()
    turn.cancel()  # the caller barged in
    await asyncio.gather(turn, return_exceptions=True)
    assert pool.stats().streams_in_use == 0
    await llm.wait_for(lambda: llm.open_streams == 0)
    assert llm.resets_received == 1


async def test_openai_sdk_non_streaming_and_models(
    llm: LlmEmulator, sdk_client: httpx2.AsyncClient
) -> None:
    sdk = openai.AsyncOpenAI(base_url=llm.base_url, api_key=API_KEY, http_client=sdk_client)
    models = await sdk.models.list()
    assert [m.id for m in models.data] == [llm.model]
    done = await sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert done.choices[0].message.content is not None
    assert done.choices[0].message.content.startswith("tok0 ")


async def test_anthropic_sdk_streams_on_the_httpx2_transport(
    llm: LlmEmulator, pool: Pool[H2Connection]
) -> None:
    # anthropic 2.x accepts only httpx2 clients: PooledTransport2 is the same transport for them.
    accepted = llm.connections_accepted
    async with httpx2.AsyncClient(transport=PooledTransport2(pool)) as http:
        sdk = anthropic.AsyncAnthropic(base_url=llm.url, api_key=API_KEY, http_client=http)
        async with sdk.messages.stream(
            model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            text = [t async for t in stream.text_stream]
    assert "".join(text) == "tok0 tok1 tok2 tok3 tok4 "
    assert llm.connections_accepted == accepted
    assert pool.stats().streams_in_use == 0


async def test_adapter_credentials_fill_in_missing_auth(
    llm: LlmEmulator, client: httpx.AsyncClient
) -> None:
    resp = await client.get(llm.url + "/v1/models")  # no Authorization: the adapter's api_key
    assert resp.status_code == 200
    assert resp.extensions["http_version"] == b"HTTP/2"
    wrong = await client.get(llm.url + "/v1/models", headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401  # the request's own header wins


async def test_large_bodies_both_ways_under_flow_control(
    llm: LlmEmulator, make_pool: MakePool
) -> None:
    # Small windows on both sides: several WINDOW_UPDATE round trips each way.
    pool = await make_pool(llm.url, stream_window=65535, connection_window=65535)
    body = bytes(range(256)) * 12_000  # ~3 MB
    async with httpx.AsyncClient(transport=PooledTransport(pool)) as http:
        got = await http.post(llm.url + "/v1/echo", content=body)
        streamed = b""
        async with http.stream("POST", llm.url + "/v1/echo", content=body) as resp:
            async for part in resp.aiter_bytes():
                streamed += part

        async def parts():  # a non-replayable streaming request body
            for i in range(0, len(body), 100_000):
                yield body[i : i + 100_000]

        chunked = await http.post(llm.url + "/v1/echo", content=parts())
    assert got.content == body
    assert streamed == body
    assert chunked.content == body
    assert pool.stats().streams_in_use == 0
    assert pool.stats().connects == 1


async def test_response_closed_early_resets_its_stream(
    llm: LlmEmulator, client: httpx.AsyncClient, pool: Pool[H2Connection]
) -> None:
    body = {"model": "m", "stream": True, "messages": []}
    headers = {"x-emulator-tokens": "1000"}
    async with client.stream(
        "POST", llm.base_url + "/chat/completions", json=body, headers=headers
    ) as resp:
        async for _ in resp.aiter_bytes():
            break  # the caller stops reading: leaving the block closes the response
    await llm.wait_for(lambda: llm.open_streams == 0)
    assert llm.resets_received == 1
    assert pool.stats().streams_in_use == 0


async def test_requests_to_another_origin_are_refused(client: httpx.AsyncClient) -> None:
    with pytest.raises(httpx.UnsupportedProtocol):
        await client.get("https://127.0.0.2:1/v1/models")


async def test_refused_streams_become_connect_errors_after_retries(
    llm: LlmEmulator, client: httpx.AsyncClient, pool: Pool[H2Connection]
) -> None:
    llm.refuse_streams()
    with pytest.raises(httpx.ConnectError, match="refused"):
        await client.get(llm.url + "/v1/models")
    assert pool.stats().streams_in_use == 0
    llm.refuse_streams(False)
    assert (await client.get(llm.url + "/v1/models")).status_code == 200


async def test_exhausted_pool_is_a_pool_timeout(llm: LlmEmulator, make_pool: MakePool) -> None:
    pool = await make_pool(llm.url, settings(max_size=1, max_streams=1, acquire_timeout=0.1))
    async with httpx.AsyncClient(transport=PooledTransport(pool)) as http:
        body = {"model": "m", "stream": True, "messages": []}
        async with http.stream(
            "POST", llm.base_url + "/chat/completions", json=body, headers={"x-emulator-ttft": "5"}
        ):
            with pytest.raises(httpx.PoolTimeout, match="exhausted"):
                await http.get(llm.url + "/v1/models")
    await wait_until(lambda: pool.stats().streams_in_use == 0)


async def test_transport_close_leaves_a_shared_pool_open(pool: Pool[H2Connection]) -> None:
    async with httpx.AsyncClient(transport=PooledTransport(pool)):
        pass
    assert pool.stats().state.value == "ready"


async def test_early_response_then_no_error_reset_is_delivered(
    llm: LlmEmulator, client: httpx.AsyncClient, pool: Pool[H2Connection]
) -> None:
    # The server answers 413 before taking the body (bigger than its flow-control window), then
    # resets the stream with NO_ERROR: the client must return the response, not an error.
    resp = await client.post(llm.url + "/v1/too-large", content=b"x" * 1_000_000)
    assert resp.status_code == 413
    assert pool.stats().streams_in_use == 0
    assert (await client.get(llm.url + "/v1/models")).status_code == 200
    assert pool.stats().connects == 1

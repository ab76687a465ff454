"""The official ``openai`` SDK against LlmEmulator: chat streaming with and without tools, usage
chunks, the Responses API stream, request ids, bad key, 429 with retry-after, context limit."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx2
import openai
import pytest
from openai.types.chat import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionFunctionToolParam,
    ChatCompletionMessageParam,
)
from openai.types.responses import FunctionToolParam, Response, ResponseCompletedEvent

from voicepool.testing import LlmEmulator, test_certificates

from .conftest import BAD_KEY, KEY, strict

TOOLS: list[ChatCompletionFunctionToolParam] = [
    {
        "type": "function",
        "function": {
            "name": "lookup_order",
            "description": "Find an order",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
        },
    }
]


@pytest.fixture
async def llm() -> AsyncIterator[LlmEmulator]:
    async with LlmEmulator(api_key=KEY, ttft=0.0, tokens=4, tokens_per_second=1000) as server:
        yield server


def client(llm: LlmEmulator, key: str = KEY, retries: int = 0) -> openai.AsyncOpenAI:
    # The SDK is typed for (and built on) httpx2, the client voicepool.integrations hands it too.
    http = httpx2.AsyncClient(verify=test_certificates().client_context(), http2=False)
    return openai.AsyncOpenAI(
        base_url=llm.base_url, api_key=key, http_client=http, max_retries=retries
    )


async def test_chat_stream_with_usage_chunk(llm: LlmEmulator) -> None:
    async with client(llm) as oa:
        stream = await oa.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [strict(ChatCompletionChunk, c.to_dict()) async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "tok0 tok1 tok2 tok3 "
    assert chunks[-2].choices[0].finish_reason == "stop"
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    assert usage is not None
    assert usage.completion_tokens == 4


async def test_chat_stream_with_tools_calls_the_tool_then_answers(llm: LlmEmulator) -> None:
    async with client(llm) as oa:
        messages: list[ChatCompletionMessageParam] = [
            {"role": "user", "content": "where is my order"}
        ]
        stream = await oa.chat.completions.create(
            model="gpt-4o-mini", messages=messages, tools=TOOLS, stream=True
        )
        chunks = [strict(ChatCompletionChunk, c.to_dict()) async for c in stream]
        calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
        call_id = calls[0].id
        assert calls[0].function
        assert calls[0].function.name == "lookup_order"
        assert call_id
        arguments = "".join((tc.function.arguments or "") for tc in calls if tc.function)
        assert arguments == '{"query": "tok0"}'
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        messages += [
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": "lookup_order", "arguments": arguments},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call_id, "content": "shipped"},
        ]
        done = await oa.chat.completions.create(
            model="gpt-4o-mini",
            messages=messages,
            tools=TOOLS,
        )
        strict(ChatCompletion, done.to_dict())
        assert done.choices[0].message.content == "tok0 tok1 tok2 tok3 "


async def test_responses_stream_text_and_function_call(llm: LlmEmulator) -> None:
    async with client(llm) as oa:
        stream = await oa.responses.create(model="gpt-4o-mini", input="hi", stream=True)
        events = [e async for e in stream]
        for event in events:
            strict(type(event), event.to_dict())
        deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
        assert "".join(deltas) == "tok0 tok1 tok2 tok3 "
        completed = events[-1]
        assert isinstance(completed, ResponseCompletedEvent)
        assert completed.response.output_text == "tok0 tok1 tok2 tok3 "
        tools: list[FunctionToolParam] = [
            {
                "type": "function",
                "name": "lookup_order",
                "parameters": {"type": "object"},
                "strict": None,
            }
        ]
        stream = await oa.responses.create(
            model="gpt-4o-mini",
            input="order?",
            tools=tools,
            stream=True,
        )
        events = [e async for e in stream]
        for event in events:
            strict(type(event), event.to_dict())
        assert isinstance(events[-1], ResponseCompletedEvent)
        final = strict(Response, events[-1].response.to_dict())
        assert isinstance(final, Response)
        assert final.output[0].type == "function_call"
        assert final.output[0].arguments == '{"query": "tok0"}'


async def test_request_id_and_rate_limit_headers(llm: LlmEmulator) -> None:
    async with client(llm) as oa:
        raw = await oa.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "hi"}]
        )
    assert raw.request_id
    assert raw.request_id.startswith("req_")
    assert int(raw.headers["x-ratelimit-remaining-requests"]) < int(
        raw.headers["x-ratelimit-limit-requests"]
    )


async def test_bad_key_is_authentication_error(llm: LlmEmulator) -> None:
    async with client(llm, key=BAD_KEY) as oa:
        with pytest.raises(openai.AuthenticationError) as info:
            await oa.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "invalid_api_key"


async def test_429_with_retry_after_is_retried_by_the_sdk(llm: LlmEmulator) -> None:
    llm.fail_next(429, retry_after=0.05)
    async with client(llm) as oa:
        with pytest.raises(openai.RateLimitError) as info:
            await oa.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        assert info.value.response.headers["retry-after-ms"] == "50"
        llm.fail_next(429, retry_after=0.05)
    async with client(llm, retries=1) as oa:
        done = await oa.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}]
        )
    assert done.choices[0].message.content
    assert llm.requests["/v1/chat/completions"] == 3


async def test_context_limit_is_a_400_with_its_code() -> None:
    async with LlmEmulator(api_key=KEY, context_window=10) as llm, client(llm) as oa:
        with pytest.raises(openai.BadRequestError) as info:
            await oa.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x" * 200}]
            )
    assert info.value.code == "context_length_exceeded"

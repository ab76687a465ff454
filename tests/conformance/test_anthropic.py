"""The official ``anthropic`` SDK against LlmEmulator: messages streaming (ping events, text and
tool use), count_tokens, request ids, bad key, 429 with retry-after, context limit."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anthropic
import httpx2
import pytest
from anthropic.types import Message, MessageTokensCount, RawMessageStreamEvent
from pydantic import TypeAdapter

from voicepool.testing import LlmEmulator, test_certificates

from .conftest import BAD_KEY, KEY, _no_extras, strict

EVENTS: TypeAdapter[RawMessageStreamEvent] = TypeAdapter(RawMessageStreamEvent)
TOOLS = [{"name": "lookup_order", "input_schema": {"type": "object"}}]


@pytest.fixture
async def llm() -> AsyncIterator[LlmEmulator]:
    async with LlmEmulator(api_key=KEY, ttft=0.0, tokens=3, tokens_per_second=1000) as server:
        yield server


def client(llm: LlmEmulator, key: str = KEY, retries: int = 0) -> anthropic.AsyncAnthropic:
    http = httpx2.AsyncClient(verify=test_certificates().client_context())
    return anthropic.AsyncAnthropic(
        base_url=llm.url, api_key=key, http_client=http, max_retries=retries
    )


async def test_stream_text_with_ping_events(llm: LlmEmulator) -> None:
    async with client(llm) as ac:
        stream = await ac.messages.create(
            model="claude-x",
            max_tokens=50,
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
        )
        kinds = []
        async for event in stream:
            _no_extras(EVENTS.validate_python(event.to_dict(), strict=True))
            kinds.append(event.type)
        async with ac.messages.with_streaming_response.create(
            model="claude-x",
            max_tokens=50,
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
        ) as raw:
            lines = [line async for line in raw.iter_lines()]
        async with ac.messages.stream(
            model="claude-x", max_tokens=50, messages=[{"role": "user", "content": "hi"}]
        ) as s:
            text = "".join([t async for t in s.text_stream])
            final = await s.get_final_message()
    assert lines.index("event: ping") == 3  # right after message_start (event, data, blank)
    assert kinds[0] == "message_start"
    assert "ping" not in kinds
    assert kinds[-1] == "message_stop"
    assert text == "tok0 tok1 tok2 "
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 3


async def test_stream_tool_use(llm: LlmEmulator) -> None:
    async with (
        client(llm) as ac,
        ac.messages.stream(
            model="claude-x",
            max_tokens=50,
            tools=TOOLS,  # type: ignore[arg-type]
            messages=[{"role": "user", "content": "where is my order"}],
        ) as s,
    ):
        final = await s.get_final_message()
    strict(Message, final.to_dict())
    block = final.content[0]
    assert final.stop_reason == "tool_use"
    assert block.type == "tool_use"
    assert block.input == {"query": "tok0"}


async def test_count_tokens(llm: LlmEmulator) -> None:
    async with client(llm) as ac:
        count = await ac.messages.count_tokens(
            model="claude-x", messages=[{"role": "user", "content": "hello there"}]
        )
    strict(MessageTokensCount, count.to_dict())
    assert count.input_tokens > 0


async def test_request_id_header(llm: LlmEmulator) -> None:
    async with client(llm) as ac:
        message = await ac.messages.create(
            model="claude-x", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
        )
    strict(Message, message.to_dict())
    assert message._request_id
    assert message._request_id.startswith("req_")


async def test_bad_key_429_and_context_limit(llm: LlmEmulator) -> None:
    msgs: list[anthropic.types.MessageParam] = [{"role": "user", "content": "hi"}]
    async with client(llm, key=BAD_KEY) as ac:
        with pytest.raises(anthropic.AuthenticationError) as auth:
            await ac.messages.create(model="claude-x", max_tokens=5, messages=msgs)
    assert auth.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    llm.fail_next(429, retry_after=0.05)
    async with client(llm) as ac:
        with pytest.raises(anthropic.RateLimitError) as limited:
            await ac.messages.create(model="claude-x", max_tokens=5, messages=msgs)
    assert limited.value.response.headers["retry-after"] == "1"
    llm.fail_next(529, retry_after=0.05)
    async with client(llm, retries=1) as ac:
        assert await ac.messages.create(model="claude-x", max_tokens=5, messages=msgs)
    llm.context_window = 5
    async with client(llm) as ac:
        with pytest.raises(anthropic.BadRequestError) as too_long:
            await ac.messages.create(model="claude-x", max_tokens=5, messages=msgs * 10)
    assert "prompt is too long" in str(too_long.value)

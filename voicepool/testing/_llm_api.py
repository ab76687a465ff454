"""What the LLM emulator answers: the OpenAI (Chat Completions, Responses) and Anthropic (Messages,
count_tokens) bodies and SSE streams, and the providers' error bodies and rate-limit headers.

The HTTP/2 and HTTP/1.1 serving lives in :mod:`voicepool.testing.llm`; this module only builds
:class:`~voicepool.testing.rest.HttpResponse` objects. Every shape here is the one the official
SDKs parse (tests/conformance validates them against the SDKs' own pydantic types); the sources
are in docs/providers.md.

The model is deterministic: ``count`` tokens ``tok0 tok1 ...``. When the request offers tools
(and ``tool_choice`` is not ``none``) and the conversation does not end with a tool result, the
answer is one call of the first tool with arguments ``{"query": "tok0"}``; after the tool result
it answers in text. That is the rhythm of a voice agent that calls a tool every few turns.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from voicepool.testing.rest import HttpResponse

__all__ = ["ModelApi", "error_response", "estimate_tokens", "rate_limit_headers"]

Sleep = Callable[[float], Awaitable[None]]
TOOL_ARGUMENTS = '{"query": "tok0"}'

# (OpenAI error type, Anthropic error type) by HTTP status: the providers' documented codes.
_ERROR_TYPES = {
    400: ("invalid_request_error", "invalid_request_error"),
    401: ("invalid_request_error", "authentication_error"),
    403: ("invalid_request_error", "permission_error"),
    404: ("invalid_request_error", "not_found_error"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("requests", "rate_limit_error"),
    500: ("server_error", "api_error"),
    503: ("server_error", "api_error"),
    529: ("server_error", "overloaded_error"),
}
_OPENAI_CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded"}


def is_anthropic(path: str) -> bool:
    return path.startswith("/v1/messages")


def error_response(
    path: str,
    status: int,
    message: str,
    *,
    code: str | None = None,
    headers: list[tuple[str, str]] | None = None,
) -> HttpResponse:
    """The provider's error body for ``status`` (Anthropic on ``/v1/messages*``, else OpenAI)."""
    openai_type, anthropic_type = _ERROR_TYPES.get(status, ("server_error", "api_error"))
    body: dict[str, Any]
    if is_anthropic(path):
        body = {"type": "error", "error": {"type": anthropic_type, "message": message}}
    else:
        error = {"message": message, "type": openai_type, "param": None}
        error["code"] = code or _OPENAI_CODES.get(status)
        body = {"error": error}
    return HttpResponse.json(status, body, headers)


def rate_limit_headers(
    path: str, request_id: str, *, limit: int, remaining: int
) -> list[tuple[str, str]]:
    """The request id and rate-limit headers the provider sends on every response."""
    if is_anthropic(path):
        reset = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 60))
        return [
            ("request-id", request_id),
            ("anthropic-ratelimit-requests-limit", str(limit)),
            ("anthropic-ratelimit-requests-remaining", str(remaining)),
            ("anthropic-ratelimit-requests-reset", reset),
        ]
    return [
        ("x-request-id", request_id),
        ("x-ratelimit-limit-requests", str(limit)),
        ("x-ratelimit-remaining-requests", str(remaining)),
        ("x-ratelimit-reset-requests", "60s"),
    ]


def estimate_tokens(body: dict[str, Any]) -> int:
    """Input tokens of a request: about 4 characters of its messages/input/system per token."""
    parts = [body.get(k) for k in ("messages", "input", "system", "instructions", "tools")]
    text = json.dumps([p for p in parts if p is not None], separators=(",", ":"))
    return max(1, len(text) // 4)


def _sse(data: dict[str, Any], event: str | None = None) -> bytes:
    payload = json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


def _tool_name(body: dict[str, Any], last_is_tool_result: bool) -> str | None:
    tools = body.get("tools") or []
    if not tools or body.get("tool_choice") in ("none", {"type": "none"}) or last_is_tool_result:
        return None
    first = tools[0]
    return str(first.get("name") or (first.get("function") or {}).get("name") or "tool")


def _last(items: Any) -> dict[str, Any]:
    return items[-1] if isinstance(items, list) and items and isinstance(items[-1], dict) else {}


class ModelApi:
    """Builds the answers; ``sleep`` paces the tokens (the emulator's tick-aligned sleep)."""

    def __init__(self, model: str, tokens_per_second: float, sleep: Sleep) -> None:
        self.model = model
        self.tokens_per_second = tokens_per_second
        self.sleep = sleep
        self._ids = itertools.count(1)

    def _gap(self) -> Awaitable[None]:
        return self.sleep(1.0 / self.tokens_per_second)

    # -- OpenAI Chat Completions ----------------------------------------------------------------

    def chat(self, body: dict[str, Any], ttft: float, count: int) -> HttpResponse:
        prompt = estimate_tokens(body)
        head = {"id": f"chatcmpl-{next(self._ids)}", "created": int(time.time())}
        head["model"] = self.model
        tool = _tool_name(body, _last(body.get("messages")).get("role") == "tool")
        usage = {"prompt_tokens": prompt, "completion_tokens": count}
        usage["total_tokens"] = prompt + count
        call_id = f"call_{next(self._ids)}"
        if not body.get("stream"):
            reply: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None}
            if tool:
                function = {"name": tool, "arguments": TOOL_ARGUMENTS}
                reply["tool_calls"] = [{"id": call_id, "type": "function", "function": function}]
            else:
                reply["content"] = "".join(f"tok{i} " for i in range(count))
            finish = "tool_calls" if tool else "stop"
            choice = {"index": 0, "finish_reason": finish, "message": reply, "logprobs": None}
            done = {**head, "object": "chat.completion", "choices": [choice], "usage": usage}
            return HttpResponse.json(200, done)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict[str, Any] | None, finish: str | None = None, **extra: Any) -> bytes:
            obj: dict[str, Any] = {**head, "object": "chat.completion.chunk", **extra}
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            obj["choices"] = [] if delta is None else [choice]
            if include_usage and "usage" not in obj:
                obj["usage"] = None  # every chunk carries usage: null until the last one
            return _sse(obj)

        async def events() -> AsyncIterator[bytes]:
            await self.sleep(ttft)
            if tool:
                function = {"name": tool, "arguments": ""}
                call = {"index": 0, "id": call_id, "type": "function", "function": function}
                yield chunk({"role": "assistant", "content": None, "tool_calls": [call]})
                half = len(TOOL_ARGUMENTS) // 2
                for piece in (TOOL_ARGUMENTS[:half], TOOL_ARGUMENTS[half:]):
                    await self._gap()
                    yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
                yield chunk({}, "tool_calls")
            else:
                yield chunk({"role": "assistant", "content": "tok0 "})
                for i in range(1, count):
                    await self._gap()
                    yield chunk({"content": f"tok{i} "})
                yield chunk({}, "stop")
            if include_usage:
                yield chunk(None, usage=usage)
            yield b"data: [DONE]\n\n"

        return HttpResponse(200, [("content-type", "text/event-stream")], events())

    # -- OpenAI Responses -----------------------------------------------------------------------

    def responses(self, body: dict[str, Any], ttft: float, count: int) -> HttpResponse:
        prompt = estimate_tokens(body)
        rid = f"resp_{next(self._ids)}"
        last_input = _last(body.get("input"))
        tool = _tool_name(body, last_input.get("type") == "function_call_output")
        usage = {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": count,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + count,
        }
        base: dict[str, Any] = {
            "id": rid,
            "object": "response",
            "created_at": int(time.time()),
            "model": self.model,
            "status": "in_progress",
            "output": [],
            "parallel_tool_calls": bool(body.get("parallel_tool_calls", True)),
            "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools") or [],
            "error": None,
            "incomplete_details": None,
            "instructions": body.get("instructions"),
            "metadata": {},
            "usage": None,
        }
        text = "".join(f"tok{i} " for i in range(count))
        if tool:
            item: dict[str, Any] = {
                "type": "function_call",
                "id": f"fc_{next(self._ids)}",
                "call_id": f"call_{next(self._ids)}",
                "name": tool,
                "arguments": TOOL_ARGUMENTS,
                "status": "completed",
            }
        else:
            part = {"type": "output_text", "text": text, "annotations": []}
            item = {
                "type": "message",
                "id": f"msg_{next(self._ids)}",
                "role": "assistant",
                "status": "completed",
                "content": [part],
            }
        done = {**base, "status": "completed", "output": [item], "usage": usage}
        if not body.get("stream"):
            return HttpResponse.json(200, done)

        async def events() -> AsyncIterator[bytes]:
            seq = itertools.count()

            def ev(kind: str, **data: Any) -> bytes:
                return _sse({"type": kind, "sequence_number": next(seq), **data}, kind)

            yield ev("response.created", response=base)
            yield ev("response.in_progress", response=base)
            await self.sleep(ttft)
            where = {"output_index": 0, "item_id": item["id"]}
            if tool:
                yield ev(
                    "response.output_item.added", output_index=0, item={**item, "arguments": ""}
                )
                half = len(TOOL_ARGUMENTS) // 2
                for piece in (TOOL_ARGUMENTS[:half], TOOL_ARGUMENTS[half:]):
                    await self._gap()
                    yield ev("response.function_call_arguments.delta", delta=piece, **where)
                yield ev("response.function_call_arguments.done", arguments=TOOL_ARGUMENTS, **where)
            else:
                opened = {**item, "status": "in_progress", "content": []}
                yield ev("response.output_item.added", output_index=0, item=opened)
                empty = {"type": "output_text", "text": "", "annotations": []}
                at = {**where, "content_index": 0}
                yield ev("response.content_part.added", part=empty, **at)
                for i in range(count):
                    if i:
                        await self._gap()
                    yield ev("response.output_text.delta", delta=f"tok{i} ", logprobs=[], **at)
                yield ev("response.output_text.done", text=text, logprobs=[], **at)
                yield ev("response.content_part.done", part=item["content"][0], **at)
            yield ev("response.output_item.done", output_index=0, item=item)
            yield ev("response.completed", response=done)

        return HttpResponse(200, [("content-type", "text/event-stream")], events())

    # -- Anthropic Messages ---------------------------------------------------------------------

    def messages(self, body: dict[str, Any], ttft: float, count: int) -> HttpResponse:
        prompt = estimate_tokens(body)
        content = _last(body.get("messages")).get("content")
        tool_result = isinstance(content, list) and any(
            isinstance(c, dict) and c.get("type") == "tool_result" for c in content
        )
        tool = _tool_name(body, tool_result)
        message: dict[str, Any] = {"id": f"msg_{next(self._ids)}", "type": "message"}
        message |= {"role": "assistant", "model": self.model}
        message |= {"stop_reason": None, "stop_sequence": None}
        text = "".join(f"tok{i} " for i in range(count))
        tool_id = f"toolu_{next(self._ids)}"
        stop_reason = "tool_use" if tool else "end_turn"
        if not body.get("stream"):
            block: dict[str, Any] = {"type": "text", "text": text}
            if tool:
                block = {
                    "type": "tool_use",
                    "id": tool_id,
                    "name": tool,
                    "input": {"query": "tok0"},
                }
            message |= {"content": [block], "stop_reason": stop_reason}
            message["usage"] = {"input_tokens": prompt, "output_tokens": count}
            return HttpResponse.json(200, message)

        def event(kind: str, data: dict[str, Any]) -> bytes:
            return _sse({"type": kind, **data}, kind)

        async def events() -> AsyncIterator[bytes]:
            usage = {"input_tokens": prompt, "output_tokens": 0}
            yield event("message_start", {"message": {**message, "content": [], "usage": usage}})
            yield event("ping", {})  # Anthropic sends ping events; SDKs must skip them
            if tool:
                start = {"type": "tool_use", "id": tool_id, "name": tool, "input": {}}
                yield event("content_block_start", {"index": 0, "content_block": start})
                await self.sleep(ttft)
                half = len(TOOL_ARGUMENTS) // 2
                for piece in (TOOL_ARGUMENTS[:half], TOOL_ARGUMENTS[half:]):
                    delta = {"type": "input_json_delta", "partial_json": piece}
                    yield event("content_block_delta", {"index": 0, "delta": delta})
                    await self._gap()
            else:
                start = {"type": "text", "text": ""}
                yield event("content_block_start", {"index": 0, "content_block": start})
                await self.sleep(ttft)
                for i in range(count):
                    if i:
                        await self._gap()
                    delta = {"type": "text_delta", "text": f"tok{i} "}
                    yield event("content_block_delta", {"index": 0, "delta": delta})
            yield event("content_block_stop", {"index": 0})
            stop = {"stop_reason": stop_reason, "stop_sequence": None}
            yield event("message_delta", {"delta": stop, "usage": {"output_tokens": count}})
            yield event("message_stop", {})

        return HttpResponse(200, [("content-type", "text/event-stream")], events())

    def count_tokens(self, body: dict[str, Any]) -> HttpResponse:
        """``POST /v1/messages/count_tokens``: ``{"input_tokens": N}``."""
        return HttpResponse.json(200, {"input_tokens": estimate_tokens(body)})

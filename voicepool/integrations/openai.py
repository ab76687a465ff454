"""``client(pool)``: ``openai.AsyncOpenAI`` on a pooled HTTP/2 transport.

::

    llm = manager["llm"]                       # adapter http2, base_url https://api.openai.com/v1
    client = voicepool.integrations.openai.client(llm)
    await client.chat.completions.create(...)  # a warm HTTP/2 stream, no handshake

``max_retries=0``: the SDK's retries (2 by default, with backoff) turn an exhausted pool into
seconds of waiting and a down provider into more; the pool already fails fast (PoolExhausted
becomes ``openai.APITimeoutError`` at once, an open circuit ``APIConnectionError``) and retries a
refused stream itself. The key comes from the pool's settings unless given. Building the
first client imports the SDK's chat resources (~80 ms once per process), so that cost is paid at
boot or call setup, never inside a turn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from voicepool.integrations._llm import pool_base_url, pool_key, pooled_http_client
from voicepool.pool import Pool

if TYPE_CHECKING:
    import openai

__all__ = ["client"]


def client(
    pool: Pool[Any], *, api_key: str | None = None, base_url: str | None = None, **kwargs: Any
) -> openai.AsyncOpenAI:
    """An ``AsyncOpenAI`` whose requests run on ``pool`` (a started pool of ``Http2Adapter``).

    ``base_url`` defaults to the pool's ``base_url`` (give its ``/v1`` prefix there); ``kwargs``
    go to ``AsyncOpenAI`` (``max_retries`` may be raised again there). Raises TypeError for a pool
    of another adapter, ValueError when no key is known. No I/O.
    """
    import openai

    kwargs.setdefault("max_retries", 0)
    sdk = openai.AsyncOpenAI(
        api_key=pool_key(pool, api_key),
        base_url=pool_base_url(pool, base_url),
        http_client=pooled_http_client(pool),
        **kwargs,
    )
    # The SDK imports its chat resources (and builds their pydantic models) on first use: about
    # 80 ms, measured, that would land in the first call's first turn. Pay it here (once).
    _ = sdk.chat.completions
    return sdk

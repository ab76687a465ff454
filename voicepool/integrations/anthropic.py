"""``client(pool)``: ``anthropic.AsyncAnthropic`` on a pooled HTTP/2 transport.

The same as :func:`voicepool.integrations.openai.client` (``max_retries=0``, the key from the
pool's settings, an ``httpx2`` client: anthropic 2.x accepts no other). The pool's ``base_url`` is
the API origin (``https://api.anthropic.com``), and its ``api_key_header`` should be
``x-api-key``; the SDK sends its own ``x-api-key`` and ``anthropic-version`` on every request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from voicepool.integrations._llm import pool_base_url, pool_key, pooled_http_client
from voicepool.pool import Pool

if TYPE_CHECKING:
    import anthropic

__all__ = ["client"]


def client(
    pool: Pool[Any], *, api_key: str | None = None, base_url: str | None = None, **kwargs: Any
) -> anthropic.AsyncAnthropic:
    """An ``AsyncAnthropic`` whose requests run on ``pool`` (see the module doc). Raises
    TypeError for a pool of another adapter, ValueError when no key is known. No I/O."""
    import anthropic

    kwargs.setdefault("max_retries", 0)
    sdk = anthropic.AsyncAnthropic(
        api_key=pool_key(pool, api_key),
        base_url=pool_base_url(pool, base_url),
        http_client=pooled_http_client(pool),
        **kwargs,
    )
    _ = sdk.messages  # the SDK's lazy resource import, paid here rather than in a turn
    return sdk

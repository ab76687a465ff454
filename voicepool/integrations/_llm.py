"""What the OpenAI and Anthropic clients share: the pooled httpx2 client and the pool's key."""

from __future__ import annotations

from typing import Any

from voicepool.pool import Pool


def pooled_http_client(pool: Pool[Any]) -> Any:
    """An ``httpx2.AsyncClient`` (the flavour both SDKs accept) on ``PooledTransport2(pool)``.

    Closing the client leaves the pool open (it is shared). Raises TypeError when ``pool`` is not
    a pool of ``Http2Adapter``.
    """
    import httpx2

    from voicepool.adapters.http2 import PooledTransport2

    # The SDK's own timeout applies per request; the pool bounds the wait for a stream.
    return httpx2.AsyncClient(transport=PooledTransport2(pool), timeout=None)


def pool_key(pool: Pool[Any], api_key: str | None) -> str:
    """``api_key`` if given, else the key in the pool's settings. Raises ValueError when neither
    exists (an SDK would read its environment variable instead: not what the pool was built for)."""
    if api_key is not None:
        return api_key
    secret = getattr(getattr(pool.adapter, "options", None), "api_key", None)
    if secret is None:
        raise ValueError(f"pool {pool.name!r} has no api_key in its options; pass api_key=")
    return str(secret.get_secret_value())


def pool_base_url(pool: Pool[Any], base_url: str | None) -> str:
    if base_url is not None:
        return base_url
    adapter: Any = pool.adapter
    return str(adapter.options.base_url).rstrip("/")

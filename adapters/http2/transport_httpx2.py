"""`PooledTransport2`: :class:`~voicepool.adapters.http2.PooledTransport` for ``httpx2`` clients.

Recent OpenAI and Anthropic SDKs are built on ``httpx2`` (an API-compatible successor of httpx);
the Anthropic SDK accepts only ``httpx2.AsyncClient``. Same behaviour, httpx2 types and errors::

    http = httpx2.AsyncClient(transport=PooledTransport2(pool))
    client = anthropic.AsyncAnthropic(base_url=..., api_key=..., http_client=http)

Imported on first use of ``voicepool.adapters.http2.PooledTransport2``: ``httpx2`` is needed only
then (it comes with those SDKs).
"""

from __future__ import annotations

from typing import Any, ClassVar

import httpx2

from .transport import ResponseStreamBase, TransportCore  # noqa: TID251

__all__ = ["PooledTransport2"]


class _ResponseStream2(ResponseStreamBase, httpx2.AsyncByteStream):
    _http: ClassVar[Any] = httpx2


class PooledTransport2(TransportCore, httpx2.AsyncBaseTransport):
    """httpx2 transport over a started pool of Http2Adapter connections (see PooledTransport)."""

    _http: ClassVar[Any] = httpx2
    _stream_cls: ClassVar[type[ResponseStreamBase]] = _ResponseStream2

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        """Send ``request`` on a pooled stream. Raises httpx2 errors (see PooledTransport)."""
        response: httpx2.Response = await self._handle(request)
        return response

"""Pools for the exact WebSocket a framework opens: its URL and headers, the provider's knowledge.

A framework builds its URL and handshake headers itself (Pipecat's services, deepgram-sdk). The
pool must open that very socket, byte for byte, or the lookup by URL would hand a call a socket
with other parameters. :func:`exact_adapter` takes the provider adapter (Deepgram, ElevenLabs,
Cartesia: keepalive text, idle limits, goodbye) and pins its URL and headers to the framework's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from voicepool.adapter import Adapter, get_adapter

__all__ = ["exact_adapter"]

_exact_classes: dict[type[Any], type[Any]] = {}


def _exact_class(provider: type[Any]) -> type[Any]:
    cls = _exact_classes.get(provider)
    if cls is None:

        class Exact(provider):  # type: ignore[misc]
            _exact_url: str

            def __init__(self, options: Any, exact_url: str) -> None:
                # Set before the provider's constructor: it may read url() (the DNS watch).
                self._exact_url = exact_url
                super().__init__(options)

            def url(self) -> str:
                return self._exact_url

            def request_headers(self) -> list[tuple[str, str]]:
                # The framework's headers only (the provider would add its own auth and version).
                return [(k, v.get_secret_value()) for k, v in self.options.secret_headers.items()]

        Exact.__name__ = Exact.__qualname__ = provider.__name__
        cls = _exact_classes[provider] = Exact
    return cls


def exact_adapter(
    provider: str,
    url: str,
    headers: Mapping[str, str],
    *,
    raw: bool = True,
    **options: Any,
) -> Adapter[Any]:
    """A pool adapter for ``provider`` (``deepgram``, ``elevenlabs``, ``cartesia``) opening ``url``
    with ``headers`` (all treated as secrets: never logged). ``raw``: lend the plain
    ``websockets`` connection (RawWebSocketAdapter); otherwise the provider adapter itself, whose
    ``open_socket`` the aiohttp adapter does not use (see :mod:`voicepool.integrations.livekit`).
    ``options``: more endpoint options (``ca_file``, ``verify``, ``max_message_size``...).
    Raises ValueError for a URL that is not ws:// or wss://."""
    from voicepool.adapters.provider import RawWebSocketAdapter

    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.netloc:
        raise ValueError(f"not a WebSocket URL: {parts.scheme}://{parts.hostname}{parts.path}")
    base = get_adapter(provider)
    model = base.Options
    assert model is not None
    opts = model(url=f"{parts.scheme}://{parts.netloc}", secret_headers=dict(headers), **options)
    adapter = _exact_class(base)(opts, url)
    lent: Adapter[Any] = RawWebSocketAdapter(adapter) if raw else adapter
    return lent

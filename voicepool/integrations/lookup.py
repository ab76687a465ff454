"""`PoolIndex`: the pools of a worker, found by the URL a framework was about to open.

A framework does not ask for "the asr pool": it builds a URL from its own settings (model,
encoding, the pipeline's sample rate) and opens it. The index answers that URL with the pool built
for it, compared on a normalised key (scheme, host, default port, path, the query as a sorted
multiset), so parameter order and ``:443`` do not matter and any other difference does: a socket
opened for 8 kHz audio must not be handed to a 16 kHz call. When nothing matches, the caller opens
a fresh connection as it would have without voicepool, and the index logs a warning (once per
key) and counts ``voicepool.pool.miss``: a misconfiguration is visible, never silent.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from opentelemetry import metrics

from voicepool.lease import Lease
from voicepool.pool import Pool

__all__ = ["MISS_METRIC", "PoolIndex", "pool_url", "url_key"]

log = logging.getLogger("voicepool.integrations")

MISS_METRIC = "voicepool.pool.miss"
_DEFAULT_PORTS = {"ws": 80, "http": 80, "wss": 443, "https": 443}
_meter = metrics.get_meter("voicepool")
_misses = _meter.create_counter(
    MISS_METRIC, unit="{connection}", description="Connections a framework opened outside a pool."
)

UrlKey = tuple[str, str, int, str, tuple[tuple[str, str], ...]]
_STR_CACHE = 256  # exact URL strings remembered by PoolIndex.find


def url_key(url: object) -> UrlKey:
    """The comparison key of a URL (``str``, ``yarl.URL``, ``httpx.URL``...): scheme, host,
    port (the scheme's default when absent), path without a trailing ``/``, sorted query pairs.
    Raises ValueError for a URL without scheme or host."""
    parts = urlsplit(str(url))
    scheme = parts.scheme.lower()
    if not scheme or not parts.hostname:
        raise ValueError(f"not an absolute URL: {_safe(str(url))!r}")
    port = parts.port or _DEFAULT_PORTS.get(scheme, 0)
    query = tuple(sorted(parse_qsl(parts.query, keep_blank_values=True)))
    return (scheme, parts.hostname.lower(), port, parts.path.rstrip("/"), query)


def pool_url(pool: Pool[Any]) -> str:
    """The URL a pool's connections are opened to (raw and aiohttp WebSocket pools: the
    provider's full URL; HTTP/2 pools: the base URL). Raises TypeError for other adapters."""
    adapter: Any = pool.adapter
    provider = getattr(adapter, "provider", None)
    if provider is not None and hasattr(provider, "url"):  # RawWebSocketAdapter
        return str(provider.url())
    if hasattr(adapter, "url") and callable(adapter.url):  # websocket, aiohttp_websocket
        return str(adapter.url())
    options = getattr(adapter, "options", None)
    if options is not None and hasattr(options, "base_url"):  # http2
        return str(options.base_url)
    raise TypeError(f"pool {pool.name!r}: adapter {adapter!r} has no URL to look it up by")


def _safe(url: str) -> str:
    """A URL for logs: no query (it may carry a token), no user info."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class PoolIndex:
    """Pools by the URL they serve (see the module doc).

    ``index.add(pool)`` (or ``add(pool, url=...)``) files a pool under its URL; ``find(url)``
    returns the pool serving that URL or ``None``; a caller that found none and opens its own
    connection reports it with :meth:`miss`. ``misses`` counts them by framework. No I/O.
    """

    def __init__(self, pools: Iterable[Pool[Any]] = ()) -> None:
        self._by_key: dict[UrlKey, Pool[Any]] = {}
        # find() by the exact string, before parsing it: a framework opens the same few URLs
        # at every call start. Hits only, so bounded by the spellings of the pools' URLs.
        self._by_str: dict[str, Pool[Any]] = {}
        self._warned: set[UrlKey] = set()
        self.misses: Counter[str] = Counter()
        """Connections opened outside any pool, by framework name."""
        self.cold: Counter[str] = Counter()
        """Leases that found no idle connection (so waited for a handshake), by framework."""
        for pool in pools:
            self.add(pool)

    def add(self, pool: Pool[Any], *, url: str | None = None) -> Pool[Any]:
        """File ``pool`` under ``url`` (default: :func:`pool_url`). Raises ValueError when another
        pool already serves that URL (two pools for one URL would split the warm floor)."""
        key = url_key(url if url is not None else pool_url(pool))
        other = self._by_key.get(key)
        if other is not None and other is not pool:
            raise ValueError(
                f"pools {other.name!r} and {pool.name!r} serve the same URL {_safe(str(url))!r}"
            )
        self._by_key[key] = pool
        self._by_str.clear()
        return pool

    def find(self, url: object) -> Pool[Any] | None:
        """The pool serving ``url``, or None (no I/O; never raises for a relative URL)."""
        if type(url) is str:
            pool = self._by_str.get(url)
            if pool is not None:
                return pool
        try:
            pool = self._by_key.get(url_key(url))
        except ValueError:
            return None
        if pool is not None and type(url) is str and len(self._by_str) < _STR_CACHE:
            self._by_str[url] = pool
        return pool

    async def lease(self, url: object, framework: str) -> Lease[Any] | None:
        """A lease on the pool serving ``url``; None (after :meth:`miss`) when none does.

        Raises what ``pool.lease()`` raises (PoolExhausted, PoolUnavailable, PoolLoopError from
        another event loop). Cancellation-safe as ``pool.lease()`` is.
        """
        pool = self.find(url)
        if pool is None:
            self.miss(url, framework)
            return None
        if not pool.stats().idle:
            self.cold[framework] += 1
        return await pool.lease()

    def miss(self, url: object, framework: str) -> None:
        """Record a connection ``framework`` opens outside any pool: counted always, logged
        once per URL key with the closest pool's URL (the query, which may carry a token, never)."""
        self.misses[framework] += 1
        endpoint = _safe(str(url))
        _misses.add(1, {"voicepool.framework": framework, "server.address": endpoint})
        try:
            key = url_key(url)
        except ValueError:
            key = ("", endpoint, 0, "", ())
        if key in self._warned:
            return
        self._warned.add(key)
        near = [p.name for k, p in self._by_key.items() if k[:4] == key[:4]]
        hint = (
            f"; pool(s) {', '.join(near)} serve this endpoint with other parameters"
            " (model, encoding, sample rate...)"
            if near
            else "; no pool serves this endpoint"
        )
        log.warning(
            "voicepool.pool.miss: %s opened %s outside any pool%s", framework, endpoint, hint
        )

    def __len__(self) -> int:
        return len(self._by_key)

    def __repr__(self) -> str:
        names = ", ".join(p.name for p in self._by_key.values())
        return f"<PoolIndex {names or 'empty'} misses={sum(self.misses.values())}>"

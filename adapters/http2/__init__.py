"""HTTP/2 connection pool for LLM endpoints, on ``h2`` over asyncio TLS.

* :class:`Http2Adapter` (options: :class:`Http2Options`, also ``Http2Adapter.Options``): MULTIPLEXED
  pool connections whose leases are HTTP/2 streams, PING health, GOAWAY drain and replacement,
  RST_STREAM on cancellation.
* :class:`PooledTransport`: an ``httpx.AsyncBaseTransport`` on such a pool, for
  ``httpx.AsyncClient(transport=...)`` and so ``openai.AsyncOpenAI(http_client=...)``;
  ``PooledTransport2`` is the same for ``httpx2`` clients (``anthropic.AsyncAnthropic`` 2.x
  accepts only those; imported on first use).

The HTTP/2 decisions (slot map, event dispatch, GOAWAY drain, flow-control acks) are sans-I/O in
``protocol.py`` (:class:`~.protocol.H2Protocol` over ``h2``); ``connection.py`` runs it over an
asyncio stream and ``stream.py`` is what a request's task awaits.

Modules of this package import each other relatively: the repo folder ``adapters/`` is installed as
``voicepool.adapters``, which mypy cannot map, and a relative import resolves to the installed
name at run time (ruff's TID251 ban sees the folder name, hence the ``noqa``).
"""

from .adapter import Http2Adapter, Http2Options  # noqa: TID251
from .connection import H2Connection  # noqa: TID251
from .protocol import ConnectionClosed, H2Error, Origin, StreamRefused, StreamReset  # noqa: TID251
from .stream import H2Stream  # noqa: TID251
from .transport import PooledTransport  # noqa: TID251

Options = Http2Options


def __getattr__(name: str) -> object:
    # PooledTransport2 needs httpx2 (shipped with the OpenAI/Anthropic SDKs): import it on demand.
    if name == "PooledTransport2":
        from .transport_httpx2 import PooledTransport2  # noqa: TID251

        return PooledTransport2
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ConnectionClosed",
    "H2Connection",
    "H2Error",
    "H2Stream",
    "Http2Adapter",
    "Http2Options",
    "Options",
    "Origin",
    "PooledTransport",
    "PooledTransport2",
    "StreamRefused",
    "StreamReset",
]

"""The one exception tree of voicepool.

Every error voicepool raises derives from :class:`VoicepoolError`; where an error behaves like a
stdlib error it also derives from that type, so ``except TimeoutError`` keeps working::

    VoicepoolError
    ├── PoolError                       a pool refused or failed a request
    │   ├── PoolExhausted (TimeoutError)    no connection became free within the acquire timeout
    │   ├── PoolUnavailable                 the circuit is open: the provider is failing
    │   ├── PoolClosed                      the pool is closing or closed
    │   └── PoolLoopError (RuntimeError)    the pool is used from another event loop
    ├── ConnectError (ConnectionError)  opening a connection failed (cause chained)
    ├── LeaseReleased (RuntimeError)    a lease was used after it was released
    ├── AdapterNotFound (LookupError)   no adapter registered under that name
    └── ConfigError (ValueError)        settings are invalid (names the field path)

Vendor errors (``websockets``, ``aiohttp``, ``h2``, ``pjsua2``) are translated at the adapter
boundary and chained as ``__cause__``; nothing in this tree carries a secret in its message.
"""

from __future__ import annotations

__all__ = [
    "AdapterNotFound",
    "ConfigError",
    "ConnectError",
    "LeaseReleased",
    "PoolClosed",
    "PoolError",
    "PoolExhausted",
    "PoolLoopError",
    "PoolUnavailable",
    "VoicepoolError",
]


class VoicepoolError(Exception):
    """Root of every exception voicepool raises."""


class PoolError(VoicepoolError):
    """A pool refused or failed a request. ``pool`` names the pool."""

    def __init__(self, message: str, *, pool: str = "") -> None:
        super().__init__(message)
        self.pool = pool


class PoolExhausted(PoolError, TimeoutError):
    """No connection became free within the acquire timeout.

    The message gives size / in use / idle / waiters; ``__cause__`` is the last connect error, if
    any, so a pool that is slow because its provider is failing says so.
    """


class PoolUnavailable(PoolError):
    """The pool's circuit is open (or it could not open a single connection at start).

    Raised at once, without waiting, so a dead provider costs a call microseconds. ``__cause__`` is
    the connect error that opened the circuit.
    """


class PoolClosed(PoolError):
    """The pool is closing or closed and lends nothing more."""


class PoolLoopError(PoolError, RuntimeError):
    """The pool was used from an event loop other than the one it was started on.

    A pool's connections, futures and timer belong to one loop: build one pool per loop. The
    message names the pool and both loops.
    """


class ConnectError(VoicepoolError, ConnectionError):
    """Opening a connection failed. ``fatal`` is true when retrying cannot help (bad key, bad cert).

    ``status`` carries a protocol status where there is one (HTTP 401, SIP 403, ...).
    """

    def __init__(self, message: str, *, fatal: bool = False, status: int | None = None) -> None:
        super().__init__(message)
        self.fatal = fatal
        self.status = status


class LeaseReleased(VoicepoolError, RuntimeError):
    """A lease (or its connection) was used after the ``async with`` block released it."""


class AdapterNotFound(VoicepoolError, LookupError):
    """No adapter is registered under that name; the message lists the registered ones."""


class ConfigError(VoicepoolError, ValueError):
    """Settings are invalid. The message names the field path (``pools.asr.max_size``)."""

"""The :class:`Adapter` base class, :class:`LeaseMode`, and the adapter registry.

An adapter teaches a :class:`~voicepool.Pool` how to open, check, reset and close one kind of
connection. The pool owns every decision about *when*; the adapter only does *how*.

Adapters are found by name, either registered in-process with :func:`register_adapter` or
advertised by an installed distribution under the entry-point group ``voicepool.adapters``
(the built-in adapters are found this way, so the core never imports ``voicepool.adapters``).
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from voicepool.errors import AdapterNotFound, ConnectError

if TYPE_CHECKING:
    from pydantic import BaseModel

__all__ = [
    "ENTRY_POINT_GROUP",
    "Adapter",
    "LeaseMode",
    "get_adapter",
    "register_adapter",
    "registered_adapters",
]

C = TypeVar("C")
A = TypeVar("A", bound="type[Adapter[Any]]")

ENTRY_POINT_GROUP = "voicepool.adapters"


class LeaseMode(enum.Enum):
    """How leases share a connection."""

    EXCLUSIVE = "exclusive"
    """One holder at a time; ``reset()`` after a clean release, then back to idle (LIFO)."""
    SINGLE_USE = "single_use"
    """One holder, closed after release; the pool keeps ``min_size`` spares pre-opened."""
    MULTIPLEXED = "multiplexed"
    """Up to ``max_streams`` holders share one connection (HTTP/2 streams, TTS contexts)."""


class Adapter(Generic[C]):
    """Base class of every adapter. Subclass it, override :meth:`connect` and :meth:`close`.

    Class attributes declare the pool-facing behaviour: ``lease_mode``, ``max_streams`` (capacity
    of one connection in MULTIPLEXED mode), ``max_idle`` (seconds after which the provider closes an
    idle connection; the pool pings sooner than that).

    ``Options`` may name a pydantic model of the adapter's own settings (url, headers, ...);
    :class:`voicepool.VoicePoolSettings` validates a pool entry's options with it and passes the
    validated model to the constructor as ``options``.
    """

    # Class-level defaults that an instance may override from its options (e.g. max_streams).
    lease_mode: LeaseMode = LeaseMode.EXCLUSIVE
    max_streams: int = 1
    max_idle: float | None = None
    use_proves_liveness: ClassVar[bool] = True
    """A finished lease shows the connection alive (it carried traffic), so the idle ping waits
    ``ping_interval`` after the last use. False when a lease does no I/O over the connection
    (a SIP registration): the ping then keeps its period however often it is leased."""
    Options: ClassVar[type[BaseModel] | None] = None
    max_connections_per_process: ClassVar[int | None] = None
    """A hard process-wide limit (pjsua2: 8 SIP accounts); settings reject pools that exceed it."""
    service: ClassVar[str | None] = None
    """What the connections are for ("asr", "tts", "llm", "rest", "sip"): a PoolGroup may mix
    adapters of one service (ElevenLabs with a Cartesia fallback); None: only the same adapter."""

    _watchers: list[Callable[[Any], None]] | None = None

    @classmethod
    def from_options(cls, options: BaseModel | None) -> Adapter[Any]:
        """Build the adapter from its validated ``Options`` model (what the settings layer calls).

        Adapters that declare ``Options`` take that model as their first constructor argument;
        adapters without options are built with no arguments.
        """
        if cls.Options is None or options is None:
            return cls()
        return cls(options)  # type: ignore[call-arg]

    @classmethod
    def _build_options(cls, options: Any, kwargs: dict[str, Any]) -> Any:
        """The validated ``Options`` model for a constructor that takes a model or keywords.

        ``options`` may be ``None`` (build from ``kwargs``), an instance of ``cls.Options`` (kept
        as is), another model or a mapping (validated into ``cls.Options``). Raises TypeError when
        both a model and keywords are given, pydantic's ValidationError on bad values.
        """
        model = cls.Options
        if model is None:
            raise TypeError(f"{cls.__name__} takes no options")
        if options is None:
            return model(**kwargs)
        if kwargs:
            raise TypeError(
                f"pass either a {model.__name__} or keyword options to {cls.__name__}, not both"
            )
        if isinstance(options, model):
            return options
        data = options.model_dump() if hasattr(options, "model_dump") else options
        return model.model_validate(data)

    async def connect(self) -> C:
        """Open and return one ready connection (handshakes done).

        Raise on failure; a :class:`~voicepool.ConnectError` with ``fatal=True`` (or an error
        :meth:`is_fatal` accepts) opens the pool's circuit at once. The pool applies
        ``connect_timeout`` and may cancel this coroutine: leave nothing half-open when cancelled.
        """
        raise NotImplementedError

    async def ping(self, conn: C) -> None:
        """Check health and keep the connection alive (provider keepalive). Raise on failure.

        Called out of band on idle connections only (and on multiplexed ones with no stream open),
        under ``ping_timeout``; the default does nothing.
        """

    def is_open(self, conn: C) -> bool:
        """Whether the connection still looks usable, without I/O (called on the acquire path)."""
        return True

    async def reset(self, conn: C) -> None:
        """Make an EXCLUSIVE connection clean for the next holder. Raise to discard it instead.

        Runs in the releasing caller's ``async with`` exit. A reset that completes without
        suspending costs no task and no timer; one that suspends finishes under
        ``connect_timeout`` (cancelled after it: the connection is then discarded). Do not
        override it when there is nothing to clean: this base no-op is never called at all.
        """

    async def close(self, conn: C) -> None:
        """Close politely (CloseStream, close_socket, un-REGISTER). Runs in the background."""

    def is_fatal(self, exc: BaseException) -> bool:
        """Whether a connect error cannot be cured by retrying (401/403, bad certificate)."""
        return isinstance(exc, ConnectError) and exc.fatal

    # -- MULTIPLEXED only -----------------------------------------------------------------------

    def stream_capacity(self, conn: C) -> int:
        """How many streams this connection takes now (e.g. the server's MAX_CONCURRENT_STREAMS).

        0 means draining (GOAWAY): no new streams, close once the last one ends. No I/O.
        """
        return self.max_streams

    async def release_stream(self, conn: C, stream_id: int, error: BaseException | None) -> bool:
        """End one stream (close its TTS context, reset its HTTP/2 stream).

        ``error`` is the exception that left the lease's block, or a :class:`~voicepool.errors.
        VoicepoolError` describing ``lease.discard(reason)``. Return False when the shared
        connection itself must be discarded; the default keeps it while :meth:`is_open` holds.
        Free local stream state before the first await: if the releasing task is cancelled, the
        pool keeps the connection while :meth:`is_open` holds and does not call again.
        """
        return self.is_open(conn)

    # -- why a connection ended (read by the pool when it retires one) ----------------------------

    def close_reason(self, conn: C) -> str | None:
        """Why ``conn`` stopped taking leases, as the peer said it (``"goaway"``: HTTP/2 GOAWAY;
        ``"rejected"``: credentials refused on it), or None to let the pool name it (expired,
        remote_closed). The pool uses it as the close reason in ``stats().closed``. No I/O.
        """
        return None

    def connection_error(self, conn: C) -> BaseException | None:
        """The error that ended or drained ``conn`` (a protocol error, a GOAWAY with an error
        code, a 401 on a request), or None. The pool records it as its ``last_error`` when it
        retires ``conn``, and treats it as a failed connect (circuit open at once) when
        :meth:`is_fatal` accepts it: this is how a request-path failure that no retry can cure
        reaches the pool, once. No I/O.
        """
        return None

    # -- notifications to the pool ----------------------------------------------------------------

    def connection_changed(self, conn: C) -> None:
        """Tell the owning pool that ``conn`` changed (closed by the peer, GOAWAY, new capacity).

        Adapters call this from their reader tasks so the pool reacts at once instead of at the
        next health tick. Safe to call from the event loop thread only; never raises.
        """
        for watch in self._watchers or ():
            watch(conn)

    def watch(self, callback: Callable[[Any], None]) -> None:
        """Register a callback for :meth:`connection_changed` (pools do this)."""
        if self._watchers is None:
            self._watchers = []
        self._watchers.append(callback)

    def unwatch(self, callback: Callable[[Any], None]) -> None:
        """Remove a callback registered with :meth:`watch`; unknown callbacks are ignored."""
        if self._watchers and callback in self._watchers:
            self._watchers.remove(callback)

    def describe(self) -> str:
        """A short, secret-free description for logs and errors (e.g. the endpoint host)."""
        return type(self).__name__


_registry: dict[str, type[Adapter[Any]]] = {}
_registry_lock = threading.Lock()


def register_adapter(name: str) -> Callable[[A], A]:
    """Class decorator: register an :class:`Adapter` subclass under ``name``.

    Raises ValueError if another class already holds the name (re-registering the same class, as
    happens on module reload, is allowed).
    """

    def decorate(cls: A) -> A:
        if not (isinstance(cls, type) and issubclass(cls, Adapter)):
            raise TypeError(f"@register_adapter({name!r}) needs an Adapter subclass, got {cls!r}")
        with _registry_lock:
            existing = _registry.get(name)
            if existing is not None and existing.__qualname__ != cls.__qualname__:
                raise ValueError(f"adapter name {name!r} is already registered by {existing!r}")
            _registry[name] = cls
        return cls

    return decorate


def get_adapter(name: str) -> type[Adapter[Any]]:
    """Return the adapter class registered under ``name`` (decorator or entry point).

    Entry points are loaded one by one, on first use, so a broken optional adapter (``sip``
    without pjsua2) never hides the others. Raises :class:`~voicepool.AdapterNotFound` listing the
    registered names, or naming the import failure of an installed one.
    """
    cls = _registry.get(name)
    if cls is not None:
        return cls
    for ep in entry_points(group=ENTRY_POINT_GROUP, name=name):
        try:
            loaded = ep.load()
        except Exception as exc:  # ImportError, or a module without the advertised class
            raise AdapterNotFound(
                f"adapter {name!r} is installed ({ep.value}) but cannot be imported: {exc}"
            ) from exc
        if not (isinstance(loaded, type) and issubclass(loaded, Adapter)):
            raise AdapterNotFound(f"entry point {name!r} ({ep.value}) is not an Adapter subclass")
        with _registry_lock:
            return _registry.setdefault(name, loaded)
    known = ", ".join(registered_adapters()) or "none"
    raise AdapterNotFound(f"no adapter named {name!r}; registered adapters: {known}")


def registered_adapters() -> list[str]:
    """Names of every adapter known now: decorator registrations and entry points."""
    with _registry_lock:
        names = set(_registry)
    names.update(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    return sorted(names)

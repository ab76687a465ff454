"""One DNS cache for every adapter of an event loop: TTLs honoured, refreshed in the background,
happy eyeballs across the answers, and word when an address leaves DNS.

A cold connection costs DNS + TCP + TLS; voicepool keeps the last two warm, and this module takes
the first off the connect path too::

    resolver = voicepool.dns.default_resolver()     # one per event loop, shared by all adapters
    sock = await resolver.connect("api.example", 443)  # happy eyeballs over the cached answers

* **Cache.** Answers are kept for their record TTL (clamped to ``[min_ttl, max_ttl]``; hosts-file
  answers, which carry no TTL, get ``default_ttl``). Concurrent lookups of one name make one query:
  booting 8 connections to one host costs one lookup.
* **Background refresh.** A name that a live connection still uses (:meth:`Resolver.watch`) is
  looked up again at ``refresh_at`` of its TTL, off the connect path, so a refill after a loss
  finds a fresh answer and pays no lookup. A failed refresh keeps the old answer (stale beats
  nothing while a resolver hiccups) and retries at the next refresh.
* **Happy eyeballs** (RFC 8305, with ``aiohappyeyeballs``, which aiohttp uses): the addresses are
  interleaved by family and tried ``happy_eyeballs_delay`` apart, first to connect wins.
* **Addresses that leave DNS.** A refresh whose answer lacks an address calls every watcher of
  the name with the addresses still listed; adapters use :class:`AddressTracker` to mark the
  connections to a removed address closed (``is_open`` false) and tell their pool
  (``connection_changed``), which retires each at its next idle moment, never under a lease.

The lookups themselves: ``aiodns`` (c-ares through ``pycares``, which reports TTLs) when it is
installed and works here, else the loop's ``getaddrinfo`` (no TTLs: ``default_ttl``). Tests and
applications inject their own with ``Resolver(lookup=...)`` and :func:`set_default_resolver`.
IP literals never reach the lookup.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import aiohappyeyeballs

from voicepool._redact import get_logger

__all__ = [
    "AddressTracker",
    "Answer",
    "Lookup",
    "Resolver",
    "aiodns_lookup",
    "default_resolver",
    "set_default_resolver",
    "system_lookup",
]

log = get_logger("voicepool.dns")


class Answer(NamedTuple):
    """One address of a name, with how long it may be used (seconds)."""

    family: socket.AddressFamily
    address: str
    ttl: float


Lookup = Callable[[str], Awaitable[list[Answer]]]
"""What the resolver calls to look a name up (the seam): host -> answers, raising OSError."""

_NO_TTL = -1.0  # the answer came without a TTL (hosts file, getaddrinfo)


def aiodns_lookup(nameservers: Iterable[str] | None = None, **channel: Any) -> Lookup:
    """A :data:`Lookup` on ``aiodns`` (c-ares), which reports each record's TTL: A and AAAA
    answers of the system's resolvers, or of ``nameservers`` (``channel`` options go to
    ``pycares.Channel``: ``udp_port``, ``lookups``, ``timeout``, ...). Raises ImportError when
    aiodns is missing; the lookup raises ``socket.gaierror`` when a name does not resolve."""
    import aiodns

    servers = list(nameservers or [])

    async def lookup(host: str) -> list[Answer]:
        # A channel per lookup: lookups are rare (one per name and TTL), and a channel left to
        # the garbage collector at interpreter exit complains.
        async with aiodns.DNSResolver(servers or None, **channel) as resolver:
            try:
                result = await resolver.getaddrinfo(
                    host, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM
                )
            except aiodns.error.DNSError as exc:  # not an OSError: say it as one
                raise socket.gaierror(socket.EAI_NONAME, f"{host}: {exc}") from None
        answers = []
        for node in result.nodes:
            ip = node.addr[0]
            ip = ip.decode() if isinstance(ip, bytes) else str(ip)
            # c-ares reports ttl 0 for hosts-file answers: they carry none.
            answers.append(Answer(socket.AddressFamily(node.family), ip, node.ttl or _NO_TTL))
        return _unique(answers)

    return lookup


_system: Lookup | None = None


async def system_lookup(host: str) -> list[Answer]:
    """The default :data:`Lookup`: :func:`aiodns_lookup` on the system's resolvers when aiodns
    works here, else the loop's ``getaddrinfo`` (no TTLs). Raises ``socket.gaierror``."""
    global _system
    if _system is None:
        try:
            _system = aiodns_lookup()
        except ImportError:
            _system = _getaddrinfo_lookup
    try:
        return await _system(host)
    except socket.gaierror:
        raise
    except Exception:  # no c-ares channel here (e.g. no inotify watches): getaddrinfo it is
        _system = _getaddrinfo_lookup
        return await _system(host)


async def _getaddrinfo_lookup(host: str) -> list[Answer]:
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, None, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM
    )
    return _unique(Answer(info[0], str(info[4][0]), _NO_TTL) for info in infos)


def _unique(answers: Iterable[Answer]) -> list[Answer]:
    seen: dict[str, Answer] = {}
    for answer in answers:
        seen.setdefault(answer.address, answer)
    return list(seen.values())


def _literal(host: str) -> list[Answer] | None:
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    return [Answer(family, str(ip), float("inf"))]


@dataclass
class _Entry:
    answers: list[Answer]
    expires: float
    refresh_at: float
    fetched: float
    watchers: list[Callable[[frozenset[str]], None]] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


class Resolver:
    """The DNS cache of one event loop (see the module docstring). Use :func:`default_resolver`
    unless a test or an application needs its own ``lookup``.

    ``lookups`` counts the queries made (the rest were cache hits). Not thread-safe: one event
    loop. Raises ``OSError`` (``socket.gaierror``) when a name does not resolve.
    """

    def __init__(
        self,
        lookup: Lookup | None = None,
        *,
        min_ttl: float = 5.0,
        max_ttl: float = 3600.0,
        default_ttl: float = 60.0,
        refresh_at: float = 0.75,
        happy_eyeballs_delay: float = 0.25,
        interleave: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lookup = lookup or system_lookup
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self.default_ttl = default_ttl
        self.refresh_at = refresh_at
        self.happy_eyeballs_delay = happy_eyeballs_delay
        self.interleave = interleave
        self._clock = clock
        self._cache: dict[str, _Entry] = {}
        self._inflight: dict[str, asyncio.Future[list[Answer]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.lookups = 0
        self.lookups_by_host: dict[str, int] = {}
        self.refresh_failures = 0

    # -- lookups -------------------------------------------------------------------------------

    async def resolve(self, host: str, *, max_age: float | None = None) -> list[Answer]:
        """The addresses of ``host``: from the cache while fresh (and younger than ``max_age``
        when given), else one lookup shared by every concurrent caller. Cancelling a caller does
        not cancel the lookup others wait for. Raises OSError when the name does not resolve."""
        literal = _literal(host)
        if literal is not None:
            return literal
        entry = self._cache.get(host)
        now = self._clock()
        if (
            entry is not None
            and now < entry.expires
            and (max_age is None or now - entry.fetched <= max_age)
        ):
            return entry.answers
        return await asyncio.shield(self._query(host))

    def _query(self, host: str) -> asyncio.Future[list[Answer]]:
        pending = self._inflight.get(host)
        if pending is not None:
            return pending
        fut = asyncio.ensure_future(self._fetch(host))
        self._inflight[host] = fut
        fut.add_done_callback(lambda f: self._inflight.pop(host, None))
        return fut

    async def _fetch(self, host: str) -> list[Answer]:
        self.lookups += 1
        self.lookups_by_host[host] = self.lookups_by_host.get(host, 0) + 1
        answers = await self._lookup(host)
        if not answers:
            raise socket.gaierror(socket.EAI_NONAME, f"{host}: no addresses")
        self._store(host, answers)
        return answers

    def _store(self, host: str, answers: list[Answer]) -> None:
        ttls = [a.ttl for a in answers if a.ttl >= 0]
        ttl = min(ttls) if ttls else self.default_ttl
        ttl = min(self.max_ttl, max(self.min_ttl, ttl))
        now = self._clock()
        old = self._cache.get(host)
        entry = _Entry(answers, now + ttl, now + ttl * self.refresh_at, now)
        if old is not None:
            entry.watchers = old.watchers
            if old.timer is not None:
                old.timer.cancel()
        self._cache[host] = entry
        if entry.watchers:
            self._arm(host, entry)
        if old is not None:
            removed = {a.address for a in old.answers} - {a.address for a in answers}
            if removed:
                log.info("dns: %s no longer lists %s", host, ", ".join(sorted(removed)))
                listed = frozenset(a.address for a in answers)
                for watcher in list(entry.watchers):
                    try:
                        watcher(listed)
                    except Exception:  # one adapter's bug must not stop the others hearing it
                        log.exception("dns: a watcher of %s failed", host)

    # -- background refresh --------------------------------------------------------------------

    def _arm(self, host: str, entry: _Entry) -> None:
        if entry.timer is not None:
            entry.timer.cancel()
        loop = asyncio.get_running_loop()
        delay = max(0.0, entry.refresh_at - self._clock())
        entry.timer = loop.call_later(delay, self._refresh_due, host)

    def _refresh_due(self, host: str) -> None:
        entry = self._cache.get(host)
        if entry is None or not entry.watchers:
            return
        entry.timer = None
        task = asyncio.get_running_loop().create_task(
            self._refresh(host), name=f"voicepool:dns:{host}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refresh(self, host: str) -> None:
        try:
            await self._query(host)
        except Exception as exc:
            # Keep the old answer (a resolver hiccup must not cost the warm connections) and
            # try again at the next refresh.
            self.refresh_failures += 1
            log.warning("dns: refreshing %s failed: %s; keeping the last answer", host, exc)
            entry = self._cache.get(host)
            if entry is not None and entry.watchers:
                now = self._clock()
                ttl = max(self.min_ttl, (entry.expires - entry.fetched) * (1 - self.refresh_at))
                entry.expires = max(entry.expires, now + ttl)
                entry.refresh_at = now + ttl * self.refresh_at
                self._arm(host, entry)

    async def refresh(self, host: str) -> list[Answer]:
        """Look ``host`` up now (watchers hear of removed addresses). Raises OSError."""
        return await asyncio.shield(self._query(host))

    def watch(self, host: str, callback: Callable[[frozenset[str]], None]) -> Callable[[], None]:
        """Keep ``host`` refreshed in the background while watched; ``callback(listed)`` runs
        when a refresh drops an address. Returns the function that stops watching. The name
        must have been resolved first (call after :meth:`resolve`)."""
        entry = self._cache.get(host)
        if entry is None:  # an IP literal, or never resolved: nothing to refresh
            return _nothing
        entry.watchers.append(callback)
        if entry.timer is None:
            self._arm(host, entry)

        def stop() -> None:
            current = self._cache.get(host)
            if current is not None and callback in current.watchers:
                current.watchers.remove(callback)
                if not current.watchers and current.timer is not None:
                    current.timer.cancel()
                    current.timer = None

        return stop

    def listed(self, host: str) -> frozenset[str] | None:
        """The addresses the cache holds for ``host`` now (None: not cached). No I/O."""
        entry = self._cache.get(host)
        return None if entry is None else frozenset(a.address for a in entry.answers)

    # -- connecting ----------------------------------------------------------------------------

    async def connect(self, host: str, port: int, *, max_age: float | None = None) -> socket.socket:
        """A connected, non-blocking TCP socket to ``host``: the cached addresses, interleaved by
        family, tried ``happy_eyeballs_delay`` apart (first to connect wins, the others are
        closed). Raises OSError (the name, or every address, failed). Cancellation-safe: a
        cancelled connect closes every socket it opened."""
        answers = await self.resolve(host, max_age=max_age)
        infos: list[Any] = []
        for answer in answers:
            sockaddr: tuple[Any, ...] = (answer.address, port)
            if answer.family == socket.AF_INET6:
                sockaddr = (answer.address, port, 0, 0)
            infos.append((answer.family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr))
        return await aiohappyeyeballs.start_connection(
            infos, happy_eyeballs_delay=self.happy_eyeballs_delay, interleave=self.interleave
        )

    async def aclose(self) -> None:
        """Stop every background refresh (the cache stays usable)."""
        for entry in self._cache.values():
            if entry.timer is not None:
                entry.timer.cancel()
                entry.timer = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _nothing() -> None:
    pass


_defaults: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Resolver] = (
    weakref.WeakKeyDictionary()
)


def default_resolver() -> Resolver:
    """The resolver every built-in adapter uses on the running event loop (made on first use)."""
    loop = asyncio.get_running_loop()
    resolver = _defaults.get(loop)
    if resolver is None:
        resolver = _defaults[loop] = Resolver()
    return resolver


def set_default_resolver(resolver: Resolver | None) -> None:
    """Make ``resolver`` the running loop's default (None: back to a fresh system resolver)."""
    loop = asyncio.get_running_loop()
    if resolver is None:
        _defaults.pop(loop, None)
    else:
        _defaults[loop] = resolver


class AddressTracker:
    """Which connection of an adapter went to which address; retires those whose address left
    DNS. One per adapter and host. ``is_listed(conn)`` is a set lookup (the acquire path)."""

    def __init__(self, adapter: Any, host: str) -> None:
        self._adapter = adapter
        self._host = host
        self._peers: dict[int, tuple[Any, str]] = {}
        self._stale: set[int] = set()
        self._stop: Callable[[], None] | None = None

    def add(self, conn: Any, peer: Any, resolver: Resolver) -> None:
        """Remember ``conn`` went to ``peer`` (a peername tuple, or an IP string)."""
        ip = peer[0] if isinstance(peer, tuple) else peer
        if not isinstance(ip, str) or _literal(self._host) is not None:
            return  # an IP literal host never leaves DNS
        self._peers[id(conn)] = (conn, ip)
        if self._stop is None:
            self._stop = resolver.watch(self._host, self._on_listed)

    def rebind(self, old: Any, new: Any) -> None:
        """``new`` (a wrapper the pool holds) stands for ``old`` from now on."""
        found = self._peers.pop(id(old), None)
        if found is not None:
            self._peers[id(new)] = (new, found[1])

    def discard(self, conn: Any) -> None:
        """Forget ``conn`` (the adapter closed it); stop watching once none is left."""
        self._peers.pop(id(conn), None)
        self._stale.discard(id(conn))
        if not self._peers and self._stop is not None:
            self._stop()
            self._stop = None

    def is_listed(self, conn: Any) -> bool:
        """False once ``conn``'s address left DNS. No I/O."""
        return id(conn) not in self._stale

    def _on_listed(self, listed: frozenset[str]) -> None:
        for key, (conn, ip) in list(self._peers.items()):
            if ip not in listed and key not in self._stale:
                self._stale.add(key)
                with contextlib.suppress(Exception):
                    self._adapter.connection_changed(conn)

"""LiveKit Agents on voicepool pools (extra ``voicepool[livekit]``, livekit-agents 1.8.9).

Every LiveKit plugin takes ``http_session: aiohttp.ClientSession`` and opens its WebSockets with
``session.ws_connect(url, headers=...)``. :class:`PooledSession` is that session: a ``ws_connect``
to a URL a pool serves returns a leased, already open ``aiohttp.ClientWebSocketResponse`` whose
``close()`` releases the lease (the socket is single-use: closed politely, a warm spare takes its
place); any other URL, and every other method (``post``, ``get``...), goes to a real
``aiohttp.ClientSession``, and a ``ws_connect`` no pool serves is logged and counted
(``voicepool.pool.miss``).

LiveKit runs one job per process (or per thread, each with its own event loop), so the pools are
the job's: :func:`start_job_pools` reads each plugin's URL from the plugin itself (its own
settings), builds the pools, and starts them concurrently with ``ctx.connect()``, so the handshakes
overlap the room join instead of the first turn; it registers their close as a shutdown callback of
the JobContext (the entrypoint returns while the AgentSession runs on). What a per-job pool
buys: no handshake on the first turn, health checks and replacement of a dead socket before a turn
needs it, bounded streams and contexts, the circuit (a down provider fails a turn in microseconds),
telemetry. What it cannot do: share warm sockets across jobs (each job process pays its own
handshakes, during the room join), or be started in ``prewarm_fnc``, which runs before the job's
event loop exists: a pool belongs to the loop it was started on, and a lease from another loop
raises :class:`~voicepool.PoolLoopError` at once instead of hanging.

::

    async def entrypoint(ctx: JobContext):
        session = PooledSession()
        stt = deepgram.STT(http_session=session)
        tts = elevenlabs.TTS(http_session=session)
        pools = await start_job_pools(ctx, session, stt, tts, llm=Http2Adapter(...))
        llm = openai.LLM(client=voicepool.integrations.openai.client(pools.llm))
        await AgentSession(stt=stt, llm=llm, tts=tts).start(room=ctx.room, agent=...)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from voicepool.adapter import Adapter
from voicepool.integrations._sockets import exact_adapter
from voicepool.integrations.lookup import PoolIndex
from voicepool.lease import Lease
from voicepool.manager import PoolManager
from voicepool.pool import Pool
from voicepool.pool_settings import PoolSettings

__all__ = ["JobPools", "PooledSession", "job_pools", "socket_adapter", "start_job_pools"]

FRAMEWORK = "livekit"
_PROVIDERS = ("deepgram", "elevenlabs", "cartesia")


class _Discovering(aiohttp.ClientConnectionError):
    """Raised to a plugin whose ws_connect was only asked for its URL (see :func:`discover`)."""


class PooledSession:
    """An ``aiohttp.ClientSession`` stand-in whose ``ws_connect`` lends pooled sockets.

    ``index``: the pools by URL (default: a new, empty :class:`PoolIndex`; :func:`job_pools`
    fills it). ``session``: the real session for everything else (default: one created on first
    use, closed by :meth:`close`). Cancellation-safe as ``pool.lease()`` is.
    """

    def __init__(
        self, index: PoolIndex | None = None, session: aiohttp.ClientSession | None = None
    ) -> None:
        self.index = index if index is not None else PoolIndex()
        self._session = session
        self._own_session = session is None
        self._captured: list[tuple[str, dict[str, str]]] | None = None
        self._capture_event = asyncio.Event()

    @property
    def session(self) -> aiohttp.ClientSession:
        """The real session (created on first use, in the running loop)."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)

    @property
    def closed(self) -> bool:
        return self._session is None or self._session.closed

    async def ws_connect(self, url: Any, **kwargs: Any) -> aiohttp.ClientWebSocketResponse:
        """A leased socket when a pool serves ``url`` (the plugin's ``headers``, ``heartbeat``...
        were fixed when the pool was built), else the real session's ``ws_connect``. Raises
        what ``pool.lease()`` raises (PoolExhausted, PoolUnavailable, PoolLoopError)."""
        if self._captured is not None:
            self._captured.append((str(url), dict(kwargs.get("headers") or {})))
            self._capture_event.set()
            raise _Discovering("voicepool: asked for this socket's URL only")
        lease = await self.index.lease(url, FRAMEWORK)
        if lease is None:
            fresh: aiohttp.ClientWebSocketResponse = await self.session.ws_connect(url, **kwargs)
            return fresh
        return _lend(lease)

    async def close(self) -> None:
        """Close the real session if this object created it (pools are closed by their owner)."""
        if self._own_session and self._session is not None:
            await self._session.close()

    @contextlib.asynccontextmanager
    async def _capture(self) -> AsyncIterator[list[tuple[str, dict[str, str]]]]:
        self._captured = []
        self._capture_event.clear()
        try:
            yield self._captured
        finally:
            self._captured = None


def _lend(lease: Lease[Any]) -> aiohttp.ClientWebSocketResponse:
    """The leased socket, whose ``close()`` releases the lease (once) instead of closing it: the
    pool then closes it politely (the provider's goodbye) as a single-use socket."""
    ws: aiohttp.ClientWebSocketResponse = lease.conn

    async def close(*, code: int = 1000, message: bytes = b"") -> bool:
        del ws.close  # the pool's own close must reach aiohttp's
        await lease.release()
        return True

    ws.close = close  # type: ignore[method-assign]
    return ws


def socket_adapter(
    provider: str, url: str, headers: Mapping[str, str], **options: Any
) -> Adapter[Any]:
    """An ``aiohttp_websocket`` pool adapter opening exactly ``url`` with ``headers``, with
    ``provider``'s knowledge (keepalive, idle limits, goodbye). ``options``: endpoint options
    (``ca_file``, ``verify``...)."""
    from voicepool.adapters.aiohttp_websocket import AiohttpWebSocketAdapter

    endpoint: Any = exact_adapter(provider, url, headers, raw=False, **options)
    adapter: Adapter[Any] = AiohttpWebSocketAdapter(provider=provider, endpoint=endpoint.options)
    adapter.endpoint = endpoint  # type: ignore[attr-defined]  # the exact URL and headers
    adapter.max_idle = endpoint.max_idle
    return adapter


def _provider_of(plugin: Any) -> str:
    module = type(plugin).__module__
    for name in _PROVIDERS:
        if f".{name}" in module:
            return name
    raise TypeError(f"{type(plugin).__name__}: not a Deepgram, ElevenLabs or Cartesia plugin")


async def discover(
    session: PooledSession, plugin: Any, timeout: float = 5.0
) -> tuple[str, dict[str, str]]:
    """The (URL, headers) ``plugin`` opens, read from the plugin itself: its STT stream or its
    TTS ``prewarm()`` is started with ``session`` in capture mode, its ``ws_connect`` recorded
    and refused (no network), and the stream closed. Raises TimeoutError if it never connects."""
    from livekit.agents import stt as lk_stt

    async with session._capture() as captured:
        stream = None
        if isinstance(plugin, lk_stt.STT):
            stream = plugin.stream()
        else:
            plugin.prewarm()
        try:
            async with asyncio.timeout(timeout):
                await session._capture_event.wait()
        finally:
            if stream is not None:
                with contextlib.suppress(Exception):
                    await stream.aclose()
        return captured[0]


@dataclass
class JobPools:
    """What :func:`start_job_pools` returns: the job's manager, its index, the LLM pool if any,
    the socket pools by name, and the :class:`PooledSession` they serve."""

    manager: PoolManager
    index: PoolIndex
    llm: Pool[Any] | None = None
    sockets: dict[str, Pool[Any]] = field(default_factory=dict)
    session: PooledSession | None = None
    plugins: tuple[Any, ...] = ()

    async def aclose(self) -> None:
        """Close the job's plugins (a TTS plugin keeps its socket for the next turn until its
        ``aclose()``: that releases the lease), then the pools (leases drain first, see
        PoolManager.aclose) and the session's own aiohttp session. Idempotent."""
        try:
            for plugin in self.plugins:
                await plugin.aclose()
        finally:
            try:
                await self.manager.aclose()
            finally:
                if self.session is not None:
                    await self.session.close()


async def start_job_pools(
    ctx: Any,
    session: PooledSession,
    *plugins: Any,
    llm: Adapter[Any] | None = None,
    concurrency: int = 1,
    ca_file: str | None = None,
    settings: Mapping[str, Any] | None = None,
) -> JobPools:
    """Start the job's pools concurrently with ``ctx.connect()``; close them at the job's shutdown.

    ``plugins``: LiveKit STT/TTS plugins built with ``http_session=session`` (their URLs are
    read from them, see :func:`discover`). ``llm``: an ``Http2Adapter`` for the LLM pool (then
    ``pools.llm``). ``concurrency``: sockets each pool keeps warm (a job is one call:
    1 and a spare). ``ctx``: the JobContext (anything with ``async connect()``; None to skip the
    join); when it has ``add_shutdown_callback`` (a JobContext does), :meth:`JobPools.aclose` is
    registered there: the entrypoint returns once ``AgentSession.start()`` has, while the
    session keeps using the pools until the job shuts down. Without it, the caller closes them
    (or uses :func:`job_pools`). Raises PoolUnavailable when a pool cannot open a single
    connection (the room join is awaited first, so its error wins); on any error or
    cancellation every pool is closed before it propagates.
    """
    manager = PoolManager()
    out = JobPools(manager, session.index, session=session, plugins=plugins)
    tls: dict[str, Any] = {} if ca_file is None else {"ca_file": ca_file}
    extra = dict(settings or {})
    try:
        for plugin in plugins:
            url, headers = await discover(session, plugin)
            if session.index.find(url) is not None:
                continue
            provider = _provider_of(plugin)
            spares = PoolSettings(concurrency=concurrency, min_size=concurrency + 1, **extra)
            name = f"{provider}-{len(manager) + 1}"
            adapter = socket_adapter(provider, url, headers, **tls)
            pool = manager.add_adapter(name, adapter, spares)
            session.index.add(pool, url=url)
            out.sockets[name] = pool
        if llm is not None:
            pool_settings = PoolSettings(concurrency=concurrency, **extra)
            out.llm = manager.add_adapter("llm", llm, pool_settings)
            session.index.add(out.llm)
        if ctx is not None:
            await asyncio.gather(ctx.connect(), manager.start())
        else:
            await manager.start()
        if out.llm is not None:
            from voicepool.integrations.openai import client

            client(out.llm)  # the SDK's first-use imports, during the join (no I/O)
    except BaseException:
        await manager.aclose()
        raise
    register = getattr(ctx, "add_shutdown_callback", None)
    if register is not None:
        register(out.aclose)
    return out


@contextlib.asynccontextmanager
async def job_pools(
    ctx: Any,
    session: PooledSession,
    *plugins: Any,
    llm: Adapter[Any] | None = None,
    concurrency: int = 1,
    ca_file: str | None = None,
    settings: Mapping[str, Any] | None = None,
) -> AsyncIterator[JobPools]:
    """:func:`start_job_pools` as a context manager: the pools (and the session's own aiohttp
    session) are closed on exit, for code that owns the job's lifetime itself (a test, a worker
    without a JobContext). Pass a ``ctx`` without ``add_shutdown_callback`` here (or None):
    a JobContext would close them a second time at shutdown, harmlessly. Cancellation-safe."""
    pools = await start_job_pools(
        ctx,
        session,
        *plugins,
        llm=llm,
        concurrency=concurrency,
        ca_file=ca_file,
        settings=settings,
    )
    try:
        yield pools
    finally:
        await pools.aclose()

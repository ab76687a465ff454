"""Pipecat services on voicepool pools (extra ``voicepool[pipecat]``, pipecat-ai 1.14).

Pipecat runs many calls in one process (its runner starts each ``bot()`` as a task), and each
service opens its own connection when its pipeline starts: a Deepgram WebSocket, an ElevenLabs or
Cartesia WebSocket, a new HTTP/1.1 client for the LLM. Here each of those comes from a pool that
was warmed at worker boot, and the change in a bot is the import line::

    from voicepool.integrations.pipecat import DeepgramSTTService   # was pipecat.services...

The services take the same arguments as Pipecat's. They find their pool in the running
:class:`PipecatPools` by the URL they were about to open (built from their own settings and the
pipeline's sample rate); a service whose URL no pool serves opens its own connection, as Pipecat
would, and that miss is logged and counted (``voicepool.pool.miss``).

Boot, once per worker: build the bot's services once as templates, so the pools are derived from
exactly the settings the calls use, then start the pools::

    pools = PipecatPools(concurrency=10, audio_in_sample_rate=16000, audio_out_sample_rate=24000)
    pools.declare(*make_services())
    async with pools:
        ...  # serve calls; each bot() builds its services as usual

What a lease is here: WebSockets are the plain ``websockets`` connection (the pool's raw mode),
single-use: a released socket is closed (politely: CloseStream, close_socket) and a warm spare
takes its place in the background, so one call's audio can never reach the next. The LLMs share
HTTP/2 connections, one stream per request.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from typing import Any, ClassVar

import httpx
from deepgram.core.jsonable_encoder import jsonable_encoder
from deepgram.core.query_encoder import encode_query
from deepgram.core.remove_none_from_dict import remove_none_from_dict
from pipecat.services.anthropic.llm import AnthropicLLMService as _AnthropicLLMService
from pipecat.services.cartesia.tts import CartesiaTTSService as _CartesiaTTSService
from pipecat.services.deepgram import stt as _pipecat_deepgram
from pipecat.services.deepgram.stt import DeepgramSTTService as _DeepgramSTTService
from pipecat.services.elevenlabs.tts import ElevenLabsTTSService as _ElevenLabsTTSService
from pipecat.services.elevenlabs.tts_base import output_format_from_sample_rate
from pipecat.services.openai.llm import OpenAILLMService as _OpenAILLMService

from voicepool.adapter import Adapter
from voicepool.errors import PoolError
from voicepool.integrations import anthropic as _anthropic
from voicepool.integrations import openai as _openai
from voicepool.integrations._sockets import exact_adapter
from voicepool.integrations.lookup import PoolIndex, pool_url
from voicepool.lease import Lease
from voicepool.manager import ManagerState, PoolManager
from voicepool.pool_settings import PoolSettings

__all__ = [
    "AnthropicLLMService",
    "CartesiaTTSService",
    "DeepgramSTTService",
    "ElevenLabsTTSService",
    "OpenAILLMService",
    "PipecatPools",
    "pool_url",
]

FRAMEWORK = "pipecat"


class PipecatPools:
    """The pools of one Pipecat worker: a :class:`~voicepool.PoolManager` and its
    :class:`~voicepool.integrations.PoolIndex`, shared by every ``bot()`` task.

    ``concurrency``: calls served at once (each WebSocket pool keeps that many warm spares: a
    call never waits for a handshake; Deepgram bills for open sockets, size it to the real peak).
    ``audio_in_sample_rate`` / ``audio_out_sample_rate``: the pipeline's (``PipelineParams``),
    used when a service has no ``sample_rate`` of its own. ``ca_file`` / ``verify``: TLS of the
    pools' connections. ``settings``: PoolSettings overrides for every pool.
    """

    _current: ClassVar[PipecatPools | None] = None

    def __init__(
        self,
        *,
        concurrency: int = 10,
        audio_in_sample_rate: int = 16000,
        audio_out_sample_rate: int = 24000,
        ca_file: str | None = None,
        verify: bool = True,
        settings: dict[str, Any] | None = None,
    ) -> None:
        self.concurrency = concurrency
        self.audio_in_sample_rate = audio_in_sample_rate
        self.audio_out_sample_rate = audio_out_sample_rate
        self.tls: dict[str, Any] = {"verify": verify}
        if ca_file is not None:
            self.tls["ca_file"] = ca_file
        self._overrides = dict(settings or {})
        self.manager = PoolManager()
        self.index = PoolIndex()

    @classmethod
    def current(cls) -> PipecatPools:
        """The started PipecatPools of this process. Raises PoolError when none is running."""
        pools = cls._current
        if pools is None:
            raise PoolError(
                "no PipecatPools is running: start one at worker boot (async with pools:) before"
                " the bots' pipelines start"
            )
        return pools

    @property
    def running(self) -> bool:
        return self.manager.state is ManagerState.RUNNING

    def declare(self, *services: Any) -> None:
        """Add the pools these pooled services need (their URL from their own settings and the
        pipeline's sample rate). Call before :meth:`start`; a URL already served is skipped.
        Raises TypeError for a service that is not one of this module's."""
        for service in services:
            spec = getattr(service, "_voicepool_pool", None)
            if spec is None:
                raise TypeError(f"{service!r} is not a voicepool.integrations.pipecat service")
            kind, url, adapter = spec(self)
            if self.index.find(url) is not None:
                continue
            per_call = {"single_use": {"min_size": self.concurrency}, "http2": {}}[kind]
            settings = PoolSettings(concurrency=self.concurrency, **per_call, **self._overrides)
            name = f"{type(service).__name__}-{len(self.manager) + 1}"
            self.index.add(self.manager.add_adapter(name, adapter, settings), url=url)

    async def start(self) -> None:
        """Start every pool (concurrently: boot costs about one handshake) and make this the
        process's :meth:`current`. Raises PoolUnavailable as PoolManager.start does."""
        await self.manager.start()
        PipecatPools._current = self
        for pool in self.manager.pools.values():
            if type(pool.adapter).__name__ == "Http2Adapter":
                _openai.client(pool)  # the SDK's first-use imports, at boot (no I/O)

    async def aclose(self, timeout: float | None = None) -> None:
        """Close the pools (leases drain up to ``timeout``). Idempotent."""
        if PipecatPools._current is self:
            PipecatPools._current = None
        await self.manager.aclose(timeout)

    async def __aenter__(self) -> PipecatPools:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def lease_socket(self, url: str) -> Lease[Any] | None:
        """A lease on the pool serving ``url``, or None after recording a miss. Raises what
        ``pool.lease()`` raises (PoolExhausted, PoolUnavailable, PoolLoopError...)."""
        return await self.index.lease(url, FRAMEWORK)


def _pools_of(service: Any) -> PipecatPools:
    pools: PipecatPools | None = service._voicepool_pools
    return pools if pools is not None else PipecatPools.current()


# -- WebSocket services -----------------------------------------------------------------------


class _PooledWebsocketService:
    """Mixin for Pipecat's ``WebsocketService`` subclasses: ``_websocket_connect`` leases, and
    ``_disconnect_websocket`` releases once Pipecat has said goodbye and closed the socket."""

    _voicepool_pools: PipecatPools | None
    _voicepool_lease: Lease[Any] | None = None

    async def _websocket_connect(self, uri: str, **kwargs: Any) -> Any:
        lease = await _pools_of(self).lease_socket(uri)
        if lease is None:
            return await super()._websocket_connect(uri, **kwargs)  # type: ignore[misc]
        self._voicepool_lease = lease
        return lease.conn

    async def _disconnect_websocket(self) -> None:
        try:
            await super()._disconnect_websocket()  # type: ignore[misc]
        finally:
            lease, self._voicepool_lease = self._voicepool_lease, None
            if lease is not None:
                await lease.release()


class ElevenLabsTTSService(_PooledWebsocketService, _ElevenLabsTTSService):
    """Pipecat's ElevenLabsTTSService (multi-stream-input WebSocket) on a pooled socket. Same
    arguments, plus ``voicepool_pools`` (default: :meth:`PipecatPools.current`)."""

    def __init__(self, *args: Any, voicepool_pools: PipecatPools | None = None, **kwargs: Any):
        self._voicepool_pools = voicepool_pools
        super().__init__(*args, **kwargs)

    def _voicepool_pool(self, pools: PipecatPools) -> tuple[str, str, Adapter[Any]]:
        rate = self._init_sample_rate or pools.audio_out_sample_rate
        saved, self._output_format = self._output_format, output_format_from_sample_rate(rate)
        try:
            url = self._build_websocket_url()
        finally:
            self._output_format = saved
        headers = {"xi-api-key": self._api_key}
        adapter = exact_adapter(
            "elevenlabs", url, headers, max_message_size=16 * 2**20, **pools.tls
        )
        return "single_use", url, adapter


class CartesiaTTSService(_PooledWebsocketService, _CartesiaTTSService):
    """Pipecat's CartesiaTTSService (WebSocket) on a pooled socket. Same arguments, plus
    ``voicepool_pools`` (default: :meth:`PipecatPools.current`)."""

    def __init__(self, *args: Any, voicepool_pools: PipecatPools | None = None, **kwargs: Any):
        self._voicepool_pools = voicepool_pools
        super().__init__(*args, **kwargs)

    def _voicepool_pool(self, pools: PipecatPools) -> tuple[str, str, Adapter[Any]]:
        # The output format travels in each request, not in the URL: one pool for any rate.
        headers = {
            "X-API-Key": self._api_key,
            "Cartesia-Version": self._cartesia_version,
            **self._extra_headers,
        }
        return "single_use", self._url, exact_adapter("cartesia", self._url, headers, **pools.tls)


# -- Deepgram STT (deepgram-sdk) --------------------------------------------------------------


def _deepgram_url(client: Any, kwargs: dict[str, Any]) -> str:
    """The URL ``client.listen.v1.connect(**kwargs)`` opens (deepgram-sdk 7's own encoding)."""
    wrapper = client.listen.v1._raw_client._client_wrapper
    url = str(wrapper.get_environment().production) + "/v1/listen"
    query = encode_query(jsonable_encoder(remove_none_from_dict(kwargs)))
    return f"{url}?{urllib.parse.urlencode(query)}" if query else url


_SDK_LOCK = threading.Lock()


@functools.cache
def _sdk_http() -> httpx.AsyncClient:
    """The one HTTP client of every pooled service's deepgram-sdk client (the SDK's defaults:
    60 s timeout, redirects followed). A pooled service never sends through it (its socket comes
    from the pool); building one per call would load the trust store each time (~25 ms of
    blocked event loop with the system's or certifi's CA bundle). It opens no connection until
    used, so it is never closed."""
    return httpx.AsyncClient(timeout=60.0, follow_redirects=True)


@contextlib.contextmanager
def _sdk_on_shared_http() -> Iterator[None]:
    """While a pooled DeepgramSTTService is built: Pipecat's module builds the SDK client on
    :func:`_sdk_http` (it takes no client of ours). Under a lock: the name is Pipecat's module's
    for the time of one constructor, never left swapped for a build in another thread."""
    module: Any = _pipecat_deepgram
    with _SDK_LOCK:
        real = module.AsyncDeepgramClient
        module.AsyncDeepgramClient = functools.partial(real, httpx_client=_sdk_http())
        try:
            yield
        finally:
            module.AsyncDeepgramClient = real


class _PooledListen:
    """Stands in for ``AsyncDeepgramClient`` where Pipecat calls ``listen.v1.connect(...)``:
    the same socket client (``AsyncV1SocketClient``) on a pooled socket, released on exit."""

    def __init__(self, client: Any, service: DeepgramSTTService) -> None:
        self._client = client
        self._service = service
        self.listen = self
        self.v1 = self
        # The URL per connect kwargs: Pipecat builds the same kwargs at every (re)connect.
        self._urls: dict[tuple[tuple[str, Any], ...], str] = {}

    def __getattr__(self, name: str) -> Any:  # everything else is the real client's
        return getattr(self._client, name)

    @contextlib.asynccontextmanager
    async def connect(self, **kwargs: Any) -> AsyncIterator[Any]:
        # Imported here: websockets.legacy (which it imports) warns at import time.
        from deepgram.listen.v1.socket_client import AsyncV1SocketClient

        lease = await _pools_of(self._service).lease_socket(self._url(kwargs))
        if lease is None:
            async with self._client.listen.v1.connect(**kwargs) as connection:
                yield connection
            return
        error: BaseException | None = None
        try:
            yield AsyncV1SocketClient(websocket=lease.conn)
        except Exception as exc:
            error = exc
            raise
        finally:
            await lease.release(error)

    def _url(self, kwargs: dict[str, Any]) -> str:
        try:
            key = tuple(kwargs.items())
            url = self._urls.get(key)
        except TypeError:  # an unhashable value (a list of keyterms...): not cached
            return _deepgram_url(self._client, kwargs)
        if url is None:
            url = self._urls[key] = _deepgram_url(self._client, kwargs)
        return url


class DeepgramSTTService(_DeepgramSTTService):
    """Pipecat's DeepgramSTTService on a pooled socket. Same arguments, plus
    ``voicepool_pools`` (default: :meth:`PipecatPools.current`)."""

    def __init__(self, *args: Any, voicepool_pools: PipecatPools | None = None, **kwargs: Any):
        self._voicepool_pools = voicepool_pools
        with _sdk_on_shared_http():
            super().__init__(*args, **kwargs)
        self._voicepool_sdk = self._client
        self._client = _PooledListen(self._client, self)  # type: ignore[assignment]

    def _voicepool_pool(self, pools: PipecatPools) -> tuple[str, str, Adapter[Any]]:
        rate = self._init_sample_rate or pools.audio_in_sample_rate
        saved, self._sample_rate = self._sample_rate, rate
        try:
            kwargs = self._build_connect_kwargs()
        finally:
            self._sample_rate = saved
        url = _deepgram_url(self._voicepool_sdk, kwargs)
        headers = dict(self._voicepool_sdk._client_wrapper.get_headers())
        return "single_use", url, exact_adapter("deepgram", url, headers, **pools.tls)


# -- LLMs (HTTP/2) ----------------------------------------------------------------------------


def _http2_adapter(base_url: str, key: str, header: str, pools: PipecatPools) -> Adapter[Any]:
    from voicepool.adapters.http2 import Http2Adapter

    tls = dict(pools.tls)
    adapter: Adapter[Any] = Http2Adapter(
        base_url=base_url, api_key=key, api_key_header=header, **tls
    )
    return adapter


class OpenAILLMService(_OpenAILLMService):
    """Pipecat's OpenAILLMService whose client runs on a pooled HTTP/2 connection
    (:func:`voicepool.integrations.openai.client`, ``max_retries=0``). Same arguments, plus
    ``voicepool_pools``. Built before the pools run (a template for :meth:`PipecatPools.declare`)
    it keeps Pipecat's own client."""

    _DEFAULT_BASE = "https://api.openai.com/v1"

    def __init__(self, *args: Any, voicepool_pools: PipecatPools | None = None, **kwargs: Any):
        self._voicepool_pools = voicepool_pools
        self._voicepool_args: tuple[str, str] = ("", "")
        super().__init__(*args, **kwargs)

    def create_client(
        self,
        api_key: Any = None,
        base_url: Any = None,
        organization: Any = None,
        project: Any = None,
        default_headers: Any = None,
        **kwargs: Any,
    ) -> Any:
        base = (base_url or self._DEFAULT_BASE).rstrip("/")
        self._voicepool_args = (api_key or "", base)
        own = {
            "organization": organization,
            "project": project,
            "default_headers": default_headers,
            **kwargs,
        }
        pools = self._voicepool_pools or PipecatPools._current
        pool = pools.index.find(base) if pools is not None and pools.running else None
        if pool is None:
            if pools is not None and pools.running:
                pools.index.miss(base, FRAMEWORK)
            return super().create_client(api_key=api_key, base_url=base_url, **own)  # type: ignore[no-untyped-call]
        return _openai.client(pool, api_key=api_key, base_url=base, **own)

    def _voicepool_pool(self, pools: PipecatPools) -> tuple[str, str, Adapter[Any]]:
        key, base = self._voicepool_args
        return "http2", base, _http2_adapter(base, key, "authorization", pools)


class AnthropicLLMService(_AnthropicLLMService):
    """Pipecat's AnthropicLLMService with its client on a pooled HTTP/2 connection
    (:func:`voicepool.integrations.anthropic.client`). Same arguments, plus ``base_url``
    (default ``https://api.anthropic.com``) and ``voicepool_pools``."""

    _DEFAULT_BASE = "https://api.anthropic.com"

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str | None = None,
        voicepool_pools: PipecatPools | None = None,
        **kwargs: Any,
    ):
        self._voicepool_pools = voicepool_pools
        self._voicepool_args = (api_key, (base_url or self._DEFAULT_BASE).rstrip("/"))
        pools = voicepool_pools or PipecatPools._current
        client = kwargs.pop("client", None)
        if client is None and pools is not None and pools.running:
            pool = pools.index.find(self._voicepool_args[1])
            if pool is None:
                pools.index.miss(self._voicepool_args[1], FRAMEWORK)
            else:
                client = _anthropic.client(pool, api_key=api_key, base_url=self._voicepool_args[1])
        if client is None and base_url is not None:
            import anthropic

            client = anthropic.AsyncAnthropic(api_key=api_key, base_url=base_url)
        super().__init__(api_key=api_key, client=client, **kwargs)

    def _voicepool_pool(self, pools: PipecatPools) -> tuple[str, str, Adapter[Any]]:
        key, base = self._voicepool_args
        return "http2", base, _http2_adapter(base, key, "x-api-key", pools)

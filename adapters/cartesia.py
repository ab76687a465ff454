"""Cartesia text-to-speech over pooled WebSockets, one ``context_id`` per lease (``MULTIPLEXED``).

Releasing a lease whose audio has not finished sends ``{"context_id": ..., "cancel": true}``, so a
barge-in stops generation and frees the account's concurrency at once. A context that fails (an
``error`` message for it, e.g. 429 over the plan's concurrency) fails that lease only; the shared
socket is discarded only when the socket itself fails.

Idle sockets: Cartesia closes a socket after 5 minutes without a request and has no keepalive
message. The pool pings idle sockets (WebSocket ping/pong: health, not keepalive) at least every
``max_idle / 2``, and the adapter recycles a socket before the idle close: the first ping after
``recycle_after`` seconds without a request (default 40% of ``max_idle``, so the next ping can never
come too late) fails on purpose and the pool replaces the socket, off the acquire path. As a last
guard ``is_open`` reports a socket idle for 90% of ``max_idle`` unusable, so no acquire gets one
the provider is about to close.

In a call handler::

    async with tts_pool.acquire() as lease:
        ctx = lease.conn.context(lease.stream_id)
        async for chunk in ctx.synthesize("Hello there."): ...
"""

from __future__ import annotations

from typing import Any, ClassVar
from urllib.parse import urlencode

from pydantic import BaseModel, Field

# Relative imports: mypy cannot map the repo folder adapters/ to voicepool.adapters, and
# a relative import resolves to the installed package at run time (hence the noqa).
from ._tts import ServerEvent, TTSAdapter, TTSContext, decode_audio, load_object  # noqa: TID251
from .provider import ProviderOptions  # noqa: TID251
from .websocket import MalformedMessage  # noqa: TID251

__all__ = ["CartesiaAdapter", "CartesiaDialect", "CartesiaOptions", "TTSContext"]

API_VERSION = "2026-08-14"  # what the cartesia 4.x SDK sends (docs/providers.md)


class CartesiaOptions(ProviderOptions):
    """Typed options: endpoint, version, and the fields every generation request carries."""

    url: str = "wss://api.cartesia.ai"
    path: str = "/tts/websocket"
    auth_header: str = "X-API-Key"
    auth_scheme: str = ""
    version: str = API_VERSION
    model_id: str = "sonic-2"
    voice_id: str = Field(default="a0e99841-438c-4a64-b679-ae501e7d6091", min_length=1)
    language: str | None = "en"
    encoding: str = "pcm_s16le"
    sample_rate: int = Field(default=16000, gt=0)
    max_contexts: int = Field(default=5, ge=1, description="Contexts one socket carries at once.")
    max_idle: float | None = Field(
        default=300.0, gt=0, description="Cartesia's idle close (5 min)."
    )
    recycle_after: float | None = Field(default=None, gt=0, description="Default: 40% of max_idle.")


class CartesiaDialect:
    """Cartesia's WebSocket wire format (``context_id``, ``continue``, ``cancel``)."""

    provider = "Cartesia"

    def __init__(self, options: CartesiaOptions) -> None:
        self.options = options

    def _request(self, context_id: str, transcript: str, cont: bool) -> dict[str, Any]:
        o = self.options
        msg: dict[str, Any] = {
            "context_id": context_id,
            "model_id": o.model_id,
            "transcript": transcript,
            "voice": {"mode": "id", "id": o.voice_id},
            "output_format": {
                "container": "raw",
                "encoding": o.encoding,
                "sample_rate": o.sample_rate,
            },
            "continue": cont,
        }
        if o.language:
            msg["language"] = o.language
        return msg

    def init_messages(self, context_id: str) -> list[dict[str, Any]]:
        return []  # the first request opens the context

    def text_message(self, context_id: str, text: str, flush: bool) -> dict[str, Any]:
        msg = self._request(context_id, text, True)
        if flush:
            msg["flush"] = True
        return msg

    def flush_messages(self, context_id: str) -> list[dict[str, Any]]:
        msg = self._request(context_id, "", True)
        msg["flush"] = True
        return [msg]

    def end_messages(self, context_id: str) -> list[dict[str, Any]]:
        return [self._request(context_id, "", False)]

    def cancel_messages(self, context_id: str, ended: bool) -> list[dict[str, Any]]:
        return [{"context_id": context_id, "cancel": True}]

    def keepalive_messages(self, open_contexts: list[str]) -> list[dict[str, Any]]:
        return []  # Cartesia has none: sockets are recycled before the idle close instead

    def goodbye_messages(self) -> list[dict[str, Any]]:
        return []

    def parse(self, message: str | bytes) -> ServerEvent:
        msg = load_object(message, self.provider)
        cid = msg.get("context_id")
        if cid is not None and not isinstance(cid, str):
            raise MalformedMessage(f"{self.provider}: context_id is not a string")
        kind = msg.get("type")
        if kind == "chunk":
            return ServerEvent("audio", cid, audio=decode_audio(msg.get("data"), self.provider))
        if kind == "done":
            return ServerEvent("final", cid)
        if kind == "error":
            status = msg.get("status_code")
            return ServerEvent(
                "error",
                cid,
                error=str(msg.get("error") or msg.get("message") or "error"),
                status=status if isinstance(status, int) else None,
            )
        if kind in ("flush_done", "timestamps", "phoneme_timestamps"):
            return ServerEvent("other", cid)
        if not isinstance(kind, str):
            raise MalformedMessage(f"{self.provider}: message without a type")
        return ServerEvent("other", cid)


class CartesiaAdapter(TTSAdapter):
    """Pool adapter for Cartesia TTS (see the module doc). Registered as ``cartesia``."""

    Options: ClassVar[type[BaseModel] | None] = CartesiaOptions
    options: CartesiaOptions
    service: ClassVar[str | None] = "tts"
    max_streams: int = 5
    max_idle: float | None = 300.0

    def __init__(self, options: CartesiaOptions | None = None, **kwargs: Any) -> None:
        super().__init__(options, **kwargs)
        self.max_streams = self.options.max_contexts
        self.dialect = CartesiaDialect(self.options)

    def url(self) -> str:
        o = self.options
        return f"{o.url.rstrip('/')}{o.path}?{urlencode({'cartesia_version': o.version})}"

    def request_headers(self) -> list[tuple[str, str]]:
        return [*super().request_headers(), ("Cartesia-Version", self.options.version)]

    def recycle_after(self) -> float | None:
        o = self.options
        if o.recycle_after is not None:
            return o.recycle_after
        return 0.4 * o.max_idle if o.max_idle is not None else None

    def stale_after(self) -> float | None:
        o = self.options
        return 0.9 * o.max_idle if o.max_idle is not None else None

"""ElevenLabs text-to-speech over pooled multi-context WebSockets (``multi-stream-input``).

Each lease is one context on a shared socket (``MULTIPLEXED``): at most 5 contexts a socket, as
ElevenLabs closes a socket that opens a 6th (1008). The pool never hands out a 6th stream, and
releasing a lease sends ``close_context`` before its slot is reused, so an interrupted turn
(barge-in) frees its slot at once. A failed context does not discard the socket; a socket that
fails (close, malformed message) is replaced.

Keepalive: ElevenLabs closes a socket after ``inactivity_timeout`` (default 20 s) without text.
The pool pings idle sockets; each ping sends a keepalive and a WebSocket ping. The keepalive is
``{"context_id": ..., "text": ""}`` for each open context (the documented per-context keepalive)
and ``{"text": ""}`` on a socket with none: a message that names a context opens it, so a made-up
keepalive context would take one of the 5 slots. A socket with open contexts keeps itself alive
the same way whenever nothing was sent for ``keepalive_interval``.

In a call handler::

    async with tts_pool.acquire() as lease:
        ctx = lease.conn.context(lease.stream_id)
        await ctx.send_text("Hello there. ")
        await ctx.end()
        async for chunk in ctx.audio(): ...      # PCM of this context only
"""

from __future__ import annotations

from typing import Any, ClassVar
from urllib.parse import quote, urlencode

from pydantic import BaseModel, Field, model_validator

# Relative imports: mypy cannot map the repo folder adapters/ to voicepool.adapters, and
# a relative import resolves to the installed package at run time (hence the noqa).
from ._tts import ServerEvent, TTSAdapter, TTSContext, decode_audio, load_object  # noqa: TID251
from .provider import ProviderOptions  # noqa: TID251
from .websocket import MalformedMessage  # noqa: TID251

__all__ = ["ElevenLabsAdapter", "ElevenLabsDialect", "ElevenLabsOptions", "TTSContext"]

MAX_CONTEXTS = 5


class ElevenLabsOptions(ProviderOptions):
    """Typed options; the URL is built from ``url``, ``voice_id`` and the query fields."""

    url: str = "wss://api.elevenlabs.io"
    auth_header: str = "xi-api-key"
    auth_scheme: str = ""
    voice_id: str = Field(default="21m00Tcm4TlvDq8ikWAM", min_length=1)
    model_id: str = "eleven_flash_v2_5"
    output_format: str = "pcm_16000"
    inactivity_timeout: int = Field(
        default=20, ge=5, le=180, description="ElevenLabs idle close, s."
    )
    voice_settings: dict[str, Any] | None = None
    params: dict[str, str] = Field(default_factory=dict, description="More query parameters.")
    max_contexts: int = Field(default=MAX_CONTEXTS, ge=1, le=MAX_CONTEXTS)
    max_idle: float | None = Field(default=None, gt=0, description="Default: inactivity_timeout.")
    keepalive_interval: float | None = Field(
        default=None, gt=0, description="Default: max_idle / 3."
    )

    @model_validator(mode="after")
    def _keepalive_fits(self) -> ElevenLabsOptions:
        idle = self.idle_close()
        if self.keepalive_interval is not None and self.keepalive_interval >= idle:
            raise ValueError(f"keepalive_interval must be below the idle close ({idle:g} s)")
        return self

    def idle_close(self) -> float:
        return self.max_idle if self.max_idle is not None else float(self.inactivity_timeout)


class ElevenLabsDialect:
    """The multi-context stream-input wire format."""

    provider = "ElevenLabs"

    def __init__(self, options: ElevenLabsOptions) -> None:
        self.options = options

    def init_messages(self, context_id: str) -> list[dict[str, Any]]:
        msg: dict[str, Any] = {"text": " ", "context_id": context_id}
        if self.options.voice_settings:
            msg["voice_settings"] = self.options.voice_settings
        return [msg]

    def text_message(self, context_id: str, text: str, flush: bool) -> dict[str, Any]:
        # ElevenLabs expects each text chunk to end with a space (word boundary).
        msg: dict[str, Any] = {"text": text if text.endswith(" ") else text + " "}
        msg["context_id"] = context_id
        if flush:
            msg["flush"] = True
        return msg

    def flush_messages(self, context_id: str) -> list[dict[str, Any]]:
        return [{"context_id": context_id, "flush": True}]

    def end_messages(self, context_id: str) -> list[dict[str, Any]]:
        # Flush what is buffered, then close: the audio completes and `isFinal` follows.
        return [
            {"context_id": context_id, "flush": True},
            {"context_id": context_id, "close_context": True},
        ]

    def cancel_messages(self, context_id: str, ended: bool) -> list[dict[str, Any]]:
        # After end() the close_context is already sent; ElevenLabs has no other cancel.
        return [] if ended else [{"context_id": context_id, "close_context": True}]

    def keepalive_messages(self, open_contexts: list[str]) -> list[dict[str, Any]]:
        # A message naming a context opens it, taking one of the socket's 5 slots: name only
        # contexts already open, and keep a socket without one alive with a context-less
        # keepalive (what Pipecat does since its #4527).
        if not open_contexts:
            return [{"text": ""}]
        return [{"context_id": cid, "text": ""} for cid in open_contexts]

    def goodbye_messages(self) -> list[dict[str, Any]]:
        return [{"close_socket": True}]

    def parse(self, message: str | bytes) -> ServerEvent:
        msg = load_object(message, self.provider)
        cid = msg.get("contextId", msg.get("context_id"))
        if cid is not None and not isinstance(cid, str):
            raise MalformedMessage(f"{self.provider}: contextId is not a string")
        if "error" in msg or ("message" in msg and "audio" not in msg):
            code = msg.get("code")
            return ServerEvent(
                "error",
                cid,
                error=str(msg.get("message") or msg.get("error")),
                status=code if isinstance(code, int) else None,
            )
        audio = decode_audio(msg.get("audio"), self.provider)
        if msg.get("isFinal"):
            return ServerEvent("final", cid, audio=audio)
        if "audio" in msg:
            return ServerEvent("audio", cid, audio=audio)
        return ServerEvent("other", cid)


class ElevenLabsAdapter(TTSAdapter):
    """Pool adapter for ElevenLabs multi-context TTS (see the module doc). Name: ``elevenlabs``."""

    Options: ClassVar[type[BaseModel] | None] = ElevenLabsOptions
    options: ElevenLabsOptions
    service: ClassVar[str | None] = "tts"
    max_streams: int = MAX_CONTEXTS
    max_idle: float | None = 20.0

    def __init__(self, options: ElevenLabsOptions | None = None, **kwargs: Any) -> None:
        super().__init__(options, **kwargs)
        # Per instance: the socket's real idle close (from the URL) and context capacity.
        self.max_idle = self.options.idle_close()
        self.max_streams = self.options.max_contexts
        self.dialect = ElevenLabsDialect(self.options)

    def url(self) -> str:
        o = self.options
        query = {
            "model_id": o.model_id,
            "output_format": o.output_format,
            "inactivity_timeout": str(o.inactivity_timeout),
            **o.params,
        }
        path = f"/v1/text-to-speech/{quote(o.voice_id, safe='')}/multi-stream-input"
        return f"{o.url.rstrip('/')}{path}?{urlencode(query)}"

    def keepalive_interval(self) -> float | None:
        o = self.options
        return o.keepalive_interval or o.idle_close() / 3

"""`DeepgramEmulator`: a Deepgram-like live ASR WebSocket server on 127.0.0.1.

Faithful to reference/protocols.md where it marks (E):

* ``GET /v1/listen?...`` with ``Authorization: Token <key>``; a bad or missing key gets HTTP 401,
  an unknown ``encoding`` or a non-numeric ``sample_rate`` HTTP 400, another path 404; above
  ``max_concurrency`` open streams the handshake gets HTTP 429.
* Binary frames are audio. An empty binary frame closes the stream like ``CloseStream``. A
  ``{"type":"KeepAlive"}`` sent as a *binary* frame is not a keepalive (counted, ignored).
* Text frames: ``KeepAlive`` (no reply), ``Finalize`` (a final ``Results`` with
  ``from_finalize: true``), ``CloseStream`` (final results, a ``Metadata`` message, close 1000).
  Invalid JSON closes with 1008 ``DATA-0000``.
* No audio and no text keepalive for ``idle_timeout`` (Deepgram: about 10 s) closes the socket
  with 1011 ``NET-0001``. WebSocket pings do not count.

"Recognition" is deterministic so tests can assert on it: an audio frame that is printable UTF-8
is heard as those words, anything else as silence; every audio frame is answered by an interim
``Results`` (the transcript so far), ``Finalize`` and ``CloseStream`` by a final one.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any, ClassVar

from websockets.datastructures import Headers

from voicepool.testing._wsemulator import EmulatorSession, WebSocketEmulator

__all__ = ["DeepgramEmulator"]

_ENCODINGS = {"linear16", "linear32", "flac", "mulaw", "alaw", "amr-nb", "amr-wb", "opus", "speex"}
_BYTES_PER_SAMPLE = {"linear16": 2, "linear32": 4, "mulaw": 1, "alaw": 1}


class _Stream:
    """State of one recognition stream (one socket)."""

    def __init__(self, session: EmulatorSession) -> None:
        q = session.query
        self.session = session
        self.request_id = str(uuid.uuid4())
        self.sample_rate = int(q.get("sample_rate", "16000"))
        self.channels = int(q.get("channels", "1"))
        self.width = _BYTES_PER_SAMPLE.get(q.get("encoding", "linear16"), 2)
        self.interim = q.get("interim_results", "false").lower() == "true"
        self.words: list[str] = []  # heard since the last final result
        self.start = 0.0  # seconds of audio before the current segment
        self.pending = 0.0  # seconds of audio in the current segment
        self.total = 0.0

    def seconds(self, nbytes: int) -> float:
        return nbytes / float(self.sample_rate * self.channels * self.width)

    def results(self, *, final: bool, from_finalize: bool = False) -> dict[str, Any]:
        msg = {
            "type": "Results",
            "channel_index": [0, 1],
            "duration": round(self.pending, 4),
            "start": round(self.start, 4),
            "is_final": final,
            "speech_final": final,
            "from_finalize": from_finalize,
            "channel": {
                "alternatives": [
                    {"transcript": " ".join(self.words), "confidence": 0.99, "words": []}
                ]
            },
            "metadata": {"request_id": self.request_id},
        }
        if final:
            self.start += self.pending
            self.pending = 0.0
            self.words = []
        return msg


class DeepgramEmulator(WebSocketEmulator):
    """Deepgram-like live ASR. ``server.url`` is the base URL; the path is ``/v1/listen``.

    Extra counters: ``keepalives`` (text), ``binary_keepalives`` (ignored), ``finalizes``,
    ``close_streams``, ``audio_bytes``, ``results_sent``. ``result_delay`` adds a processing delay
    before each ``Results`` (0 by default).
    """

    name: ClassVar[str] = "deepgram-emulator"
    auth_header: ClassVar[str] = "Authorization"
    auth_scheme: ClassVar[str] = "Token"
    default_idle_timeout: ClassVar[float | None] = 10.0
    idle_close_code: ClassVar[int] = 1011
    idle_close_reason: ClassVar[str] = "NET-0001"
    path: ClassVar[str] = "/v1/listen"

    def __init__(self, *, result_delay: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.result_delay = result_delay
        self.keepalives = 0
        self.binary_keepalives = 0
        self.finalizes = 0
        self.close_streams = 0
        self.audio_bytes = 0
        self.results_sent = 0

    def route(self, path: str, query: dict[str, str], headers: Headers) -> int | None:
        if path != self.path:
            return 404
        if query.get("encoding", "linear16") not in _ENCODINGS:
            return 400
        for key in ("sample_rate", "channels"):
            if not query.get(key, "1").isdigit():
                return 400
        return None

    async def serve_session(self, session: EmulatorSession) -> None:
        stream = _Stream(session)
        ws = session.ws
        while True:
            message = await ws.recv()
            session.messages += 1
            if isinstance(message, bytes):
                if not message:  # an empty binary frame closes the stream
                    await self._close_stream(session, stream)
                    return
                if _is_control(message):
                    self.binary_keepalives += 1  # not a keepalive: does not touch the idle timer
                    continue
                session.touch()
                self.audio_bytes += len(message)
                seconds = stream.seconds(len(message))
                stream.pending += seconds
                stream.total += seconds
                text = _heard(message)
                if text:
                    stream.words.append(text)
                if stream.interim:
                    await self._send(session, stream.results(final=False))
                continue
            try:
                control = json.loads(message)
                kind = control["type"] if isinstance(control, dict) else None
            except (ValueError, KeyError):
                self.malformed_inputs += 1
                await session.close(1008, "DATA-0000")
                return
            session.touch()
            if kind == "KeepAlive":
                self.keepalives += 1
            elif kind == "Finalize":
                self.finalizes += 1
                await self._send(session, stream.results(final=True, from_finalize=True))
            elif kind == "CloseStream":
                await self._close_stream(session, stream)
                return
            else:
                self.malformed_inputs += 1
                await ws.send(
                    json.dumps({"type": "Error", "description": f"unknown message type {kind!r}"})
                )

    async def _send(self, session: EmulatorSession, msg: dict[str, Any]) -> None:
        if self.result_delay:
            await asyncio.sleep(self.result_delay)
        await session.ws.send(json.dumps(msg))
        if msg.get("type") == "Results":
            self.results_sent += 1

    async def _close_stream(self, session: EmulatorSession, stream: _Stream) -> None:
        self.close_streams += 1
        if stream.pending or stream.words:
            await self._send(session, stream.results(final=True))
        await self._send(
            session,
            {
                "type": "Metadata",
                "transaction_key": "deprecated",
                "request_id": stream.request_id,
                "created": "1970-01-01T00:00:00.000Z",
                "duration": round(stream.total, 4),
                "channels": stream.channels,
            },
        )
        await session.close(1000, "")


def _is_control(frame: bytes) -> bool:
    """A JSON control message sent as binary (Deepgram treats it as audio, not a keepalive)."""
    if not frame.startswith(b"{"):
        return False
    try:
        return isinstance(json.loads(frame), dict)
    except ValueError:
        return False


def _heard(frame: bytes) -> str:
    """The words an audio frame "contains": its text if printable UTF-8, else silence."""
    try:
        text = frame.decode("utf-8")
    except UnicodeDecodeError:
        return ""
    return text.strip() if text.isprintable() else ""

"""`DeepgramEmulator`: a Deepgram-like live ASR WebSocket server on 127.0.0.1.

Each behaviour follows docs/providers.md (which names the source of every fact):

* ``GET /v1/listen?...`` with ``Authorization: Token <key>`` (or ``Bearer <token>``); a bad or
  missing key gets HTTP 401, an unknown ``encoding`` or a non-numeric ``sample_rate`` HTTP 400,
  another path 404; above ``max_concurrency`` open streams the handshake gets HTTP 429.
* Binary frames are audio. An empty binary frame closes the stream like ``CloseStream``. A
  ``{"type":"KeepAlive"}`` sent as a *binary* frame is not a keepalive (counted, ignored).
* Text frames: ``KeepAlive`` (no reply), ``Finalize`` (a final ``Results`` with
  ``from_finalize: true``), ``Configure`` (``ConfigureSuccess``; keyterms on a model other than
  Nova-3 get ``ConfigureFailure`` ``CONFIGURE_KEYTERMS_NOT_SUPPORTED``), ``CloseStream`` (final
  results, a ``Metadata`` message, close 1000). Invalid JSON closes with 1008 ``DATA-0000``; an
  unknown type gets an ``Error`` (``variant: SchemaError``).
* ``vad_events=true``: ``SpeechStarted`` when speech follows silence. ``utterance_end_ms=N``
  (with ``interim_results=true``): ``UtteranceEnd`` once N ms of audio without a word follow
  the last word.
* ``endpointing=N`` (ms; only when the emulator is built with ``endpointing=True``): once N ms
  of audio without a word follow a word, a final ``Results`` with ``speech_final: true`` (the end
  of an utterance, as Deepgram's endpointing sends it; absent, Deepgram's default 10 ms;
  ``false``: off). Off by default so tests that count results are not changed by silence.
* No audio and no text keepalive for ``idle_timeout`` (Deepgram: about 10 s) closes the socket
  with 1011 ``NET-0001``. WebSocket pings do not count.

"Recognition" is deterministic so tests can assert on it: an audio frame that is printable UTF-8
is heard as those words, anything else as silence; every audio frame is answered by an interim
``Results`` (the transcript so far), ``Finalize`` and ``CloseStream`` by a final one. Times are
audio time (bytes / sample rate), so a test controls them exactly.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from typing import Any, ClassVar

from websockets.datastructures import Headers

from voicepool.testing._wsemulator import EmulatorSession, WebSocketEmulator

__all__ = ["DeepgramEmulator"]

_ENCODINGS = {"linear16", "linear32", "flac", "mulaw", "alaw", "amr-nb", "amr-wb", "opus", "speex"}
_BYTES_PER_SAMPLE = {"linear16": 2, "linear32": 4, "mulaw": 1, "alaw": 1}
_MODEL_UUID = "00000000-0000-4000-8000-00000000e3a1"  # the emulator's one "model"


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
        self.vad_events = q.get("vad_events", "false").lower() == "true"
        ms = q.get("utterance_end_ms", "")
        # UtteranceEnd works from interim results: Deepgram requires interim_results=true.
        self.utterance_end = int(ms) / 1000 if ms.isdigit() and self.interim else None
        self.model = q.get("model", "nova-3")
        self.endpointing: float | None = None  # seconds of silence that end an utterance
        self.silence = 0.0  # seconds of audio without a word since the last word
        self.words: list[dict[str, Any]] = []  # heard since the last final result
        self.speaking = False  # the last frame had words
        self.last_word_end: float | None = None  # no UtteranceEnd due when None
        self.sha256 = hashlib.sha256()
        self.start = 0.0  # seconds of audio before the current segment
        self.pending = 0.0  # seconds of audio in the current segment
        self.total = 0.0

    def seconds(self, nbytes: int) -> float:
        return nbytes / float(self.sample_rate * self.channels * self.width)

    def hear(self, frame: bytes, seconds: float) -> list[dict[str, Any]]:
        """Add one audio frame; return the VAD events it causes (SpeechStarted, UtteranceEnd)."""
        events: list[dict[str, Any]] = []
        at = self.total  # audio time where this frame starts
        self.sha256.update(frame)
        tokens = _heard(frame).split()
        if tokens:
            if not self.speaking and self.vad_events:
                events.append({"type": "SpeechStarted", "channel": [0], "timestamp": round(at, 4)})
            step = seconds / len(tokens)
            for i, token in enumerate(tokens):
                start, end = at + i * step, at + (i + 1) * step
                word = {"word": token.lower(), "start": round(start, 4), "end": round(end, 4)}
                self.words.append({**word, "confidence": 0.99, "punctuated_word": token})
            self.last_word_end = at + seconds
            self.silence = 0.0
        else:
            self.silence += seconds
        if not tokens and (
            self.last_word_end is not None
            and self.utterance_end is not None
            and at + seconds - self.last_word_end >= self.utterance_end
        ):
            last = round(self.last_word_end, 4)
            events.append({"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": last})
            self.last_word_end = None
        self.speaking = bool(tokens)
        self.pending += seconds
        self.total += seconds
        return events

    def results(self, *, final: bool, from_finalize: bool = False) -> dict[str, Any]:
        transcript = " ".join(w["punctuated_word"] for w in self.words)
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
                    {"transcript": transcript, "confidence": 0.99, "words": list(self.words)}
                ]
            },
            "metadata": {
                "request_id": self.request_id,
                "model_info": {"name": self.model, "version": "emulated", "arch": self.model},
                "model_uuid": _MODEL_UUID,
            },
        }
        if final:
            self.silence = 0.0
            self.start += self.pending
            self.pending = 0.0
            self.words = []
        return msg

    def endpointed(self) -> bool:
        """Whether the silence since the last word now ends the utterance (see ``endpointing``)."""
        return (
            bool(self.words) and self.endpointing is not None and (self.silence >= self.endpointing)
        )

    def configure(self, control: dict[str, Any]) -> dict[str, Any]:
        """The answer to a ``Configure`` message (ConfigureSuccess or ConfigureFailure)."""
        keyterms = control.get("keyterms")
        if keyterms is not None and not self.model.startswith("nova-3"):
            return {
                "type": "ConfigureFailure",
                "request_id": self.request_id,
                "code": "CONFIGURE_KEYTERMS_NOT_SUPPORTED",
                "description": f"model {self.model} does not support keyterm updates",
            }
        answer: dict[str, Any] = {"type": "ConfigureSuccess", "request_id": self.request_id}
        if keyterms is not None:
            answer["keyterms"] = list(keyterms)
        return answer


class DeepgramEmulator(WebSocketEmulator):
    """Deepgram-like live ASR. ``server.url`` is the base URL; the path is ``/v1/listen``.

    Extra counters: ``keepalives`` (text), ``binary_keepalives`` (ignored), ``finalizes``,
    ``close_streams``, ``audio_bytes``, ``results_sent``, ``endpoints``. ``result_delay`` adds a
    processing delay before each ``Results`` (0 by default). ``endpointing``: honour the
    ``endpointing`` query parameter (see the module doc).
    """

    name: ClassVar[str] = "deepgram-emulator"
    auth_header: ClassVar[str] = "Authorization"
    auth_scheme: ClassVar[str] = "Token"
    default_idle_timeout: ClassVar[float | None] = 10.0
    idle_close_code: ClassVar[int] = 1011
    idle_close_reason: ClassVar[str] = "NET-0001"
    path: ClassVar[str] = "/v1/listen"

    def __init__(
        self, *, result_delay: float = 0.0, endpointing: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.result_delay = result_delay
        self.endpointing = endpointing
        self.endpoints = 0
        self.keepalives = 0
        self.binary_keepalives = 0
        self.finalizes = 0
        self.close_streams = 0
        self.configures = 0
        self.audio_bytes = 0
        self.results_sent = 0

    def offered_keys(self, headers: Headers, query: dict[str, str]) -> list[str]:
        # `Token <api key>`, or `Bearer <temporary token>` (the SDK's access_token); the
        # emulator treats a key as both.
        scheme, _, key = headers.get(self.auth_header, "").partition(" ")
        return [key] if scheme in ("Token", "Bearer") else []

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
        if self.endpointing:
            stream.endpointing = _endpointing(session.query.get("endpointing", "10"))
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
                for event in stream.hear(message, stream.seconds(len(message))):
                    await self._send(session, event)
                if stream.endpointed():
                    self.endpoints += 1
                    await self._send(session, stream.results(final=True))
                elif stream.interim:
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
            elif kind == "Configure":
                self.configures += 1
                await self._send(session, stream.configure(control))
            elif kind == "CloseStream":
                await self._close_stream(session, stream)
                return
            else:
                self.malformed_inputs += 1
                error = {
                    "type": "Error",
                    "variant": "SchemaError",
                    "description": f"unknown message type {kind!r}",
                    "message": message,
                }
                await ws.send(json.dumps(error))

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
                "sha256": stream.sha256.hexdigest(),
                "created": "1970-01-01T00:00:00.000Z",
                "duration": round(stream.total, 4),
                "channels": stream.channels,
            },
        )
        await session.close(1000, "")


def _endpointing(value: str) -> float | None:
    """The ``endpointing`` query value as seconds; None when off (``false``, ``0``, non-numeric)."""
    return int(value) / 1000 if value.isdigit() and int(value) > 0 else None


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

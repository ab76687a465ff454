"""Built-in adapters, installed as ``voicepool.adapters`` and found through entry points.

Modules: ``websocket`` (generic), ``deepgram`` (ASR), ``elevenlabs`` and ``cartesia`` (TTS),
``provider`` (what those three share, and their raw mode), ``aiohttp_websocket`` (aiohttp sockets),
``http2`` (LLM over HTTP/2), ``rest`` (HTTP/1.1 keep-alive), ``sip`` (pjsua2 registrations).
"""

"""One call's data never reaches another call: servers that keep sending after a release.

Each WebSocket adapter in each lease mode it supports: the first call starts a long answer and
releases its lease mid-stream; the second call's first message must be its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from voicepool import LeaseMode, Pool
from voicepool.adapters.aiohttp_websocket import AiohttpWebSocketAdapter
from voicepool.adapters.cartesia import CartesiaAdapter
from voicepool.adapters.deepgram import DeepgramAdapter, DeepgramOptions, Transcript
from voicepool.adapters.elevenlabs import ElevenLabsAdapter
from voicepool.adapters.websocket import WebSocketAdapter
from voicepool.testing import test_certificates
from voicepool.testing.asr import DeepgramEmulator
from voicepool.testing.tts import CartesiaEmulator, ElevenLabsEmulator, synthesize

from ._util import API_KEY, settings

MAX_MESSAGES = 2000  # a chatty answer is bounded: the server stops by itself


class ChattyServer:
    """``start:<call>`` starts a stream of ``data:<call>:<n>`` every 2 ms; ``stop`` ends it with a
    ``boundary`` message. ``rude``: the stream goes on after the boundary."""

    def __init__(self, *, rude: bool = False) -> None:
        self.rude = rude
        self.accepted = 0
        self.url = ""

    async def _stream(self, ws: ServerConnection, call: str, stopped: asyncio.Event) -> None:
        for n in range(MAX_MESSAGES):
            if stopped.is_set() and not self.rude:
                return
            await ws.send(f"data:{call}:{n}")
            await asyncio.sleep(0.002)

    async def _handler(self, ws: ServerConnection) -> None:
        self.accepted += 1
        tasks: list[asyncio.Task[None]] = []
        stopped = asyncio.Event()
        try:
            async for message in ws:
                if isinstance(message, str) and message.startswith("start:"):
                    stopped.clear()
                    task = asyncio.create_task(self._stream(ws, message[6:], stopped))
                    tasks.append(task)
                elif message == "stop":
                    stopped.set()
                    if not self.rude:
                        await asyncio.gather(*tasks, return_exceptions=True)
                    await ws.send("boundary")
        except ConnectionClosed:
            pass
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[ChattyServer]:
        ctx = test_certificates().server_context(["http/1.1"])
        async with serve(self._handler, "127.0.0.1", 0, ssl=ctx, compression=None) as server:
            port = server.sockets[0].getsockname()[1]
            self.url = f"wss://127.0.0.1:{port}/chat"
            yield self


def generic(server: ChattyServer, **kw: object) -> WebSocketAdapter:
    ca = str(test_certificates().ca_path)
    return WebSocketAdapter(url=server.url, ca_file=ca, close_timeout=0.5, **kw)


async def one_call(pool: Pool[object], call: str, *, leave_mid_stream: bool) -> str:
    """Start an answer, read its first message, and (maybe) leave while it still streams."""
    async with pool.acquire() as lease:
        ws = lease.conn
        await ws.send(f"start:{call}")  # type: ignore[attr-defined]
        first: str = await ws.recv()  # type: ignore[attr-defined]
        if not leave_mid_stream:  # a holder that ends its exchange and reads to the boundary
            await ws.send("stop")  # type: ignore[attr-defined]
            while await ws.recv() != "boundary":  # type: ignore[attr-defined]
                pass
        return first


async def test_generic_adapter_is_single_use_by_default() -> None:
    async with ChattyServer().running() as server:
        ad = generic(server)
        assert ad.lease_mode is LeaseMode.SINGLE_USE
        async with Pool(ad, settings(min_size=1, max_size=1), name="ws") as pool:
            assert pool.lease_mode is LeaseMode.SINGLE_USE
            assert await one_call(pool, "call1", leave_mid_stream=True) == "data:call1:0"
            assert await one_call(pool, "call2", leave_mid_stream=True) == "data:call2:0"
        assert server.accepted >= 2


async def test_exclusive_without_a_boundary_discards_the_socket() -> None:
    async with ChattyServer().running() as server:
        pool_settings = settings(min_size=1, max_size=1, lease_mode="exclusive")
        async with Pool(generic(server), pool_settings, name="ws") as pool:
            assert pool.lease_mode is LeaseMode.EXCLUSIVE
            for n in range(3):
                first = await one_call(pool, f"call{n}", leave_mid_stream=True)
                assert first == f"data:call{n}:0"
            assert pool.stats().closed.get("error", 0) == 3  # each reset refused to vouch
        assert server.accepted >= 3


@pytest.mark.parametrize("leave_mid_stream", [True, False])
async def test_exclusive_reuse_drains_to_the_boundary(leave_mid_stream: bool) -> None:
    async with ChattyServer().running() as server:
        ad = generic(server, reset_message="stop", reset_boundary="^boundary$")
        assert ad.lease_mode is LeaseMode.EXCLUSIVE
        async with Pool(ad, settings(min_size=1, max_size=1), name="ws") as pool:
            for n in range(3):
                first = await one_call(pool, f"call{n}", leave_mid_stream=leave_mid_stream)
                assert first == f"data:call{n}:0"
            assert pool.stats().closed == {}
        assert server.accepted == 1  # one socket, proven clean between the three calls


async def test_a_server_that_sends_past_the_boundary_loses_the_socket() -> None:
    async with ChattyServer(rude=True).running() as server:
        ad = generic(server, reset_message="stop", reset_boundary="^boundary$")
        async with Pool(ad, settings(min_size=1, max_size=1), name="ws") as pool:
            for n in range(3):
                first = await one_call(pool, f"call{n}", leave_mid_stream=True)
                assert first == f"data:call{n}:0"
            assert pool.stats().closed.get("error", 0) == 3
        assert server.accepted >= 3


def test_a_boundary_must_be_a_regular_expression() -> None:
    with pytest.raises(ValueError, match="regular expression"):
        WebSocketAdapter(url="wss://127.0.0.1:1/", reset_boundary="(")


# -- provider adapters ---------------------------------------------------------------------------


@pytest.mark.parametrize("reuse", [False, True])
async def test_deepgram_results_of_a_released_stream_never_reach_the_next(reuse: bool) -> None:
    # Results trail the audio by 30 ms each: the first caller releases with results in flight,
    # and its own Finalize answered only after the release.
    emulator = DeepgramEmulator(tls=True, api_key=API_KEY, idle_timeout=None, result_delay=0.03)
    async with emulator as server:
        ad = DeepgramAdapter(url=server.url, api_key=API_KEY, ca_file=server.ca_file, reuse=reuse)
        async with Pool(ad, settings(min_size=1, max_size=1), name="asr") as pool:
            mode = LeaseMode.EXCLUSIVE if reuse else LeaseMode.SINGLE_USE
            assert pool.lease_mode is mode
            async with pool.acquire() as lease:
                await lease.conn.send_audio(b"first")
                await lease.conn.finalize()
                await lease.conn.send_audio(b"caller")
            async with pool.acquire() as lease:
                await lease.conn.send_audio(b"second")
                event = await lease.conn.recv()
                assert isinstance(event, Transcript)
                assert event.text == "second"
            if reuse:
                assert server.accepted == 1


async def test_elevenlabs_audio_of_a_released_context_never_reaches_the_next() -> None:
    async with ElevenLabsEmulator(tls=True, api_key=API_KEY, idle_timeout=None) as server:
        server.chunk_interval = 0.005  # the first answer streams for about a second
        ad = ElevenLabsAdapter(url=server.url, api_key=API_KEY, ca_file=server.ca_file)
        async with Pool(ad, settings(min_size=1, max_size=1), name="tts") as pool:
            assert pool.lease_mode is LeaseMode.MULTIPLEXED
            async with pool.acquire() as lease:
                ctx = lease.conn.context(lease.stream_id)
                await ctx.send_text("a" * 6000)
                await ctx.end()  # generation goes on after the release (close_context sent)
                assert await anext(ctx.audio())
            async with pool.acquire() as lease:
                ctx = lease.conn.context(lease.stream_id)
                text = "Second call. " * 20  # streams while the first answer still does
                audio = b"".join([c async for c in ctx.synthesize(text)])
                assert audio == synthesize(text, server.bytes_per_char)
                assert lease.conn.dropped > 0  # the first call's audio arrived, and went nowhere
        assert server.accepted == 1


async def test_cartesia_audio_of_a_released_context_never_reaches_the_next() -> None:
    async with CartesiaEmulator(tls=True, api_key=API_KEY) as server:
        server.chunk_interval = 0.005
        ad = CartesiaAdapter(url=server.url, api_key=API_KEY, ca_file=server.ca_file)
        async with Pool(ad, settings(min_size=1, max_size=1), name="tts") as pool:
            async with pool.acquire() as lease:
                ctx = lease.conn.context(lease.stream_id)
                await ctx.send_text("b" * 6000)
                assert await anext(ctx.audio())
            async with pool.acquire() as lease:
                ctx = lease.conn.context(lease.stream_id)
                text = "Second call. " * 20
                audio = b"".join([c async for c in ctx.synthesize(text)])
                assert audio == synthesize(text, server.bytes_per_char)
        assert server.accepted == 1


async def test_deepgram_raw_results_of_a_released_stream_never_reach_the_next() -> None:
    emulator = DeepgramEmulator(tls=True, api_key=API_KEY, idle_timeout=None, result_delay=0.03)
    async with emulator as server:
        opts = DeepgramOptions(url=server.url, api_key=API_KEY, ca_file=server.ca_file, raw=True)
        ad = DeepgramAdapter.from_options(opts)
        async with Pool(ad, settings(min_size=1, max_size=1), name="asr") as pool:
            assert pool.lease_mode is LeaseMode.SINGLE_USE
            async with pool.acquire() as lease:
                await lease.conn.send(b"first caller")  # leaves with results in flight
            async with pool.acquire() as lease:
                await lease.conn.send(b"second")
                result = json.loads(await lease.conn.recv())
                assert result["channel"]["alternatives"][0]["transcript"] == "second"


async def test_aiohttp_sockets_are_single_use() -> None:
    async with ChattyServer().running() as server:
        ca = str(test_certificates().ca_path)
        ad = AiohttpWebSocketAdapter(endpoint={"url": server.url, "ca_file": ca})
        async with Pool(ad, settings(min_size=1, max_size=1), name="ws") as pool:
            assert pool.lease_mode is LeaseMode.SINGLE_USE
            for n in range(2):
                async with pool.acquire() as lease:
                    await lease.conn.send_str(f"start:call{n}")
                    assert (await lease.conn.receive()).data == f"data:call{n}:0"
        assert server.accepted >= 2
    with pytest.raises(ValueError, match="single_use"):
        AiohttpWebSocketAdapter(endpoint={"url": server.url, "reset_boundary": "x"})

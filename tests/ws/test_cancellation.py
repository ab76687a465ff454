"""Cancellation at every await the WebSocket adapters add to connect, reset and close: nothing is
left open, and the pool never lends a socket whose reset did not finish."""

from __future__ import annotations

import asyncio
import gc

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from voicepool import Pool
from voicepool.adapters.aiohttp_websocket import AiohttpWebSocketAdapter
from voicepool.adapters.deepgram import DeepgramAdapter
from voicepool.adapters.provider import RawWebSocketAdapter
from voicepool.adapters.websocket import WebSocketAdapter
from voicepool.testing import FaultProxy, test_certificates, wait_until
from voicepool.testing.asr import DeepgramEmulator

from ._util import API_KEY, settings


async def test_cancelled_reset_discards_the_socket() -> None:
    flush_seen = asyncio.Event()

    async def never_a_boundary(ws: ServerConnection) -> None:
        try:
            async for message in ws:
                if message == "flush":
                    flush_seen.set()  # ...and the boundary never comes
        except ConnectionClosed:
            pass

    ctx = test_certificates().server_context(["http/1.1"])
    async with serve(never_a_boundary, "127.0.0.1", 0, ssl=ctx) as server:
        port = server.sockets[0].getsockname()[1]
        ad = WebSocketAdapter(
            url=f"wss://127.0.0.1:{port}/",
            ca_file=str(test_certificates().ca_path),
            reset_message="flush",
            reset_boundary="^done$",
            reset_timeout=30,
        )
        async with Pool(ad, settings(min_size=1, max_size=1), name="ws") as pool:
            first: list[object] = []

            async def call() -> None:
                async with pool.acquire() as lease:
                    first.append(lease.conn)

            task = asyncio.create_task(call())
            await flush_seen.wait()  # the release is inside reset(), waiting on recv()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await wait_until(lambda: pool.stats().in_use == 0, what="the lease released")
            await wait_until(lambda: sum(pool.stats().closed.values()) == 1, what="discarded")
            await wait_until(lambda: pool.stats().idle == 1, what="a fresh socket")
            async with pool.acquire() as lease:
                assert lease.conn is not first[0]


async def test_cancelled_raw_close_aborts_the_socket() -> None:
    # Results take 1 s: the close waits for the server's own close after CloseStream.
    emulator = DeepgramEmulator(tls=True, api_key=API_KEY, idle_timeout=None, result_delay=1)
    async with emulator as server:
        ad = RawWebSocketAdapter(
            DeepgramAdapter(
                url=server.url, api_key=API_KEY, ca_file=server.ca_file, close_timeout=30
            )
        )
        ws = await ad.connect()
        await ws.send(b"words")
        closing = asyncio.create_task(ad.close(ws))
        await wait_until(lambda: server.close_streams == 1, what="CloseStream sent")
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        await wait_until(lambda: ws.state is State.CLOSED, what="the transport aborted")
        await server.wait_sessions(0, timeout=10)


async def test_cancelled_aiohttp_connect_leaves_nothing_open() -> None:
    async with (
        DeepgramEmulator(tls=True, api_key=API_KEY) as server,
        FaultProxy("127.0.0.1", server.port) as proxy,
    ):
        proxy.black_hole()  # TCP accepted, the TLS handshake never answered
        ad = AiohttpWebSocketAdapter(
            provider="deepgram",
            endpoint={
                "url": f"wss://127.0.0.1:{proxy.port}",
                "api_key": API_KEY,
                "ca_file": server.ca_file,
                "open_timeout": 30,
            },
        )
        opening = asyncio.create_task(ad.connect())
        await proxy.wait_active(1)
        opening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opening
        proxy.black_hole(False)  # the proxy reads again, and sees the client's close
        await proxy.wait_active(0)  # the socket (and its session) closed
        gc.collect()  # an unclosed ClientSession would warn here (warnings are errors)


async def test_cancelled_aiohttp_close_still_closes_the_session() -> None:
    emulator = DeepgramEmulator(tls=True, api_key=API_KEY, idle_timeout=None, result_delay=1)
    async with emulator as server:
        ad = AiohttpWebSocketAdapter(
            provider="deepgram",
            endpoint={
                "url": server.url,
                "api_key": API_KEY,
                "ca_file": server.ca_file,
                "close_timeout": 30,
            },
        )
        ws = await ad.connect()
        await ws.send_bytes(b"words")
        closing = asyncio.create_task(ad.close(ws))
        await wait_until(lambda: server.close_streams == 1, what="CloseStream sent")
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        # Closed before the server's (delayed) answer could have closed it.
        await wait_until(
            lambda: ws.get_extra_info("peername") is None, timeout=0.8, what="the transport closed"
        )
        await server.wait_sessions(0, timeout=10)
        gc.collect()

"""The official ``cartesia`` 4.x SDK against CartesiaEmulator over TLS: contexts (push,
no_more_inputs, receive), cancel, Bearer auth and the SDK's Cartesia-Version, every response
validated against the SDK's WebsocketResponse; bad key, an unserved version, the per-context 429."""

from __future__ import annotations

from typing import Any

import pytest
from cartesia import AsyncCartesia
from cartesia.types import WebsocketResponse
from cartesia.types.websocket_response import Chunk, Done, Error
from pydantic import TypeAdapter
from websockets.exceptions import ConnectionClosed, InvalidStatus

from voicepool.adapters.cartesia import API_VERSION
from voicepool.testing import CartesiaEmulator, test_certificates
from voicepool.testing.tts import synthesize

from .conftest import BAD_KEY, KEY, _no_extras

RESPONSES: TypeAdapter[Any] = TypeAdapter(WebsocketResponse)
FORMAT = {"container": "raw", "encoding": "pcm_s16le", "sample_rate": 16000}
VOICE = {"mode": "id", "id": "a0e99841-438c-4a64-b679-ae501e7d6091"}


def client(server: CartesiaEmulator, key: str = KEY) -> AsyncCartesia:
    return AsyncCartesia(
        api_key=key, base_url=server.url.replace("wss", "https"), websocket_base_url=server.url
    )


def options() -> Any:
    return {"ssl": test_certificates().client_context()}


def check(response: Any) -> Any:
    parsed = RESPONSES.validate_python(response.to_dict(), strict=True)
    _no_extras(parsed)
    return parsed


async def test_contexts_and_cancel() -> None:
    async with CartesiaEmulator(tls=True, api_key=KEY, versions=[API_VERSION]) as server:
        server.chunk_interval = 0.01
        async with client(server).tts.websocket_connect(
            websocket_connection_options=options()
        ) as conn:
            ctx = conn.context(model_id="sonic-3", voice=VOICE, output_format=FORMAT)
            conn._dispatch_listener()
            await ctx.push("Hello ")
            await ctx.push("there.")
            await ctx.no_more_inputs()
            audio = b""
            responses = [check(r) async for r in ctx.receive()]
            for r in responses:
                if isinstance(r, Chunk):
                    audio += r.audio or b""
            assert isinstance(responses[-1], Done)
            assert audio == synthesize("Hello there.", server.bytes_per_char)
            long = conn.context(model_id="sonic-3", voice=VOICE, output_format=FORMAT)
            await long.push("x" * 2000)
            first = await anext(aiter(long.receive()))
            assert isinstance(check(first), Chunk)
            await long.cancel()
        await server.wait_sessions(0)  # the socket closed after the cancel was read
        assert server.cancels == 1
    assert server.versions_seen == {API_VERSION: 1}  # the adapter's version is the SDK's


async def test_bad_key_unserved_version_and_concurrency_429() -> None:
    async with CartesiaEmulator(tls=True, api_key=KEY, max_concurrency=1) as server:
        with pytest.raises(InvalidStatus) as bad:
            async with client(server, BAD_KEY).tts.websocket_connect(
                websocket_connection_options=options()
            ):
                pass
        assert bad.value.response.status_code == 401
        with pytest.raises(InvalidStatus) as old:
            async with client(server).tts.websocket_connect(
                extra_headers={"cartesia-version": "2023-01-01"},
                websocket_connection_options=options(),
            ):
                pass
        assert old.value.response.status_code == 400
        async with client(server).tts.websocket_connect(
            websocket_connection_options=options()
        ) as conn:
            conn._dispatch_listener()
            a = conn.context(model_id="sonic-3", voice=VOICE, output_format=FORMAT)
            b = conn.context(model_id="sonic-3", voice=VOICE, output_format=FORMAT)
            server.chunk_interval = 0.05
            await a.push("x" * 500)
            await b.push("y")
            error = check(await anext(aiter(b.receive())))
            assert isinstance(error, Error)
            assert error.status_code == 429
            await a.cancel()


async def test_sdk_bearer_auth_is_accepted() -> None:
    """Issue 13 item 1: the 4.x SDK sends only ``Authorization: Bearer <key>``."""
    async with (
        CartesiaEmulator(tls=True, api_key=KEY) as server,
        client(server).tts.websocket_connect(websocket_connection_options=options()) as conn,
    ):
        conn._dispatch_listener()
        ctx = conn.context(model_id="sonic-3", voice=VOICE, output_format=FORMAT)
        await ctx.push("Hi.")
        await ctx.no_more_inputs()
        assert isinstance([check(r) async for r in ctx.receive()][-1], Done)
    assert server.accepted == 1


async def test_adapter_sends_the_version_the_sdk_sends() -> None:
    """Issue 13 item 15: an emulator serving only the SDK's default version accepts the
    adapter, so a drift between the two fails here."""
    from voicepool import Pool
    from voicepool.adapters.cartesia import CartesiaAdapter

    sdk_version = AsyncCartesia(api_key=KEY).default_headers["cartesia-version"]
    assert isinstance(sdk_version, str)  # (typed ``str | Omit``: a header can be omitted)
    assert sdk_version == API_VERSION
    async with CartesiaEmulator(tls=True, api_key=KEY, versions=[sdk_version]) as server:
        adapter = CartesiaAdapter(url=server.url, api_key=KEY, ca_file=server.ca_file)
        async with Pool(adapter, name="tts") as pool, pool.acquire() as lease:
            ctx = lease.conn.context(lease.stream_id)
            audio = b"".join([chunk async for chunk in ctx.synthesize("Hello.")])
        assert audio == synthesize("Hello.", server.bytes_per_char)
        assert set(server.versions_seen) == {sdk_version}  # (the pool warms several sockets)


async def test_idle_socket_is_closed() -> None:
    async with (
        CartesiaEmulator(tls=True, api_key=KEY, idle_timeout=0.3) as server,
        client(server).tts.websocket_connect(websocket_connection_options=options()) as conn,
    ):
        with pytest.raises(ConnectionClosed) as closed:
            await conn.recv()
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1000
    assert server.idle_closes == 1

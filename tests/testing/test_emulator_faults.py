"""The WebSocket emulators' fault controls, seen from a plain ``websockets`` client."""

from __future__ import annotations

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from voicepool.testing import DeepgramEmulator


async def test_hang_up_on_accept_closes_each_socket_right_after_its_upgrade() -> None:
    async with DeepgramEmulator(api_key=None, idle_timeout=None) as server:
        server.hang_up_on_accept(1013, "busy")
        for _ in range(3):
            async with connect(server.url + "/v1/listen") as ws:  # the upgrade succeeds
                with pytest.raises(ConnectionClosed) as info:
                    await ws.recv()
            assert info.value.rcvd is not None
            assert (info.value.rcvd.code, info.value.rcvd.reason) == (1013, "busy")
        assert server.accepted == 3
        await server.wait_sessions(0)
        server.hang_up_on_accept(None)  # back to serving
        async with connect(server.url + "/v1/listen") as ws:
            await server.wait_sessions(1)
            await ws.send('{"type": "KeepAlive"}')
        assert server.close_codes[1013] == 3

"""A real nginx as a TLS WebSocket reverse proxy with a short proxy_read_timeout.

Load balancers and reverse proxies close WebSockets that carry nothing for a while (nginx:
``proxy_read_timeout``, 60 s by default, 1 s here). The pool's pings keep sockets open through it;
without them nginx closes every idle socket and the pool has to reconnect.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tests.peers.nginx import Nginx, free_port, nginx_available
from voicepool import Pool
from voicepool.adapters.deepgram import DeepgramAdapter
from voicepool.testing import test_certificates, wait_until
from voicepool.testing.asr import DeepgramEmulator

from ._util import API_KEY, settings

pytestmark = [
    pytest.mark.needs_bin,
    pytest.mark.skipif(not nginx_available(), reason="nginx is not installed"),
]

READ_TIMEOUT = 1.0


def ws_proxy_block(listen: int, upstream: int) -> str:
    certs = test_certificates()
    return f"""
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    server {{
        listen 127.0.0.1:{listen} ssl;
        ssl_certificate {certs.cert_path};
        ssl_certificate_key {certs.key_path};
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_read_timeout {READ_TIMEOUT:g}s;
            proxy_send_timeout {READ_TIMEOUT:g}s;
        }}
    }}
    """


@pytest.fixture
async def upstream() -> AsyncIterator[DeepgramEmulator]:
    # Plain ws behind nginx; no provider idle close, so only nginx's timeout is in play.
    async with DeepgramEmulator(api_key=API_KEY, idle_timeout=None) as server:
        yield server


@pytest.fixture
async def nginx(upstream: DeepgramEmulator) -> AsyncIterator[Nginx]:
    port = free_port()
    async with Nginx(ws_proxy_block(port, upstream.port)) as server:
        yield server


def adapter(nginx: Nginx, **kw: object) -> DeepgramAdapter:
    opts: dict[str, object] = {
        "url": f"wss://127.0.0.1:{nginx.ports[0]}",
        "api_key": API_KEY,
        "ca_file": str(test_certificates().ca_path),
        "reuse": True,
        "close_timeout": 0.5,
    }
    opts.update(kw)
    return DeepgramAdapter(**opts)


async def test_pool_keepalive_holds_sockets_open_through_nginx(
    nginx: Nginx, upstream: DeepgramEmulator
) -> None:
    pool_settings = settings(min_size=2, max_size=2, ping_interval=READ_TIMEOUT / 4)
    async with Pool(adapter(nginx), pool_settings, name="asr") as pool:
        await asyncio.sleep(READ_TIMEOUT * 3)  # the thing under test is the passage of time
        assert pool.stats().closed == {}
        assert upstream.accepted == 2  # the same two sockets all along
        async with pool.acquire() as lease:
            await lease.conn.send_audio(b"through nginx")
            await lease.conn.finalize()
            async with asyncio.timeout(5):
                event = await lease.conn.recv()
            assert event.text == "through nginx"


async def test_without_keepalive_nginx_closes_idle_sockets(
    nginx: Nginx, upstream: DeepgramEmulator
) -> None:
    quiet = adapter(nginx, keepalive=False)
    # Pings every 30 s (Deepgram's max_idle/2 would be 5 s): nothing crosses nginx while idle.
    async with Pool(quiet, settings(min_size=2, max_size=2, ping_interval=30), name="asr") as pool:
        await wait_until(
            lambda: pool.stats().closed.get("remote_closed", 0) >= 2,
            timeout=READ_TIMEOUT * 5,
            what="nginx to close the idle sockets",
        )
        await wait_until(lambda: upstream.accepted >= 4, what="the pool to reconnect")

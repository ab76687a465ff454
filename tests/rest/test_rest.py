"""The REST pool (aiohttp, HTTP/1.1 keep-alive) against the REST emulator."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from voicepool import ConnectError, Pool, PoolSettings
from voicepool.adapters.rest import RestAdapter, RestConnection
from voicepool.testing import wait_until
from voicepool.testing.rest import RestEmulator
from voicepool.testing.tls import test_certificates

KEY = "crm-secret-key"


def rest_settings(**kw: Any) -> PoolSettings:
    base: dict[str, Any] = {"min_size": 2, "max_size": 2, "backoff_initial": 0.05}
    base.update(kw)
    return PoolSettings(**base)


@pytest.fixture
async def crm() -> AsyncIterator[RestEmulator]:
    async with RestEmulator(api_key=KEY) as emu:
        yield emu


@pytest.fixture
async def rest_pool(crm: RestEmulator) -> AsyncIterator[Pool[RestConnection]]:
    adapter = RestAdapter(base_url=crm.url, api_key=KEY, health_path="/health")
    async with Pool(adapter, rest_settings(), name="crm") as pool:
        yield pool


async def test_connections_open_at_boot_and_are_reused(
    crm: RestEmulator, rest_pool: Pool[RestConnection]
) -> None:
    assert crm.connections_accepted == 2  # both opened by the warm-up, before any call
    for i in range(20):
        async with rest_pool.acquire() as lease:
            if i % 2:
                async with lease.conn.get("/v1/contacts", params={"phone": "+15550001"}) as r:
                    assert r.status == 200
                    assert (await r.json())["contacts"][0]["id"] == "c1"
            else:
                booking = await lease.conn.json("POST", "/v1/calendar/bookings", json={"slot": i})
                assert booking["slot"] == i
    assert crm.connections_accepted == 2
    assert rest_pool.stats().connects == 2


async def test_connections_closed_by_the_server_are_replaced(
    crm: RestEmulator, rest_pool: Pool[RestConnection]
) -> None:
    assert crm.close_idle() == 2
    # The pool hears each socket close and reopens (with the warm-up) before the next call.
    await wait_until(lambda: rest_pool.stats().closed.get("remote_closed") == 2)
    await wait_until(lambda: crm.connections_accepted == 4 and rest_pool.stats().size == 2)
    for _ in range(4):
        async with rest_pool.acquire() as lease:
            tool = await lease.conn.json("POST", "/v1/tools/lookup", json={"q": "x"})
            assert tool == {"tool": "lookup", "arguments": {"q": "x"}, "ok": True}
    assert crm.connections_accepted == 4


async def test_server_keepalive_timeout_is_survived() -> None:
    async with RestEmulator(keepalive_timeout=0.2) as crm:
        adapter = RestAdapter(base_url=crm.url, warmup_path="/health", warmup_method="GET")
        async with Pool(adapter, rest_settings(min_size=1, max_size=1), name="crm") as pool:
            await wait_until(lambda: crm.connections_accepted >= 2)  # closed idle, reopened
            async with pool.acquire() as lease, lease.conn.get("/v1/calendar/slots") as r:
                assert r.status == 200
            assert pool.stats().closed.get("remote_closed", 0) >= 1


async def test_health_requests_keep_the_same_socket(crm: RestEmulator) -> None:
    adapter = RestAdapter(base_url=crm.url, api_key=KEY, health_path="/health")
    settings = rest_settings(min_size=1, max_size=1, ping_interval=0.05, ping_timeout=0.05)
    async with Pool(adapter, settings, name="crm"):
        await wait_until(lambda: crm.requests["/health"] >= 3)
    assert crm.connections_accepted == 1


async def test_dns_answer_is_shared_by_all_connections(crm: RestEmulator) -> None:
    adapter = RestAdapter(base_url=f"http://localhost:{crm.port}", api_key=KEY)
    async with Pool(adapter, rest_settings(min_size=3, max_size=3), name="crm") as pool:
        assert pool.stats().size == 3
    assert adapter.dns_lookups == 1


async def test_https_with_http11_alpn() -> None:
    certs = test_certificates()
    async with RestEmulator(ssl_context=certs.server_context(["http/1.1"])) as crm:
        adapter = RestAdapter(base_url=crm.url, ca_file=str(certs.ca_path), health_path="/health")
        pool = Pool(adapter, rest_settings(min_size=1, max_size=1), name="crm")
        async with pool, pool.acquire() as lease, lease.conn.get("/health") as r:
            assert (await r.json())["status"] == "ok"
        assert crm.connections_accepted == 1


async def test_rejected_credentials_are_fatal(crm: RestEmulator) -> None:
    adapter = RestAdapter(base_url=crm.url, api_key="wrong-key", warmup_path="/v1/contacts")
    with pytest.raises(ConnectError, match="HTTP 401") as info:
        await adapter.connect()
    assert info.value.fatal
    assert "wrong-key" not in str(info.value)
    assert "wrong-key" not in adapter.describe()
    assert "wrong-key" not in repr(adapter.options)


async def test_untrusted_certificate_is_fatal() -> None:
    certs = test_certificates()
    async with RestEmulator(ssl_context=certs.server_context(["http/1.1"])) as crm:
        adapter = RestAdapter(base_url=crm.url)  # system trust store: the test CA is unknown
        with pytest.raises(ConnectError, match="certificate") as info:
            await adapter.connect()
        assert info.value.fatal


async def test_absolute_urls_are_refused(rest_pool: Pool[RestConnection]) -> None:
    async with rest_pool.acquire() as lease:
        with pytest.raises(ValueError, match="pass a path"):
            lease.conn.get("https://elsewhere.example/steal")

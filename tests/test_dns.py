"""The shared DNS cache (voicepool.dns) under real pools and real sockets.

Names resolve through a counting seam (a zone the test edits) or through a real DNS server on
127.0.0.1 (dnslib) queried by c-ares; the connections are real TCP sockets to servers on
127.0.0.1 and 127.0.0.2 (the whole of 127.0.0.0/8 is loopback), so "which address did this
connection go to" is a fact a server can see.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from dnslib import QTYPE, RCODE, RR, A, DNSRecord
from websockets.asyncio.server import Server, ServerConnection, serve

from voicepool import Pool, PoolSettings
from voicepool.adapters.http2 import Http2Adapter
from voicepool.adapters.rest import RestAdapter
from voicepool.adapters.websocket import WebSocketAdapter
from voicepool.dns import Answer, Resolver, aiodns_lookup, set_default_resolver
from voicepool.testing import LlmEmulator, RestEmulator

HOST = "svc.voicepool.test"
SHORT = "short.voicepool.test"
SETTINGS = PoolSettings(
    min_size=8, max_size=8, backoff_initial=0.05, backoff_max=0.1, ping_interval=30
)


class Zone:
    """The counting resolver seam: the addresses of every name, edited by the test."""

    def __init__(self, addresses: list[str], ttl: float = 300.0) -> None:
        self.addresses = addresses
        self.ttl = ttl
        self.lookups = 0

    async def __call__(self, host: str) -> list[Answer]:
        self.lookups += 1
        return [Answer(socket.AF_INET, ip, self.ttl) for ip in self.addresses]


async def eventually(condition: Callable[[], bool], what: Any, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)  # pool stats have no change event: poll, bounded
    pytest.fail(f"timed out waiting for {what() if callable(what) else what}")


class TwoAddressWs:
    """A WebSocket server on 127.0.0.1 and 127.0.0.2, one port; knows where each client came."""

    def __init__(self) -> None:
        self.port = 0
        self.open: list[ServerConnection] = []
        self._servers: list[Server] = []

    async def _handler(self, ws: ServerConnection) -> None:
        self.open.append(ws)
        try:
            await ws.wait_closed()
        finally:
            self.open.remove(ws)

    async def __aenter__(self) -> TwoAddressWs:
        first = await serve(self._handler, "127.0.0.1", 0)
        self.port = first.sockets[0].getsockname()[1]
        second = await serve(self._handler, "127.0.0.2", self.port)
        self._servers = [first, second]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for server in self._servers:
            server.close()
            await server.wait_closed()

    def by_address(self) -> dict[str, int]:
        found: dict[str, int] = {}
        for ws in self.open:
            ip = ws.local_address[0]
            found[ip] = found.get(ip, 0) + 1
        return found


@pytest.fixture
def zone() -> Zone:
    # 127.0.0.2 first: happy eyeballs connects to the first address that answers.
    return Zone(["127.0.0.2", "127.0.0.1"])


@pytest.fixture
async def resolver(zone: Zone) -> AsyncIterator[Resolver]:
    shared = Resolver(lookup=zone)
    set_default_resolver(shared)
    try:
        yield shared
    finally:
        await shared.aclose()
        set_default_resolver(None)


async def test_websocket_boot_refill_and_an_address_that_leaves_dns(
    zone: Zone, resolver: Resolver
) -> None:
    async with TwoAddressWs() as server:
        adapter = WebSocketAdapter(url=f"ws://{HOST}:{server.port}/")
        async with Pool(adapter, SETTINGS, name="asr") as pool:
            assert pool.stats().size == 8
            assert zone.lookups == 1  # 8 connections, one lookup
            assert server.by_address() == {"127.0.0.2": 8}

            # A loss: the server drops one socket; the refill finds the answer cached.
            await server.open[0].close()
            await eventually(lambda: pool.stats().connects == 9, "the refill")
            await eventually(lambda: pool.stats().size == 8, "a full pool")
            assert zone.lookups == 1

            # 127.0.0.2 leaves DNS: the next refresh says so, every connection to it is
            # retired (all are idle), and the replacements go to 127.0.0.1, the cache fresh.
            zone.addresses = ["127.0.0.1"]
            await resolver.refresh(HOST)
            await eventually(lambda: server.by_address() == {"127.0.0.1": 8}, "the move")
            await eventually(lambda: pool.stats().size == 8, "a full pool again")
            assert zone.lookups == 2  # the refresh; the 8 reconnects paid none


async def test_a_lease_is_not_interrupted_by_its_address_leaving(
    zone: Zone, resolver: Resolver
) -> None:
    async with TwoAddressWs() as server:
        adapter = WebSocketAdapter(url=f"ws://{HOST}:{server.port}/")
        settings = SETTINGS.model_copy(update={"min_size": 1, "max_size": 2})
        async with Pool(adapter, settings, name="asr") as pool:
            async with pool.acquire() as lease:
                zone.addresses = ["127.0.0.1"]
                await resolver.refresh(HOST)
                await lease.conn.ping()  # the call's socket still works
                assert lease.conn.remote_address[0] == "127.0.0.2"
            await eventually(
                lambda: server.by_address() == {"127.0.0.1": 1},
                lambda: f"the move ({server.by_address()}, {pool.stats()})",
            )


async def test_the_background_refresh_keeps_a_watched_name_fresh(zone: Zone) -> None:
    zone.ttl = 0.2
    resolver = Resolver(lookup=zone, min_ttl=0.05)
    set_default_resolver(resolver)
    try:
        async with TwoAddressWs() as server:
            adapter = WebSocketAdapter(url=f"ws://{HOST}:{server.port}/")
            settings = SETTINGS.model_copy(update={"min_size": 2, "max_size": 2})
            async with Pool(adapter, settings, name="asr") as pool:
                assert zone.lookups == 1
                # No connect happens; the name is looked up again by itself before it expires.
                await eventually(lambda: zone.lookups >= 3, "two background refreshes")
                assert pool.stats().connects == 2
                fresh = resolver.listed(HOST)
                assert fresh == frozenset({"127.0.0.2", "127.0.0.1"})
    finally:
        await resolver.aclose()
        set_default_resolver(None)


@pytest.mark.parametrize("kind", ["rest", "http2"])
async def test_rest_and_http2_boot_8_connections_on_one_lookup(
    kind: str, zone: Zone, resolver: Resolver
) -> None:
    zone.addresses = ["127.0.0.1"]
    adapter: Any
    if kind == "rest":
        async with RestEmulator() as rest:
            adapter = RestAdapter(base_url=f"http://{HOST}:{rest.port}")
            async with Pool(adapter, SETTINGS, name="crm") as pool:
                assert pool.stats().size == 8
            assert rest.connections_accepted == 8
    else:
        async with LlmEmulator(tls=False) as llm:
            adapter = Http2Adapter(base_url=f"http://{HOST}:{llm.port}", max_streams=1)
            async with Pool(adapter, SETTINGS, name="llm") as pool:
                assert pool.stats().size == 8
            assert llm.connections_accepted == 8
    assert zone.lookups == 1


async def test_happy_eyeballs_moves_past_a_dead_address(zone: Zone, resolver: Resolver) -> None:
    async with TwoAddressWs() as server:
        zone.addresses = ["127.0.0.3", "127.0.0.1"]  # nothing listens on 127.0.0.3
        sock = await resolver.connect(HOST, server.port)
        try:
            assert sock.getpeername() == ("127.0.0.1", server.port)
        finally:
            sock.close()


# -- a real DNS server -------------------------------------------------------------------------


class DnsStub(asyncio.DatagramProtocol):
    """An authoritative-only DNS server on 127.0.0.1 (UDP): A records from ``records``."""

    def __init__(self, records: dict[str, list[str]], ttl: dict[str, int]) -> None:
        self.records = records
        self.ttl = ttl
        self.queries = 0
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        request = DNSRecord.parse(data)
        reply = request.reply()
        name = str(request.q.qname).rstrip(".")
        self.queries += 1
        if name not in self.records:
            reply.header.rcode = RCODE.NXDOMAIN
        elif request.q.qtype == QTYPE.A:
            for ip in self.records[name]:
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(ip), ttl=self.ttl[name]))
        self.transport.sendto(reply.pack(), addr)


async def test_ttls_from_a_real_dns_server() -> None:
    loop = asyncio.get_running_loop()
    stub = DnsStub({HOST: ["127.0.0.2", "127.0.0.1"]}, ttl={HOST: 120, SHORT: 1})
    transport, _ = await loop.create_datagram_endpoint(lambda: stub, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    try:
        # Generous timeout and tries: on a loaded machine a UDP answer can be late.
        lookup = aiodns_lookup(
            ["127.0.0.1"], udp_port=port, tcp_port=port, lookups="b", timeout=5.0, tries=4
        )
        answers = await lookup(HOST)
        assert {(a.address, a.ttl) for a in answers} == {("127.0.0.2", 120), ("127.0.0.1", 120)}
        clock = [0.0]
        resolver = Resolver(lookup=lookup, clock=lambda: clock[0])
        await resolver.resolve(HOST)
        clock[0] = 119.0
        await resolver.resolve(HOST)
        assert resolver.lookups == 1  # within the record's TTL
        clock[0] = 121.0
        await resolver.resolve(HOST)
        assert resolver.lookups == 2  # expired: asked again
        with pytest.raises(OSError):
            await resolver.resolve("missing.voicepool.test")
        await resolver.aclose()

        # A watched name is refreshed in the background; a dropped address is reported.
        # (c-ares caches answers for their TTL too: this record's is 1 s.)
        stub.records[SHORT] = ["127.0.0.2", "127.0.0.1"]
        resolver = Resolver(lookup=lookup, min_ttl=0.2)
        heard = asyncio.Event()
        listed: list[frozenset[str]] = []
        await resolver.resolve(SHORT)

        def dropped(now: frozenset[str]) -> None:
            listed.append(now)
            heard.set()

        resolver.watch(SHORT, dropped)
        stub.records[SHORT] = ["127.0.0.1"]
        await asyncio.wait_for(heard.wait(), 10)
        assert listed == [frozenset({"127.0.0.1"})]
        await resolver.aclose()
    finally:
        transport.close()

"""FaultProxy against a real TCP echo server on 127.0.0.1: each fault, observed from the client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from voicepool.testing.faultproxy import FaultProxy


class EchoServer:
    """Echoes every byte; counts connections; half-closes when the client does."""

    def __init__(self) -> None:
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            try:
                await writer.wait_closed()
            except ConnectionError:
                pass

    async def __aenter__(self) -> EchoServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for w in list(self._writers):
            w.transport.abort()
        await self._server.wait_closed()
        await asyncio.sleep(0)


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    async with EchoServer() as server:
        yield server


async def _open(proxy: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(proxy.host, proxy.port)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await writer.wait_closed()
    except ConnectionError:
        pass


async def test_passthrough_and_counters(echo: EchoServer) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        r, w = await _open(proxy)
        w.write(b"hello")
        assert await r.readexactly(5) == b"hello"
        assert proxy.accepted == 1
        assert proxy.active == 1
        assert proxy.bytes_up == 5
        assert proxy.bytes_down == 5
        await _close(w)
        await proxy.wait_active(0)
    assert echo.connections == 1


async def test_latency_is_pipelined_not_serialized(echo: EchoServer) -> None:
    # 10 chunks sent 10 ms apart with 50 ms each way: pipelined, the last echo comes back about
    # 90 + 100 ms after the first send; serialized it would take 10 * 100 ms.
    async with FaultProxy("127.0.0.1", echo.port, latency=0.05) as proxy:
        r, w = await _open(proxy)
        w.write(b"x")
        await r.readexactly(1)  # pay the emulated TCP handshake first
        t0 = time.monotonic()
        for i in range(10):
            w.write(bytes([65 + i]))
            await asyncio.sleep(0.01)
        got = await r.readexactly(10)
        elapsed = time.monotonic() - t0
        assert got == b"ABCDEFGHIJ"  # order preserved
        assert 0.18 <= elapsed < 0.6, elapsed
        await _close(w)


async def test_first_byte_pays_the_handshake_round_trip(echo: EchoServer) -> None:
    async with FaultProxy("127.0.0.1", echo.port, up_latency=0.03, down_latency=0.05) as proxy:
        t0 = time.monotonic()
        r, w = await _open(proxy)
        w.write(b"a")
        await r.readexactly(1)
        first = time.monotonic() - t0  # SYN/SYN-ACK (80 ms) + echo round trip (80 ms)
        t1 = time.monotonic()
        w.write(b"b")
        await r.readexactly(1)
        second = time.monotonic() - t1
        assert 0.15 <= first < 0.5, first
        assert 0.075 <= second < 0.3, second
        proxy.set_latency(0.0)
        t2 = time.monotonic()
        w.write(b"c")
        await r.readexactly(1)
        assert time.monotonic() - t2 < 0.05
        await _close(w)


async def test_bandwidth_cap(echo: EchoServer) -> None:
    async with FaultProxy("127.0.0.1", echo.port, bandwidth=100_000) as proxy:
        r, w = await _open(proxy)
        t0 = time.monotonic()
        w.write(b"z" * 20_000)  # 0.2 s up, then 0.2 s down (the echo is chunked, so overlap)
        await r.readexactly(20_000)
        elapsed = time.monotonic() - t0
        assert 0.19 <= elapsed < 1.0, elapsed
        proxy.set_bandwidth(None)
        t1 = time.monotonic()
        w.write(b"z" * 20_000)
        await r.readexactly(20_000)
        assert time.monotonic() - t1 < 0.1
        await _close(w)
        with pytest.raises(ValueError, match="bandwidth"):
            proxy.set_bandwidth(0)


async def test_black_hole_holds_without_closing_then_heals(echo: EchoServer) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        r, w = await _open(proxy)
        w.write(b"1")
        assert await r.readexactly(1) == b"1"
        proxy.black_hole()
        w.write(b"2")
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await r.read(1)
        assert not r.at_eof()
        assert proxy.active == 1
        # A connection opened during the black hole is accepted but never reaches the target.
        r2, w2 = await _open(proxy)
        w2.write(b"n")
        await asyncio.sleep(0.05)
        assert echo.connections == 1
        proxy.black_hole(False)
        assert await r.readexactly(1) == b"2"  # nothing was lost
        assert await r2.readexactly(1) == b"n"
        assert echo.connections == 2
        await _close(w)
        await _close(w2)


async def test_black_hole_existing_only(echo: EchoServer) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        r, w = await _open(proxy)
        w.write(b"1")
        await r.readexactly(1)
        proxy.black_hole(new_connections=False)
        r2, w2 = await _open(proxy)
        w2.write(b"fresh")
        assert await r2.readexactly(5) == b"fresh"
        [old, new] = proxy.connections
        assert old.id == 1
        new.black_hole()
        w2.write(b"x")
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await r2.read(1)
        new.black_hole(False)
        assert await r2.readexactly(1) == b"x"
        await _close(w)
        await _close(w2)


async def test_reset_all_sends_rst(echo: EchoServer) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        conns = [await _open(proxy) for _ in range(3)]
        for r, w in conns:
            w.write(b"p")
            await r.readexactly(1)
        assert await proxy.reset_all() == 3
        assert proxy.active == 0
        assert proxy.resets == 3
        for r, w in conns:
            with pytest.raises(ConnectionResetError):
                await r.read(1)
            w.close()
        # New connections work again.
        r, w = await _open(proxy)
        w.write(b"q")
        assert await r.readexactly(1) == b"q"
        await _close(w)


async def test_refuse_resets_new_connections(echo: EchoServer) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        proxy.refuse()
        r, w = await _open(proxy)
        with pytest.raises(ConnectionResetError):
            await r.read(1)
        w.close()
        assert proxy.refused == 1
        assert proxy.accepted == 0
        proxy.refuse(False)
        r, w = await _open(proxy)
        w.write(b"k")
        assert await r.readexactly(1) == b"k"
        await _close(w)


async def test_kill_idle_closes_only_idle_connections(echo: EchoServer) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        proxy.kill_idle(0.3)
        idle_r, idle_w = await _open(proxy)
        busy_r, busy_w = await _open(proxy)
        t0 = time.monotonic()
        # Keep one connection busy while the other sits idle past the limit.
        while time.monotonic() - t0 < 0.6:
            busy_w.write(b".")
            await busy_r.readexactly(1)
            await asyncio.sleep(0.05)
        async with asyncio.timeout(2):
            assert await idle_r.read(1) == b""  # FIN, like a load balancer
        assert proxy.idle_kills == 1
        busy_w.write(b"!")
        assert await busy_r.readexactly(1) == b"!"
        proxy.kill_idle(None)
        await _close(idle_w)
        await _close(busy_w)


async def test_half_close_propagates_in_order(echo: EchoServer) -> None:
    async with FaultProxy("127.0.0.1", echo.port, latency=0.01) as proxy:
        r, w = await _open(proxy)
        w.write(b"last words")
        w.write_eof()
        assert await r.read() == b"last words"  # data, then the echo server's own EOF
        await _close(w)
        await proxy.wait_active(0)


async def test_dead_target_resets_client() -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    async with FaultProxy("127.0.0.1", port) as proxy:
        r, w = await _open(proxy)
        with pytest.raises(ConnectionResetError):
            await r.read(1)
        w.close()


async def test_aclose_with_held_connections_is_clean(echo: EchoServer) -> None:
    proxy = await FaultProxy("127.0.0.1", echo.port, latency=0.05).start()
    r, w = await _open(proxy)
    w.write(b"in flight")
    proxy.black_hole()
    await _open_and_forget(proxy)
    await proxy.aclose()
    await proxy.aclose()  # idempotent
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        await r.readexactly(1)
    w.close()


async def _open_and_forget(proxy: FaultProxy) -> None:
    _r, w = await _open(proxy)
    w.close()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="latency"):
        FaultProxy("127.0.0.1", 1, latency=-1)
    proxy = FaultProxy("127.0.0.1", 1)
    with pytest.raises(ValueError, match="after"):
        proxy.kill_idle(0)


def test_runs_on_uvloop() -> None:
    """uvloop's transports are not asyncio's classes: the proxy must not depend on them."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        async with EchoServer() as echo, FaultProxy("127.0.0.1", echo.port, latency=0.01) as p:
            r, w = await _open(p)
            w.write(b"a")
            assert await r.readexactly(1) == b"a"
            p.black_hole()
            w.write(b"b")
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.1):
                    await r.read(1)
            p.black_hole(False)
            assert await r.readexactly(1) == b"b"
            assert await p.reset_all() == 1
            with pytest.raises(ConnectionError):
                await r.read(1)
            w.close()
            p.refuse()
            r2, w2 = await _open(p)
            with pytest.raises(ConnectionError):
                await r2.read(1)
            w2.close()
            assert (p.accepted, p.refused) == (1, 1)

    uvloop.run(scenario())

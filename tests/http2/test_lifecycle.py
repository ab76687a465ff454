"""Connection lifecycle: GOAWAY drain and replacement, PING health through a black hole, ping
back-off on ENHANCE_YOUR_CALM, and how connect failures are classified."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from h2.errors import ErrorCodes

from tests.http2.conftest import API_KEY, MakePool, adapter_for, settings
from voicepool import ConnectError, Pool, PoolUnavailable
from voicepool.adapters.http2 import PooledTransport
from voicepool.testing import wait_until
from voicepool.testing.faultproxy import FaultProxy
from voicepool.testing.llm import LlmEmulator
from voicepool.testing.tls import test_certificates

CHAT = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


async def test_goaway_mid_stream_drains_while_new_streams_go_to_a_replacement(
    make_pool: MakePool,
) -> None:
    async with LlmEmulator(ttft=0.0, tokens=40, tokens_per_second=100.0) as emu:
        pool = await make_pool(emu.url, settings(min_size=1, max_size=2))
        url = emu.base_url + "/chat/completions"
        async with httpx.AsyncClient(transport=PooledTransport(pool)) as http:
            started = asyncio.Event()

            async def in_flight() -> str:
                body = []
                async with http.stream("POST", url, json=CHAT) as resp:
                    async for line in resp.aiter_lines():
                        started.set()
                        body.append(line)
                return "\n".join(body)

            old = [asyncio.create_task(in_flight()) for _ in range(5)]
            await started.wait()
            await emu.wait_for(lambda: emu.open_streams == 5)
            assert emu.goaway() == 1
            # New requests go to a new connection while the old one drains.
            fresh = await http.get(emu.url + "/v1/models")
            assert fresh.status_code == 200
            assert emu.connections_accepted == 2
            texts = await asyncio.gather(*old)
        for text in texts:  # every in-flight stream finished completely on the draining one
            assert "tok39 " in text
            assert text.rstrip().endswith("data: [DONE]")
        # Retired once: when its last stream ended, or when the server closed it after draining
        # (the engine then labels the release "error").
        await wait_until(lambda: sum(pool.stats().closed.values()) == 1)
        assert pool.stats().size == 1
        assert pool.stats().streams_in_use == 0


async def test_streams_a_goaway_refused_are_retried_on_a_new_connection(
    make_pool: MakePool,
) -> None:
    async with LlmEmulator(ttft=0.3, tokens=2) as emu:
        pool = await make_pool(emu.url, settings(min_size=1, max_size=2))
        url = emu.base_url + "/chat/completions"
        async with httpx.AsyncClient(transport=PooledTransport(pool)) as http:
            calls = [asyncio.create_task(http.post(url, json=CHAT)) for _ in range(3)]
            await emu.wait_for(lambda: emu.open_streams == 3)
            emu.goaway(ErrorCodes.NO_ERROR, last_stream_id=0)  # "I processed none of them"
            responses = await asyncio.gather(*calls)
        assert [r.status_code for r in responses] == [200, 200, 200]
        assert all(r.text.endswith("data: [DONE]\n\n") for r in responses)
        assert emu.connections_accepted == 2


async def test_black_holed_connection_is_detected_by_ping_and_replaced(
    llm: LlmEmulator, make_pool: MakePool
) -> None:
    async with FaultProxy("127.0.0.1", llm.port) as proxy:
        pool = await make_pool(
            f"https://127.0.0.1:{proxy.port}",
            settings(min_size=1, max_size=1, ping_interval=0.2, ping_timeout=0.1),
            server_hostname="127.0.0.1",
        )
        await llm.wait_for(lambda: llm.pings_received >= 1)  # healthy pings get answers
        proxy.black_hole(True, new_connections=False)  # the old socket goes silent, no FIN/RST
        await wait_until(lambda: pool.stats().closed.get("ping_failed") == 1)
        await wait_until(lambda: pool.stats().size == 1)
        async with httpx.AsyncClient(transport=PooledTransport(pool)) as http:
            resp = await http.get(f"https://127.0.0.1:{proxy.port}/v1/models")
        assert resp.status_code == 200
        assert pool.stats().connects == 2


async def test_enhance_your_calm_lengthens_the_ping_interval(make_pool: MakePool) -> None:
    async with LlmEmulator(min_ping_interval=0.3) as emu:
        pool = await make_pool(
            emu.url, settings(min_size=1, max_size=1, ping_interval=0.1, ping_timeout=0.1)
        )
        adapter = pool.adapter
        # Pings every ~0.1 s are "too many": GOAWAY ENHANCE_YOUR_CALM, the connection is
        # replaced and the adapter spaces its pings out until the server is content.
        await emu.wait_for(lambda: emu.calm_goaways >= 1, timeout=10)
        await wait_until(lambda: adapter.ping_gap >= 0.3, timeout=10)  # type: ignore[attr-defined]
        calms = emu.calm_goaways
        pings = emu.pings_received
        await emu.wait_for(lambda: emu.pings_received >= pings + 3, timeout=10)
        assert emu.calm_goaways == calms  # no more complaints at the new spacing
        assert adapter.calm_goaways == calms  # type: ignore[attr-defined]
        assert pool.stats().state.value == "ready"


async def test_server_without_http2_is_a_fatal_connect_error() -> None:
    async with LlmEmulator(alpn=["http/1.1"]) as emu:  # an HTTP/1.1-only TLS server
        adapter = adapter_for(emu.url)
        with pytest.raises(ConnectError, match="does not speak HTTP/2") as info:
            await adapter.connect()
        assert info.value.fatal
        assert adapter.is_fatal(info.value)


async def test_untrusted_certificate_opens_the_circuit_at_start(llm: LlmEmulator) -> None:
    pool = Pool(adapter_for(llm.url, ca_file=None), settings(), name="llm")
    with pytest.raises(PoolUnavailable) as info:
        await pool.start()
    cause = info.value.__cause__
    assert isinstance(cause, ConnectError)
    assert cause.fatal
    assert "certificate" in str(cause)


async def test_rejected_credentials_at_warmup_are_fatal(llm: LlmEmulator) -> None:
    adapter = adapter_for(llm.url, api_key="sk-wrong", warmup_path="/v1/models")
    with pytest.raises(ConnectError, match="HTTP 401") as info:
        await adapter.connect()
    assert info.value.fatal
    assert info.value.status == 401
    assert "sk-wrong" not in str(info.value)


async def test_refused_connections_are_retryable_connect_errors(llm: LlmEmulator) -> None:
    llm.refuse_connections()
    adapter = adapter_for(llm.url)
    with pytest.raises(ConnectError) as info:
        await adapter.connect()
    assert not info.value.fatal


async def test_cleartext_http2_with_prior_knowledge(make_pool: MakePool) -> None:
    async with LlmEmulator(tls=False, api_key=API_KEY, tokens=3) as emu:
        pool = await make_pool(emu.url, warmup_path="/v1/models")
        async with httpx.AsyncClient(transport=PooledTransport(pool)) as http:
            resp = await http.post(emu.base_url + "/chat/completions", json=CHAT)
        assert resp.status_code == 200
        assert resp.http_version == "HTTP/2"
        assert emu.connections_accepted == 1


async def test_ping_round_trip_and_close(llm: LlmEmulator) -> None:
    adapter = adapter_for(llm.url)
    conn = await adapter.connect()
    try:
        await adapter.ping(conn)
        assert llm.pings_received == 1
        assert adapter.stream_capacity(conn) == 100
    finally:
        await adapter.close(conn)
    assert not adapter.is_open(conn)
    assert adapter.stream_capacity(conn) == 0
    await llm.wait_for(lambda: llm.open_connections == 0)


async def test_401_on_the_request_path_opens_the_circuit_once(
    llm: LlmEmulator, make_pool: MakePool, caplog: pytest.LogCaptureFixture
) -> None:
    # The README's configuration: no warm-up request, so the bad key shows on the first call.
    pool = await make_pool(llm.url, settings(min_size=2, max_size=2), api_key="sk-revoked")
    url = llm.base_url + "/chat/completions"
    async with httpx.AsyncClient(transport=PooledTransport(pool)) as http:
        first = await asyncio.gather(*(http.post(url, json=CHAT) for _ in range(10)))
        assert [r.status_code for r in first] == [401] * 10  # the answers themselves stand
        assert pool.stats().state.value == "unavailable"
        slowest = 0.0
        for _ in range(20):  # no per-request storm: the pool answers, the server sees nothing
            t0 = time.perf_counter()
            with pytest.raises(httpx.ConnectError, match="HTTP 401"):
                await http.post(url, json=CHAT)
            slowest = max(slowest, time.perf_counter() - t0)
        # Each fails at once, not after the 5 s acquire timeout. (Per request, not the twenty
        # together: this test failed once in a full run on a loaded machine, pytest did not say
        # where, and one full GC pass of the suite's process takes a few hundred ms.)
        assert slowest < 0.5
    assert llm.requests["/v1/chat/completions"] == 10
    with pytest.raises(PoolUnavailable) as info:
        async with pool.acquire():
            pass
    cause = info.value.__cause__
    assert isinstance(cause, ConnectError)
    assert cause.fatal
    assert cause.status == 401
    assert "HTTP 401 to POST /v1/chat/completions" in str(cause)
    assert "sk-revoked" not in str(cause)
    # Each connection that got a 401 is closed as rejected. The ten requests need not spread
    # over both connections: when all went to one, the circuit's probe took the other's slot
    # (closed as "probe"). CI saw {'probe': 1, 'rejected': 1} once, and it is as right.
    closed = pool.stats().closed
    assert closed.get("rejected", 0) >= 1
    assert closed.get("rejected", 0) + closed.get("probe", 0) == 2
    assert set(closed) <= {"rejected", "probe"}
    opened = [r for r in caplog.records if "circuit open" in r.getMessage()]
    assert len(opened) == 1


async def test_goaway_with_an_error_code_is_a_goaway_close_with_a_last_error(
    make_pool: MakePool,
) -> None:
    async with LlmEmulator() as emu:
        pool = await make_pool(emu.url, settings(min_size=1, max_size=1))
        assert emu.goaway(ErrorCodes.INTERNAL_ERROR) == 1
        await wait_until(lambda: pool.stats().closed.get("goaway") == 1)
        assert "expired" not in pool.stats().closed
        assert "sent GOAWAY INTERNAL_ERROR" in str(pool.last_error)


async def test_protocol_error_is_recorded_with_a_useful_last_error(make_pool: MakePool) -> None:
    # A "server" that speaks just enough HTTP/2 (its SETTINGS), then sends DATA on stream 0,
    # which RFC 9113 6.1 makes a connection error of type PROTOCOL_ERROR.
    go = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(24)  # the client preface
        writer.write(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # SETTINGS, empty
        await go.wait()
        writer.write(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")  # DATA on stream 0
        await reader.read()  # until the client closes (after its GOAWAY)
        writer.close()

    server = await asyncio.start_server(
        serve, "127.0.0.1", 0, ssl=test_certificates().server_context(["h2"])
    )
    port = server.sockets[0].getsockname()[1]
    async with server:
        pool = await make_pool(f"https://127.0.0.1:{port}", settings(min_size=1, max_size=1))
        go.set()
        await wait_until(lambda: pool.stats().closed.get("protocol_error") == 1)
        assert "HTTP/2 protocol error from" in str(pool.last_error)
        await pool.aclose(1.0)


async def test_ping_after_a_failed_stream_detects_a_black_hole_despite_the_calm_gap() -> None:
    # After a GOAWAY ENHANCE_YOUR_CALM the adapter skips pings that come too soon; a connection
    # whose stream just timed out is in doubt, and its ping must go out and fail, not be skipped.
    async with (
        LlmEmulator(min_ping_interval=60.0) as emu,
        FaultProxy("127.0.0.1", emu.port) as proxy,
    ):
        adapter = adapter_for(
            f"https://127.0.0.1:{proxy.port}", server_hostname="127.0.0.1", ping_backoff=1e5
        )
        calm = await adapter.connect()
        await adapter.ping(calm)  # too soon for this server: GOAWAY ENHANCE_YOUR_CALM
        await wait_until(lambda: adapter.calm_goaways == 1)
        assert adapter.ping_gap >= 1.0
        await adapter.close(calm)
        conn = await adapter.connect()
        proxy.black_hole(True, new_connections=False)
        headers = [
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":authority", b"127.0.0.1"),
            (b":path", b"/v1/models"),
        ]
        stream = conn.start_request(1, headers, end=True)
        with pytest.raises(TimeoutError) as timed_out:
            async with asyncio.timeout(0.2):
                await stream.response()
        assert await adapter.release_stream(conn, 1, timed_out.value)  # still open: in doubt
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):  # the pool's ping_timeout
                await adapter.ping(conn)
        await conn.aclose(0.1)  # black-holed: no polite TLS close to wait for


async def test_black_holed_connection_takes_no_stream_after_one_timed_out(
    llm: LlmEmulator, make_pool: MakePool
) -> None:
    # Shipped ping interval (30 s): only the failed stream can reveal the black hole. Its
    # connection becomes suspect at once (no new streams), its ping fails within ping_timeout.
    async with FaultProxy("127.0.0.1", llm.port) as proxy:
        url = f"https://127.0.0.1:{proxy.port}"
        pool = await make_pool(
            url,
            settings(min_size=1, max_size=2, ping_interval=30.0, ping_timeout=0.5),
            server_hostname="127.0.0.1",
        )
        async with httpx.AsyncClient(transport=PooledTransport(pool), timeout=1.0) as http:
            assert (await http.get(url + "/v1/models")).status_code == 200
            proxy.black_hole(True, new_connections=False)
            with pytest.raises(httpx.ReadTimeout):
                await http.get(url + "/v1/models", timeout=0.3)
            t_fail = asyncio.get_running_loop().time()
            after = await asyncio.gather(
                *(http.get(url + "/v1/models") for _ in range(10)), return_exceptions=True
            )
            assert [getattr(r, "status_code", r) for r in after] == [200] * 10  # none hung
            await wait_until(lambda: pool.stats().closed.get("ping_failed") == 1)
            assert asyncio.get_running_loop().time() - t_fail < 0.5 + 0.5


async def test_after_a_401_one_request_per_new_connection_retests_the_key(
    llm: LlmEmulator, make_pool: MakePool
) -> None:
    pool = await make_pool(llm.url, settings(min_size=1, max_size=2), api_key="sk-revoked")
    url = llm.base_url + "/chat/completions"
    async with httpx.AsyncClient(transport=PooledTransport(pool)) as http:
        assert (await http.post(url, json=CHAT)).status_code == 401
        assert pool.stats().state.value == "unavailable"
        await wait_until(lambda: pool.stats().state.value == "ready")  # the probe reconnected
        seen = llm.requests["/v1/chat/completions"]
        burst = await asyncio.gather(
            *(http.post(url, json=CHAT) for _ in range(10)), return_exceptions=True
        )
        # The reconnect closed the circuit, but a connection after a 401 takes one stream until
        # the key is accepted: at most one request per connection reached the server.
        assert llm.requests["/v1/chat/completions"] - seen <= 2
        for r in burst:  # a 401 from the server, or the pool's PoolUnavailable at once
            if isinstance(r, httpx.Response):
                assert r.status_code == 401
            else:
                assert isinstance(r, httpx.ConnectError)
        llm.api_key = "sk-revoked"  # the operator fixed the key on the server's side
        await wait_until(lambda: pool.stats().state.value == "ready")
        assert (await http.post(url, json=CHAT)).status_code == 200
        conns = [rec.conn for rec in pool._core.conns.values()]
        assert [pool.adapter.stream_capacity(c) for c in conns] == [100] * len(conns)
        texts = await asyncio.gather(*(http.post(url, json=CHAT) for _ in range(10)))
        assert [r.status_code for r in texts] == [200] * 10


async def test_a_black_hole_stops_new_streams_before_any_request_times_out(
    llm: LlmEmulator, make_pool: MakePool
) -> None:
    # The stream started on a quiet connection carries a PING; no answer within stall_timeout
    # and the connection takes no new streams, long before the request's own timeout.
    async with FaultProxy("127.0.0.1", llm.port) as proxy:
        url = f"https://127.0.0.1:{proxy.port}"
        pool = await make_pool(
            url,
            settings(min_size=1, max_size=2, ping_interval=30.0, ping_timeout=5.0),
            server_hostname="127.0.0.1",
            stall_timeout=0.4,
        )
        (conn,) = [rec.conn for rec in pool._core.conns.values()]
        adapter = pool.adapter
        async with httpx.AsyncClient(transport=PooledTransport(pool), timeout=5.0) as http:
            assert (await http.get(url + "/v1/models")).status_code == 200
            proxy.black_hole(True, new_connections=False)
            await wait_until(lambda: time.monotonic() - conn.last_received > 0.1)
            t0 = time.monotonic()
            hung = asyncio.create_task(http.get(url + "/v1/models"))
            await wait_until(lambda: adapter.stream_capacity(conn) == 0, timeout=3.0)
            assert time.monotonic() - t0 < 0.4 + 0.3
            assert adapter.close_reason(conn) == "stalled"
            fresh = await http.get(url + "/v1/models")  # a new connection, no wait
            assert fresh.status_code == 200
            assert not hung.done()  # the stream on the dead connection still waits for its timeout
            hung.cancel()
            await asyncio.gather(hung, return_exceptions=True)


async def test_a_stalled_connection_takes_streams_again_when_the_server_answers(
    llm: LlmEmulator, make_pool: MakePool
) -> None:
    async with FaultProxy("127.0.0.1", llm.port) as proxy:
        url = f"https://127.0.0.1:{proxy.port}"
        pool = await make_pool(
            url,
            settings(min_size=1, max_size=1, ping_interval=30.0),
            server_hostname="127.0.0.1",
            stall_timeout=0.2,
        )
        (conn,) = [rec.conn for rec in pool._core.conns.values()]
        adapter = pool.adapter
        async with httpx.AsyncClient(transport=PooledTransport(pool), timeout=5.0) as http:
            await wait_until(lambda: time.monotonic() - conn.last_received > 0.05)
            proxy.set_latency(0.0, 0.5)  # answers come, but later than stall_timeout
            slow = asyncio.create_task(http.get(url + "/v1/models"))
            await wait_until(lambda: adapter.stream_capacity(conn) == 0)
            await wait_until(lambda: adapter.stream_capacity(conn) == 100)  # heard again
            assert (await slow).status_code == 200
            assert pool.stats().size == 1
            assert pool.stats().connects == 1

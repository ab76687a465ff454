"""PoolManager against real TCP servers: concurrent boot, boot policies, health, drain, hard close,
and credentials that never reach logs or health."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.settings.conftest import API_KEY, ECHO, LIMITED, EchoAdapter, EchoOptions, EchoServer
from tests.settings.conftest import echo_pool as _echo_pool
from voicepool import (
    ConfigError,
    ConnectError,
    Pool,
    PoolClosed,
    PoolError,
    PoolManager,
    PoolSettings,
    PoolState,
    PoolStats,
    PoolUnavailable,
    register_adapter,
)
from voicepool.manager import ManagerState
from voicepool.settings import VoicePoolSettings

MakeServer = Callable[..., Awaitable[EchoServer]]


def echo_pool(port: int, **fields: Any) -> dict[str, Any]:
    fields.setdefault("min_size", 2)
    fields.setdefault("max_size", 2)
    return _echo_pool(port, **fields)


def manager_for(**pools: dict[str, Any]) -> PoolManager:
    return PoolManager.from_settings(VoicePoolSettings(pools=pools))


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll a condition the engine exposes no event for (bounded in time)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def test_boot_is_concurrent(echo_server: MakeServer) -> None:
    delay = 0.4
    servers = [await echo_server(delay=delay) for _ in range(3)]
    manager = manager_for(**{f"p{i}": echo_pool(s.port) for i, s in enumerate(servers)})
    t0 = time.monotonic()
    async with manager:
        boot = time.monotonic() - t0
        assert manager.state is ManagerState.RUNNING
        assert all(st.state is PoolState.READY for st in manager.stats().values())
        assert [s.open for s in servers] == [2, 2, 2]
    # 3 pools x 2 connections, each handshake 0.4 s: ~0.4 s concurrent; serially 1.2 s or 2.4 s.
    assert delay * 0.9 <= boot < delay * 2.25, boot
    for server in servers:
        await server.all_closed()


async def test_required_pool_failure_fails_the_boot(echo_server: MakeServer) -> None:
    slow = await echo_server(delay=1.0)
    down = await echo_server()
    down.refuse = True  # accepts, then closes at once: the provider is down
    manager = manager_for(slow=echo_pool(slow.port), down=echo_pool(down.port))
    t0 = time.monotonic()
    with pytest.raises(PoolUnavailable) as info:
        await manager.start()
    # The failure aborts the boot at once: the slow pool's handshakes are cancelled, not awaited.
    assert time.monotonic() - t0 < 0.9
    message = str(info.value)
    assert "required pool 'down' could not start" in message
    assert "closed before the greeting" in message
    assert "all pools were closed" in message
    assert info.value.pool == "down"
    assert isinstance(info.value.__cause__, PoolUnavailable)
    assert manager.state is ManagerState.CLOSED
    assert {st.state for st in manager.stats().values()} == {PoolState.CLOSED}
    await slow.all_closed()
    health = manager.health()
    assert health["status"] == "unavailable"
    assert health["ready"] is False


async def test_rejected_credential_names_the_pool_not_the_key(echo_server: MakeServer) -> None:
    server = await echo_server(token="the-right-key-0000")
    manager = manager_for(asr=echo_pool(server.port))
    with pytest.raises(PoolUnavailable) as info:
        async with manager:
            pytest.fail("the boot should have failed")
    assert "'asr'" in str(info.value)
    assert "key rejected" in str(info.value)
    assert API_KEY not in str(info.value)
    assert server.auth_seen == [API_KEY, API_KEY]  # sent on the wire, never printed


async def test_optional_pool_starts_degraded_and_recovers(echo_server: MakeServer) -> None:
    good = await echo_server()
    flaky = await echo_server()
    flaky.refuse = True
    manager = manager_for(asr=echo_pool(good.port), tts=echo_pool(flaky.port, required=False))
    async with manager:
        health = manager.health()
        assert health["status"] == "degraded"
        assert health["ready"] is True
        assert health["pools"]["asr"]["status"] == "ready"
        assert health["pools"]["asr"]["reason"] is None
        tts = health["pools"]["tts"]
        assert tts["status"] in {"degraded", "unavailable"}
        assert tts["required"] is False
        assert "closed before the greeting" in tts["reason"]
        async with manager.acquire("asr") as lease:
            assert await lease.conn.request("hello") == "hello"

        flaky.refuse = False  # the provider comes back: the pool recovers by itself
        await until(lambda: manager.health()["pools"]["tts"]["status"] == "ready")
        await until(lambda: manager["tts"].stats().size == 2)
        assert manager.health()["status"] == "ready"
        async with manager.acquire("tts", timeout=2) as lease:
            assert await lease.conn.request("back") == "back"


async def test_optional_pool_with_open_circuit_fails_fast(echo_server: MakeServer) -> None:
    server = await echo_server(token="another-key-1234")  # our key is rejected: fatal
    manager = manager_for(tts=echo_pool(server.port, required=False))
    async with manager:
        health = manager.health()
        assert health["pools"]["tts"]["status"] == "unavailable"
        assert health["pools"]["tts"]["reason"].startswith("circuit open: ")
        assert health["status"] == "degraded"  # an optional pool down does not unready the worker
        t0 = time.monotonic()
        with pytest.raises(PoolUnavailable):
            async with manager.acquire("tts"):
                pass
        assert time.monotonic() - t0 < 0.5


async def test_drain_waits_for_a_held_lease(echo_server: MakeServer) -> None:
    server = await echo_server()
    manager = manager_for(asr=echo_pool(server.port, min_size=1, max_size=1, drain_timeout=5))
    held, release = asyncio.Event(), asyncio.Event()
    answers: list[str] = []

    async def call() -> None:
        async with manager.acquire("asr") as lease:
            held.set()
            await release.wait()
            answers.append(await lease.conn.request("last words"))  # works during the drain

    async with manager:
        holder = asyncio.create_task(call())
        await held.wait()
        closing = asyncio.create_task(manager.aclose())
        await until(lambda: manager["asr"].state is PoolState.CLOSING)
        with pytest.raises(PoolClosed):  # no new leases while draining
            async with manager.acquire("asr"):
                pass
        assert not closing.done()
        release.set()
        t0 = time.monotonic()
        await closing
        assert time.monotonic() - t0 < 2.0  # ended by the release, not by drain_timeout
        await holder
    assert answers == ["last words"]
    assert manager.state is ManagerState.CLOSED
    await server.all_closed()


async def test_drain_timeout_closes_a_lease_still_held(echo_server: MakeServer) -> None:
    server = await echo_server()
    manager = manager_for(asr=echo_pool(server.port, min_size=1, max_size=1, drain_timeout=0.3))
    held, release = asyncio.Event(), asyncio.Event()
    outcome: list[str] = []

    async def stuck_call() -> None:
        async with manager.acquire("asr") as lease:
            held.set()
            await release.wait()
            try:
                outcome.append(await lease.conn.request("too late"))
            except ConnectionError:
                outcome.append("connection closed")

    async with manager:
        holder = asyncio.create_task(stuck_call())
        await held.wait()
        t0 = time.monotonic()
    elapsed = time.monotonic() - t0
    assert 0.25 <= elapsed < 2.0, elapsed
    await server.all_closed()
    release.set()
    await holder
    assert outcome == ["connection closed"]


async def test_cancelled_block_closes_hard(echo_server: MakeServer) -> None:
    server = await echo_server()
    manager = manager_for(asr=echo_pool(server.port, min_size=1, max_size=1, drain_timeout=30))
    held = asyncio.Event()
    never = asyncio.Event()

    async def holder() -> None:
        async with manager.acquire("asr"):
            held.set()
            await never.wait()

    async def worker() -> None:
        async with manager:
            task = asyncio.create_task(holder())
            await held.wait()
            try:
                await asyncio.sleep(30)
            finally:
                task.cancel()

    running = asyncio.create_task(worker())
    await held.wait()
    t0 = time.monotonic()
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert time.monotonic() - t0 < 2.0  # not drain_timeout (30 s)
    assert manager.state is ManagerState.CLOSED
    await server.all_closed()


async def test_lookup_stats_and_health_shape(echo_server: MakeServer) -> None:
    server = await echo_server()
    manager = manager_for(asr=echo_pool(server.port), llm=echo_pool(server.port, max_size=3))
    before = manager.health()
    assert before["status"] == "unavailable"
    assert before["manager"] == "new"
    assert before["pools"]["asr"]["reason"] == "not started"
    assert "asr" in manager
    assert "tts" not in manager
    assert sorted(manager) == ["asr", "llm"]
    assert len(manager) == 2
    with pytest.raises(KeyError, match="no pool named 'tts'; pools: asr, llm"):
        manager["tts"]
    with pytest.raises(KeyError):
        manager.acquire("tts")
    async with manager:
        assert manager.is_required("asr")
        assert manager.pools["asr"] is manager["asr"]
        async with manager.acquire("llm") as lease:
            assert await lease.conn.request("x") == "x"
            stats = manager.stats()
            assert set(stats) == {"asr", "llm"}
            assert isinstance(stats["llm"], PoolStats)
            assert stats["llm"].in_use == 1
            assert manager.health()["pools"]["llm"]["in_use"] == 1
        health = json.loads(json.dumps(manager.health()))
        assert health["status"] == "ready"
        assert health["manager"] == "running"
        assert health["pools"]["llm"] == {
            "status": "ready",
            "state": "ready",
            "required": True,
            "adapter": ECHO,
            "reason": None,
            "size": 2,
            "idle": 2,
            "in_use": 0,
            "opening": 0,
            "waiters": 0,
            "min_size": 2,
            "max_size": 3,
        }
        assert "asr=ready" in repr(manager)
        with pytest.raises(PoolError, match="already started"):
            await manager.start()
    after = manager.health()
    assert after["manager"] == "closed"
    assert after["pools"]["asr"]["reason"] == "closed"


async def test_from_settings_reads_the_environment(
    echo_server: MakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await echo_server()
    monkeypatch.setenv("VOICEPOOL_POOLS__ASR__ADAPTER", ECHO)
    monkeypatch.setenv("VOICEPOOL_POOLS__ASR__MIN_SIZE", "1")
    monkeypatch.setenv("VOICEPOOL_POOLS__ASR__OPTIONS__PORT", str(server.port))
    monkeypatch.setenv("VOICEPOOL_POOLS__ASR__OPTIONS__API_KEY", API_KEY)
    manager = PoolManager.from_settings()
    assert manager.settings is not None
    async with manager:
        assert manager["asr"].stats().size == 1
    monkeypatch.setenv("VOICEPOOL_POOLS__ASR__MIN_SIZE", "-1")
    with pytest.raises(ConfigError, match=r"pools\.asr\.min_size"):
        PoolManager.from_settings()


async def test_manager_built_in_code(echo_server: MakeServer) -> None:
    server = await echo_server()
    options = EchoOptions(port=server.port, api_key=API_KEY)
    small = PoolSettings(min_size=1, max_size=1)
    asr = Pool(EchoAdapter(options), small, name="asr")
    manager = PoolManager([asr])
    manager.add_adapter("tts", EchoAdapter(options), small, required=False)
    assert manager["asr"] is asr
    assert not manager.is_required("tts")
    with pytest.raises(ConfigError, match=r"pools\.asr: a pool with this name"):
        manager.add_adapter("asr", EchoAdapter(options))
    with pytest.raises(ConfigError, match="optional= names pools"):
        PoolManager([], optional=["nope"])
    async with manager:
        assert manager.health()["pools"]["tts"]["adapter"] == "EchoAdapter"
        async with manager.acquire("tts") as lease:
            assert await lease.conn.request("code") == "code"
        with pytest.raises(PoolError, match="already started"):
            manager.add_adapter("late", EchoAdapter(options))


def test_process_limit_in_code() -> None:
    from tests.settings.conftest import LimitedEchoAdapter

    options = EchoOptions(port=1, api_key=API_KEY)
    manager = PoolManager()
    manager.add_adapter("a", LimitedEchoAdapter(options), PoolSettings(max_size=5))
    with pytest.raises(ConfigError, match=r"at most 8 connections .* 5 \(a\) \+ 4 \(b\) = 9"):
        manager.add_adapter("b", LimitedEchoAdapter(options), PoolSettings(max_size=4))
    assert "b" not in manager
    manager.add_adapter("b", LimitedEchoAdapter(options), PoolSettings(max_size=3))
    assert LIMITED  # the same limit is enforced on settings (test_settings)


class LeakyEchoAdapter(EchoAdapter):
    """Breaks the adapter contract: its connect error quotes the credential."""

    async def connect(self) -> Any:
        raise ConnectError(f"refused key {self.options.api_key.get_secret_value()}", fatal=True)


register_adapter("vp-test-leaky-echo")(LeakyEchoAdapter)


async def test_secrets_never_in_logs_or_health(
    echo_server: MakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    wrong_key = "sk-wrong-ANOTHERSECRET-77"
    server = await echo_server()
    caplog.set_level(logging.DEBUG, logger="voicepool")
    manager = manager_for(
        asr=echo_pool(server.port),
        tts=echo_pool(server.port, api_key=wrong_key, required=False),
    )
    texts: list[str] = [repr(manager), repr(manager.settings)]
    async with manager:
        async with manager.acquire("asr") as lease:
            await lease.conn.request("hi")
        texts.append(json.dumps(manager.health()))
        texts.append(repr(manager.stats()))
        with pytest.raises(PoolUnavailable) as info:
            async with manager.acquire("tts"):
                pass
        texts.append(str(info.value))
    texts.append(caplog.text)
    assert "key rejected" in caplog.text  # the failure is logged...
    for text in texts:
        assert API_KEY not in text  # ...without either key
        assert wrong_key not in text
    assert wrong_key in server.auth_seen

    # An adapter that quotes its key in errors: health() still masks it.
    leaky = manager_for(tts=echo_pool(server.port, adapter="vp-test-leaky-echo", required=False))
    async with leaky:
        health = json.dumps(leaky.health())
    assert "refused key **********" in health
    assert API_KEY not in health

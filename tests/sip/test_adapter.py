"""SipAdapter and the pjsua2 engine against the in-process registrar emulator (real UDP/TCP)."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from tests.sip.conftest import fast, sip_adapter
from voicepool import (
    ConfigError,
    ConnectError,
    LeaseMode,
    Pool,
    PoolState,
    PoolUnavailable,
    get_adapter,
)
from voicepool.adapters.sip import (
    PJSUA_MAX_ACC,
    OwnerContext,
    RegState,
    SipAdapter,
    SipEngine,
    SipOptions,
    SipRegistration,
)
from voicepool.testing import wait_until
from voicepool.testing.sip_registrar import SipRegistrar

pytest.importorskip("pjsua2", reason="pjsua2 (voicepool[sip]) is not installed")


# -- options and construction ----------------------------------------------------------------------


def test_options_validate_and_default() -> None:
    o = SipOptions(aor="sip:alice@carrier.example", password=SecretStr("pw"))
    assert o.registrar_uri == "sip:carrier.example;transport=udp"
    assert o.aor_user == "alice"
    tcp = SipOptions(aor="sip:a@h", registrar="sip:r:5070", transport="tcp")
    assert tcp.registrar_uri == "sip:r:5070;transport=tcp"
    for bad in (
        {"aor": "alice@h"},
        {"aor": "sip:h"},
        {"aor": "sip:a@h", "registrar": "http://r"},
        {"aor": "sip:a@h", "expires": 9},
        {"aor": "sips:a@h"},  # sips needs tls
        {"aor": "sip:a@h", "proxies": ["r"]},
        {"aor": "sip:a@h", "transport": "sctp"},
        {"aor": "sip:a@h", "unknown": 1},
    ):
        with pytest.raises(ValidationError):
            SipOptions(**bad)


def test_adapter_contract_and_entry_point() -> None:
    assert get_adapter("sip") is SipAdapter
    assert SipAdapter.lease_mode is LeaseMode.MULTIPLEXED
    assert SipAdapter.max_connections_per_process == PJSUA_MAX_ACC == 8
    adapter = SipAdapter.from_options(SipOptions(aor="sip:a@h", password=SecretStr("pw")))
    assert isinstance(adapter, SipAdapter)
    assert adapter.describe().startswith("SIP registrar sip:h (udp) as sip:a@h, on pjsua2-")


def test_secrets_never_in_reprs_or_descriptions() -> None:
    adapter = sip_adapter("sip:127.0.0.1:9", password=SecretStr("hunter2"))
    spec = adapter._spec("tag")
    for text in (repr(adapter.options), str(adapter.options), adapter.describe(), repr(spec)):
        assert "hunter2" not in text


def test_missing_pjsua2_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from voicepool.adapters.sip import _binding

    monkeypatch.setitem(sys.modules, "pjsua2", None)
    with pytest.raises(ConfigError, match=r"pip install 'voicepool\[sip\]'"):
        SipAdapter(SipOptions(aor="sip:a@h"))
    monkeypatch.setattr(_binding, "_binding", None)
    with pytest.raises(_binding.BindingMissing, match="pjsua2-pybind11"):
        _binding.load()


async def test_connect_without_pjsua2_is_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    from voicepool.adapters.sip import _binding

    adapter = sip_adapter("sip:127.0.0.1:9")
    monkeypatch.setitem(sys.modules, "pjsua2", None)
    monkeypatch.setattr(_binding, "_binding", None)
    with pytest.raises(ConnectError, match="voicepool\\[sip\\]") as info:
        await adapter.connect()
    assert info.value.fatal


async def test_tls_without_tls_support_is_refused_before_pjsua2() -> None:
    from voicepool.adapters.sip import _binding

    if _binding.load().has_tls:
        pytest.skip("this pjsua2 build has TLS")
    adapter = sip_adapter("sip:127.0.0.1:9", transport="tls")
    with pytest.raises(ConnectError, match="no TLS transport") as info:
        await adapter.connect()
    assert info.value.fatal
    assert SipEngine.get().stats().state == "stopped"


# -- one registration ------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_connect_ping_close(registrar: SipRegistrar, transport: str) -> None:
    engine = SipEngine.get()
    starts = engine.stats().starts
    adapter = sip_adapter(registrar.uri, transport=transport)
    conn = await adapter.connect()
    try:
        assert engine.stats().starts == starts + 1  # started lazily, by the first connect
        assert conn.state is RegState.REGISTERED
        assert adapter.is_open(conn)
        assert conn.status == 200
        assert conn.expires == 10
        assert conn.valid_until > time.monotonic() + 5
        assert registrar.binding_count("alice") == 1
        [binding] = registrar.bindings()
        assert f"vpl={conn.contact_tag}" in binding.contact
        assert binding.transport == transport
        before = registrar.register_count
        await adapter.ping(conn)  # a refresh REGISTER: challenge + authenticated request
        assert registrar.register_count == before + 2
        assert conn.registers == 2
    finally:
        await adapter.close(conn)
    assert conn.state is RegState.CLOSED
    assert not adapter.is_open(conn)
    assert registrar.binding_count() == 0  # un-REGISTERed before close() returned
    with pytest.raises(ConnectError, match="closed"):
        await conn.run(lambda ctx: ctx.account)


async def test_pool_registrations_have_distinct_bindings(registrar: SipRegistrar) -> None:
    adapter = sip_adapter(registrar.uri)
    async with Pool(adapter, fast(min_size=3, max_size=3), name="sip") as pool:
        assert pool.stats().size == 3
        assert registrar.binding_count("alice") == 3
        assert SipEngine.get().stats().accounts == 3
    assert registrar.binding_count() == 0


@pytest.mark.parametrize(
    ("mode", "status", "fatal"),
    [("401", 401, True), ("403", 403, True), ("503", 503, False)],
)
async def test_registrar_refusals(
    registrar: SipRegistrar, mode: str, status: int, fatal: bool
) -> None:
    registrar.mode = mode
    adapter = sip_adapter(registrar.uri)
    with pytest.raises(ConnectError) as info:
        await adapter.connect()
    assert info.value.status == status
    assert info.value.fatal is fatal
    assert adapter.is_fatal(info.value) is fatal
    assert f"with {status} " in str(info.value)
    assert registrar.binding_count() == 0


async def test_wrong_password_is_fatal_401_without_secret(registrar: SipRegistrar) -> None:
    adapter = sip_adapter(registrar.uri, password=SecretStr("not-the-secret"))
    with pytest.raises(ConnectError) as info:
        await adapter.connect()
    assert info.value.status == 401
    assert info.value.fatal
    assert "wrong username or password" in str(info.value)
    assert "not-the-secret" not in str(info.value)


async def test_423_is_handled_by_pjsip_with_min_expires() -> None:
    async with SipRegistrar(mode="423", min_expires=20) as registrar:
        adapter = sip_adapter(registrar.uri, expires=10)
        conn = await adapter.connect()
        try:
            assert conn.expires == 20
            assert registrar.answers[423] == 1
        finally:
            await adapter.close(conn)
        assert registrar.binding_count() == 0


async def test_unanswered_register_is_cancelled_without_leftovers(
    registrar: SipRegistrar, engine: SipEngine
) -> None:
    registrar.mode = "no-answer"
    adapter = sip_adapter(registrar.uri)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await adapter.connect()
    # The engine fixture checks that the account is gone; it needs no answer to go.
    await wait_until(lambda: engine.stats().accounts == 0, timeout=3)


async def test_close_unregisters_even_when_cancelled(registrar: SipRegistrar) -> None:
    adapter = sip_adapter(registrar.uri)
    conn = await adapter.connect()
    closing = asyncio.create_task(adapter.close(conn))
    await asyncio.sleep(0)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    await wait_until(lambda: registrar.binding_count() == 0, timeout=3)


async def test_ninth_account_is_refused_before_pjsua2(registrar: SipRegistrar) -> None:
    adapter = sip_adapter(registrar.uri)
    async with Pool(adapter, fast(min_size=8, max_size=8), name="eight") as pool:
        assert pool.stats().size == 8
        assert SipEngine.get().stats().accounts == 8
        registers = registrar.register_count
        t0 = time.monotonic()
        with pytest.raises(ConnectError, match="at most 8 SIP accounts per process") as info:
            await sip_adapter(registrar.uri, aor="sip:bob@127.0.0.1").connect()
        assert time.monotonic() - t0 < 0.5
        assert not info.value.fatal  # another pool closing frees a slot
        assert registrar.register_count == registers  # PJSIP never saw it
        assert registrar.binding_count() == 8
    assert registrar.binding_count() == 0


# -- health ---------------------------------------------------------------------------------------


async def test_registration_lapse_without_refresh_tells_the_pool(registrar: SipRegistrar) -> None:
    adapter = sip_adapter(registrar.uri)
    changed: list[Any] = []
    adapter.watch(changed.append)
    conn = await adapter.connect()
    try:
        # As if the registrar went silent: no refresh arrives before the binding expires.
        conn.valid_until = time.monotonic() + 0.05
        conn._arm_lapse()
        await wait_until(lambda: changed == [conn], timeout=2)
        assert conn.state is RegState.LOST
        assert not adapter.is_open(conn)
        with pytest.raises(ConnectError, match="lost"):
            await adapter.ping(conn)
    finally:
        await adapter.close(conn)
        adapter.unwatch(changed.append)


async def test_refused_refresh_opens_the_circuit_and_recovers(registrar: SipRegistrar) -> None:
    adapter = sip_adapter(registrar.uri)
    async with Pool(adapter, fast(min_size=2, max_size=2), name="sip") as pool:
        registrar.mode = "503"
        # The next pings (refresh REGISTERs) get 503: registrations lost, reconnects refused.
        await wait_until(lambda: pool.state is PoolState.UNAVAILABLE and not pool.stats().size, 5)
        t0 = time.monotonic()
        with pytest.raises(PoolUnavailable) as info:
            async with pool.acquire():
                pass
        assert time.monotonic() - t0 < 0.1  # fails fast, no acquire_timeout
        cause = info.value.__cause__
        assert isinstance(cause, ConnectError)
        assert cause.status == 503
        registrar.mode = "ok"
        await wait_until(lambda: pool.stats().size == 2 and pool.state is PoolState.READY, 5)
        async with pool.acquire() as lease:
            assert lease.conn.registered


async def test_credentials_revoked_midlife_open_the_circuit(registrar: SipRegistrar) -> None:
    adapter = sip_adapter(registrar.uri)
    async with Pool(adapter, fast(min_size=1, max_size=1), name="sip") as pool:
        registrar.mode = "403"
        await wait_until(lambda: pool.state is PoolState.UNAVAILABLE, timeout=5)
        last = pool.last_error
        assert isinstance(last, ConnectError)
        assert last.status == 403
        assert last.fatal


# -- leases --------------------------------------------------------------------------------------


async def test_lease_gives_the_account_on_the_owner_thread(registrar: SipRegistrar) -> None:
    adapter = sip_adapter(registrar.uri)
    async with Pool(adapter, fast(min_size=1, max_size=2, max_streams=2), name="sip") as pool:
        async with pool.acquire() as a, pool.acquire() as b:
            assert a.conn is b.conn  # two calls share one registration
            assert isinstance(a.conn, SipRegistration)

            def inspect(ctx: OwnerContext) -> tuple[bool, int, str]:
                info = ctx.account.info
                ctx.keep("note", object())
                return info.regIsActive, int(info.regStatus), info.uri

            active, status, uri = await a.conn.run(inspect)
            assert active
            assert status == 200
            assert uri == "sip:alice@127.0.0.1"
            async with pool.acquire() as c:
                assert c.conn is not a.conn  # full: the pool opened another registration
        assert registrar.binding_count() == 2
    assert registrar.binding_count() == 0


async def test_owner_function_errors_propagate(registrar: SipRegistrar) -> None:
    adapter = sip_adapter(registrar.uri)
    async with Pool(adapter, fast(), name="sip") as pool, pool.acquire() as lease:

        def boom(ctx: OwnerContext) -> None:
            raise ValueError("from the owner thread")

        with pytest.raises(ValueError, match="from the owner thread"):
            await lease.conn.run(boom)
        assert lease.conn.registered


# -- the engine -----------------------------------------------------------------------------------


async def test_engine_starts_lazily_and_stops_with_its_last_user(registrar: SipRegistrar) -> None:
    engine = SipEngine.get()
    assert engine.stats().state == "stopped"
    adapter = sip_adapter(registrar.uri)
    pool = Pool(adapter, fast(), name="sip")  # built, not started: pins nothing
    assert engine.stats().users == 0
    assert engine.stats().state == "stopped"
    await pool.start()  # attached from start to close: the engine has users
    assert engine.stats().users >= 1
    assert engine.stats().state == "running"
    await pool.aclose()
    assert await engine.wait_stopped(5)
    assert engine.stats().users == 0
    # It starts again in the same process.
    for _ in range(3):
        conn = await adapter.connect()
        await adapter.close(conn)
        assert await engine.wait_stopped(5)
    assert registrar.binding_count() == 0


async def test_hold_keeps_one_engine_across_pools(registrar: SipRegistrar) -> None:
    engine = SipEngine.get()
    starts = engine.stats().starts
    with engine.hold():
        for _ in range(3):
            async with Pool(sip_adapter(registrar.uri), fast(), name="sip"):
                pass
            assert engine.stats().state == "running"
    assert engine.stats().starts == starts + 1
    assert await engine.wait_stopped(5)


async def test_pjsua2_objects_never_leave_the_owner_thread(registrar: SipRegistrar) -> None:
    adapter = sip_adapter(registrar.uri)
    kept: list[OwnerContext] = []
    async with Pool(adapter, fast(), name="sip") as pool, pool.acquire() as lease:
        with pytest.raises(TypeError, match="returned a pjsua2 object"):
            await lease.conn.run(lambda ctx: ctx.account)  # dropped here, it would abort
        with pytest.raises(TypeError, match="returned a pjsua2 object"):
            await lease.conn.run(lambda ctx: (1, ctx.endpoint))
        await lease.conn.run(kept.append)
        with pytest.raises(RuntimeError, match="only valid during the call"):
            kept[0].account  # noqa: B018 - a context kept past its call is empty


# -- which binding ---------------------------------------------------------------------------------


def test_binding_choice_is_named_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    from voicepool.adapters.sip import _binding

    monkeypatch.delenv(_binding.BINDING_ENV, raising=False)
    name, path, _version = _binding.choose()
    assert name == "pjsua2-pybind11"  # the default whenever it is installed
    assert path.endswith(".so")
    monkeypatch.setenv(_binding.BINDING_ENV, "pjsua3")
    with pytest.raises(ConfigError, match="VOICEPOOL_SIP_BINDING='pjsua3': expected one of"):
        SipAdapter(SipOptions(aor="sip:a@h"))
    monkeypatch.setenv(_binding.BINDING_ENV, "pjsua2-python")
    if _binding._installed("pjsua2-python") is None:  # it lives in .venv/sip-tls, not here
        with pytest.raises(ConfigError, match=r"pip install 'voicepool\[sip-tls\]'"):
            SipAdapter(SipOptions(aor="sip:a@h"))


async def test_tls_on_the_default_binding_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from voicepool.adapters.sip import _binding

    if _binding.load().has_tls:
        pytest.skip("this binding has TLS")
    adapter = sip_adapter("sip:127.0.0.1:9;transport=tls", transport="tls")
    with pytest.raises(ConnectError, match="VOICEPOOL_SIP_BINDING=pjsua2-python") as info:
        await adapter.connect()
    assert "voicepool[sip-tls]" in str(info.value)
    assert info.value.fatal

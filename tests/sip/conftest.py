"""Fixtures of the SIP tests: real registrars on 127.0.0.1 and the process's pjsua2 engine.

pjsua2 state is per process and the tests share one process, so:

* the engine starts and stops with its users; every test must leave it with no account, which
  the autouse ``engine`` fixture checks (and it waits for the owner thread to end), so no test
  starts with an account of another one and no test can pass 8 accounts at once by accident;
* engine settings suited to fast tests are applied once (a 3 s transaction timeout, so an
  abandoned UDP REGISTER stops being retransmitted quickly).

Timing: every duration comes from ``FAST``; assertions on time are generous (2 shared cores).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from pydantic import SecretStr

from tests.peers.kamailio import Kamailio, kamailio_available
from voicepool import PoolSettings
from voicepool.adapters.sip import SipAdapter, SipEngine, SipOptions, configure_engine
from voicepool.testing.sip_registrar import SipRegistrar

KamailioFactory = Callable[..., Awaitable[Kamailio]]

# Pool settings that make a SIP pool react in well under a second.
FAST = PoolSettings(
    min_size=1,
    max_size=1,
    connect_timeout=1.0,
    acquire_timeout=0.5,
    ping_interval=0.5,
    ping_timeout=0.4,
    failure_threshold=1,
    backoff_initial=0.1,
    backoff_max=0.5,
    drain_timeout=1.0,
)


def fast(**changes: Any) -> PoolSettings:
    """``FAST`` with some fields changed."""
    return FAST.model_copy(update=changes)


@pytest.fixture(scope="session", autouse=True)
def _engine_config() -> Iterator[None]:
    before = SipEngine.get().config
    configure_engine(transaction_timeout=3.0, stop_timeout=2.0)
    yield
    SipEngine.get().config = before


@pytest.fixture(autouse=True)
async def engine() -> AsyncIterator[SipEngine]:
    """The engine; at teardown, no SIP account may be left and the owner thread must be gone."""
    eng = SipEngine.get()
    yield eng
    for _ in range(250):  # closes started in the background (cancelled connects): <= 5 s
        if not eng.stats().accounts:
            break
        await asyncio.sleep(0.02)
    stats = eng.stats()
    assert stats.accounts == 0, f"a test left SIP accounts behind: {stats}"
    assert await eng.wait_stopped(5), f"the SIP engine did not stop: {eng.stats()}"


@pytest.fixture
async def registrar() -> AsyncIterator[SipRegistrar]:
    """The in-process registrar emulator (UDP + TCP), user alice / secret, realm voicepool."""
    async with SipRegistrar(users={"alice": "secret", "bob": "secret"}) as reg:
        yield reg


@pytest.fixture
async def kamailio() -> AsyncIterator[Kamailio]:
    """A real Kamailio registrar (password "secret"), skipped when it is not installed."""
    if not kamailio_available():
        pytest.skip("kamailio/kamcmd not installed (scripts/install-system-deps.sh installs them)")
    async with Kamailio(password="secret") as kam:
        yield kam


@pytest.fixture
async def kamailio_factory() -> AsyncIterator[KamailioFactory]:
    """Factory for Kamailio variants (``wrong_password_403=True``, ...); all stopped at the end."""
    if not kamailio_available():
        pytest.skip("kamailio/kamcmd not installed (scripts/install-system-deps.sh installs them)")
    started: list[Kamailio] = []

    async def make(**kwargs: Any) -> Kamailio:
        kam = Kamailio(**kwargs)
        started.append(kam)
        return await kam.start()

    try:
        yield make
    finally:
        for kam in started:
            await kam.aclose()


def sip_options(registrar_uri: str, **changes: Any) -> SipOptions:
    """Options for alice on ``registrar_uri`` over UDP, bound to 127.0.0.1, expires 10 s."""
    values: dict[str, Any] = {
        "aor": "sip:alice@127.0.0.1",
        "registrar": registrar_uri,
        "password": SecretStr("secret"),
        "transport": "udp",
        "expires": 10,
        "bind_address": "127.0.0.1",
        "unregister_timeout": 0.5,
    }
    values.update(changes)
    return SipOptions(**values)


def sip_adapter(registrar_uri: str, **changes: Any) -> SipAdapter:
    return SipAdapter(sip_options(registrar_uri, **changes))

"""[groups.<name>] settings and the manager's groups, against real TCP servers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.settings.conftest import LIMITED, EchoServer
from tests.settings.conftest import echo_pool as _echo_pool
from voicepool import ConfigError, PoolGroup, PoolManager, PoolState, PoolUnavailable
from voicepool.settings import VoicePoolSettings

MakeServer = Callable[..., Awaitable[EchoServer]]


def echo_pool(port: int, **fields: Any) -> dict[str, Any]:
    fields.setdefault("min_size", 2)
    fields.setdefault("max_size", 2)
    return _echo_pool(port, **fields)


async def test_manager_boots_a_group_and_acquire_resolves_its_name(echo_server: MakeServer) -> None:
    primary, standby = await echo_server(), await echo_server()
    settings = VoicePoolSettings(
        pools={"asr": echo_pool(primary.port), "asr_eu": echo_pool(standby.port)},
        groups={"speech": {"members": ["asr", "asr_eu"], "failback_after": 5}},
    )
    async with PoolManager.from_settings(settings) as manager:
        group = manager.groups["speech"]
        assert isinstance(group, PoolGroup)
        assert group.standby == "adaptive"  # the default: its floor follows the traffic
        assert (primary.open, standby.open) == (2, 1)  # no traffic yet: standby_min
        async with manager.acquire("speech") as lease:
            assert lease.pool is manager["asr"]
            assert await lease.conn.request("hi") == "hi"
        async with manager.acquire("asr_eu") as lease:  # members stay reachable by name
            assert lease.pool.name == "asr_eu"


async def test_group_is_ready_when_one_member_is(echo_server: MakeServer) -> None:
    standby = await echo_server()
    down = await echo_server()
    down.refuse = True
    settings = VoicePoolSettings(
        pools={"a": echo_pool(down.port, failure_threshold=1), "b": echo_pool(standby.port)},
        groups={"g": {"members": ["a", "b"]}},
    )
    async with PoolManager.from_settings(settings) as manager:
        assert manager["a"].state is PoolState.UNAVAILABLE
        async with manager.acquire("g") as lease:
            assert lease.pool.name == "b"


async def test_group_with_no_member_up_fails_the_boot_with_each_error(
    echo_server: MakeServer,
) -> None:
    a, b = await echo_server(), await echo_server()
    a.refuse = b.refuse = True
    settings = VoicePoolSettings(
        pools={"a": echo_pool(a.port, failure_threshold=1), "b": echo_pool(b.port)},
        groups={"g": {"members": ["a", "b"]}},
    )
    with pytest.raises(PoolUnavailable, match="'g'") as info:
        async with PoolManager.from_settings(settings):
            pass
    group_error = info.value.__cause__
    assert isinstance(group_error, PoolUnavailable)
    assert isinstance(group_error.__cause__, ExceptionGroup)
    assert len(group_error.__cause__.exceptions) == 2


def test_adapters_of_one_service_may_share_a_group() -> None:
    tts = {"url": "wss://127.0.0.1:1", "api_key": "k"}
    settings = VoicePoolSettings(
        pools={
            "tts": {"adapter": "elevenlabs", "options": tts},
            "tts_backup": {"adapter": "cartesia", "options": tts},
            "asr": {"adapter": "deepgram", "options": tts},
        },
        groups={"voice": {"members": ["tts", "tts_backup"]}},
    )
    assert settings.groups["voice"].members == ["tts", "tts_backup"]
    with pytest.raises(ConfigError, match=r"groups\.bad\.members: .*service tts.*service asr"):
        VoicePoolSettings(
            pools=dict(settings.pools),
            groups={"bad": {"members": ["tts", "asr"]}},
        )


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ({"g": {"members": ["a", "nope"]}}, r"groups\.g\.members: no pool named 'nope'"),
        (
            {"g": {"members": ["a"]}, "h": {"members": ["a", "b"]}},
            r"groups\.h\.members: pool 'a' is already a member of group 'g'",
        ),
        ({"g": {"members": ["a", "c"]}}, r"groups\.g\.members: members use incompatible adapters"),
        ({"a": {"members": ["b"]}}, r"groups\.a: a pool is named 'a' too"),
        ({"g": {"members": ["a"], "policy": "fastest"}}, r"groups\.g\.policy"),
        ({"g": {"members": ["a"], "standby_min": -1}}, r"groups\.g\.standby_min"),
        ({"g": {"members": ["a"], "standby": "sometimes"}}, r"groups\.g\.standby"),
        ({"g": {"members": []}}, r"groups\.g\.members"),
        ({"g": {"members": ["a"], "colour": "red"}}, r"groups\.g\.colour"),
    ],
)
def test_group_validation_names_the_field(groups: dict[str, Any], message: str) -> None:
    pools = {"a": echo_pool(1), "b": echo_pool(2), "c": echo_pool(3, adapter=LIMITED)}
    with pytest.raises(ConfigError, match=message):
        VoicePoolSettings(pools=pools, groups=groups)

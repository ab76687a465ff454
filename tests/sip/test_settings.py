"""A SIP setup that needs more than pjsua2's 8 accounts per process is rejected at boot."""

from __future__ import annotations

import pytest

from voicepool import ConfigError
from voicepool.settings import VoicePoolSettings

OPTIONS = {"aor": "sip:worker@sip.example.com", "password": "hunter2", "transport": "udp"}


def sip_pool(**settings: object) -> dict[str, object]:
    return {"adapter": "sip", "options": dict(OPTIONS), **settings}


def test_eight_registrations_fit() -> None:
    settings = VoicePoolSettings(pools={"sip": sip_pool(max_size=8)})
    assert settings.pools["sip"].settings.max_size == 8


@pytest.mark.parametrize(
    "pools",
    [
        {"sip": sip_pool(max_size=9)},
        {"trunk_a": sip_pool(max_size=5), "trunk_b": sip_pool(max_size=4)},
        {"sip": sip_pool(concurrency=40)},  # sizing rule: 40 x 1.25 / 4 streams = 13
    ],
)
def test_more_than_eight_is_rejected_with_an_explanation(pools: dict[str, object]) -> None:
    with pytest.raises(ConfigError) as info:
        VoicePoolSettings(pools=pools)
    message = str(info.value)
    assert "allows at most 8 connections per process" in message
    assert "max_size" in message
    assert "hunter2" not in message

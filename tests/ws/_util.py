"""Helpers of the WebSocket pool tests (fixtures are in conftest.py)."""

from __future__ import annotations

from voicepool import PoolSettings

API_KEY = "test-key-5f1c"  # what the emulators accept; never expected in any log or message
IDLE = 1.0  # the emulators' idle close in these tests, seconds


def settings(**overrides: object) -> PoolSettings:
    """Pool settings for these tests: fast pings, fast backoff, short timeouts."""
    base: dict[str, object] = {
        "concurrency": 2,
        "ping_interval": 0.25,
        "ping_timeout": 0.25,
        "connect_timeout": 3.0,
        "acquire_timeout": 3.0,
        "backoff_initial": 0.05,
        "backoff_max": 0.2,
        "drain_timeout": 1.0,
    }
    base.update(overrides)
    return PoolSettings.model_validate(base)

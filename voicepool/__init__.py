"""voicepool: warm, health-checked, bounded connection pools for voice-agent workers.

No phone call should pay a connection handshake inside a conversational turn: voicepool opens the
ASR / TTS WebSockets, LLM HTTP/2 connections, REST keep-alives and SIP registrations a worker needs
at boot, keeps them healthy out of band, and lends them with ``async with pool.acquire() as lease``.
"""

# Importing voicepool.telemetry registers the default OpenTelemetry observer (global providers:
# a no-op until the application installs an SDK).
from voicepool import telemetry as telemetry
from voicepool._version import __version__
from voicepool.adapter import (
    Adapter,
    LeaseMode,
    get_adapter,
    register_adapter,
    registered_adapters,
)
from voicepool.errors import (
    AdapterNotFound,
    ConfigError,
    ConnectError,
    LeaseReleased,
    PoolClosed,
    PoolError,
    PoolExhausted,
    PoolLoopError,
    PoolUnavailable,
    VoicepoolError,
)
from voicepool.lease import Lease
from voicepool.manager import PoolManager
from voicepool.pool import Pool, PoolState, PoolStats
from voicepool.pool_settings import PoolSettings
from voicepool.settings import VoicePoolSettings
from voicepool.shutdown import GracefulShutdown

__all__ = [  # noqa: RUF022 - grouped by topic, as the docs list them
    # adapters
    "Adapter",
    "LeaseMode",
    "get_adapter",
    "register_adapter",
    "registered_adapters",
    # pools
    "Lease",
    "Pool",
    "PoolSettings",
    "PoolState",
    "PoolStats",
    # settings, manager, worker embedding
    "GracefulShutdown",
    "PoolManager",
    "VoicePoolSettings",
    # errors
    "AdapterNotFound",
    "ConfigError",
    "ConnectError",
    "LeaseReleased",
    "PoolClosed",
    "PoolError",
    "PoolExhausted",
    "PoolLoopError",
    "PoolUnavailable",
    "VoicepoolError",
    "__version__",
]

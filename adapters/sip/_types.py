"""Plain data shared by the SIP engine, its owner thread and the adapter (no pjsua2 import)."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import SecretStr

from ._binding import PJSUA_MAX_CALLS  # noqa: TID251

__all__ = ["AccountSpec", "EngineConfig", "EngineStats", "RegEvent"]


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Process-wide pjsua2 settings, applied when the engine (re)starts.

    Raises ValueError on construction for an out-of-range value.
    """

    poll_interval: float = 0.05
    """Longest single poll (s). Commands wake the poll at once; this bounds deadline checks."""
    transaction_timeout: float = 32.0
    """PJSIP transaction timeout (Timer B/F, s): how long an unanswered request lives (and, over
    UDP, keeps being retransmitted, even after its account was abandoned)."""
    log_level: int = 0
    """PJSIP console log level (0 = silent ... 6). Levels above 3 print SIP messages."""
    max_calls: int = PJSUA_MAX_CALLS
    """Concurrent calls in the process (PJSUA_MAX_CALLS = 32 is compiled into the wheel)."""
    stop_timeout: float = 5.0
    """On stop, how long the un-REGISTERs of accounts still open may take before libDestroy."""

    def __post_init__(self) -> None:
        if not 0.001 <= self.poll_interval <= 1.0:
            raise ValueError(f"poll_interval must be in [0.001, 1] s, got {self.poll_interval}")
        if not 1.0 <= self.transaction_timeout <= 64.0:
            raise ValueError(
                f"transaction_timeout must be in [1, 64] s, got {self.transaction_timeout}"
            )
        if not 1 <= self.max_calls <= PJSUA_MAX_CALLS:
            raise ValueError(f"max_calls must be in [1, {PJSUA_MAX_CALLS}], got {self.max_calls}")
        if not 0 <= self.log_level <= 6:
            raise ValueError(f"log_level must be in [0, 6], got {self.log_level}")
        if not 0 <= self.stop_timeout <= 60:
            raise ValueError(f"stop_timeout must be in [0, 60] s, got {self.stop_timeout}")


@dataclass(frozen=True, slots=True)
class AccountSpec:
    """What the owner thread needs to create one registering account.

    The password stays a ``SecretStr`` (its repr is masked) until it is copied into PJSIP's own
    credential struct on the owner thread.
    """

    id_uri: str
    registrar_uri: str
    transport: str  # "udp" | "tcp" | "tls"
    username: str
    password: SecretStr | None
    realm: str = "*"
    expires: int = 300
    bind_address: str | None = None
    contact_uri_params: str = ""
    proxies: tuple[str, ...] = ()
    unregister_timeout: float = 2.0
    tls_ca_file: str | None = None
    tls_verify_server: bool = True


@dataclass(frozen=True, slots=True)
class RegEvent:
    """One ``onRegState`` callback: the final outcome of a REGISTER (or an un-REGISTER)."""

    code: int
    """SIP status. PJSIP reports transport failures as 408 / 503 with a non-zero ``status``."""
    reason: str
    expiration: int
    """Seconds granted by the registrar; 0 after an un-REGISTER or a failure."""
    status: int
    """pj_status_t: 0 when a SIP response was received."""
    at: float
    """``time.monotonic()`` when the callback ran (the event loop's clock too)."""

    @property
    def ok(self) -> bool:
        """A successful REGISTER that left a binding on the registrar."""
        return 200 <= self.code < 300 and self.expiration > 0


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot of the engine, for tests and health endpoints."""

    state: str
    """stopped | starting | running | stopping"""
    users: int
    """Holders keeping the engine up: accounts, pools, explicit holds."""
    accounts: int
    """Account slots taken (open and closing); at most PJSUA_MAX_ACC."""
    closing: int
    starts: int
    """Times the owner thread was started in this process."""

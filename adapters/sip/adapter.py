"""`SipAdapter`: SIP registrations as pooled connections, on the process's pjsua2 engine.

Each pooled connection is one registered account (:class:`SipRegistration`). Leases are
MULTIPLEXED: ``max_streams`` is the number of concurrent calls a registration takes (default 4;
override with ``PoolSettings.max_streams``). A lease gives the call handler the registration,
whose :meth:`SipRegistration.run` executes a function on the owner thread with the
``pjsua2.Account`` to place a call (``pjsua2.Call(ctx.account).makeCall(...)``) or to accept
the calls it receives (:meth:`~voicepool.adapters.sip.OwnerContext.on_incoming_call`).

Health is tracked here, not read from pjsua (whose account info stays "active/200" through an
outage): each successful REGISTER sets ``valid_until = now + granted expiry``; a failed refresh, a
lapse past ``valid_until`` or a lost transport marks the registration LOST and tells the pool
(``connection_changed``), so acquire never hands out a dead registration. A lost transport is a
TCP/TLS connection that dropped: the owner thread then refreshes every TCP/TLS registration at
once (a registrar reaches such a binding only over its connection), which fails within
milliseconds when the registrar is gone, and fails a REGISTER that was in flight on it. Over UDP
nothing drops: a silent registrar is found by the ping or the lapse. A lease does no I/O, so
however often a registration is leased, the pool still pings it every ``ping_interval``
(``use_proves_liveness = False``). The active check
(``ping``) is a refresh REGISTER: it proves the registrar is up, still accepts our credentials
and still holds the binding (2 round trips with digest auth; see benchmarks/sip.py).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from voicepool.adapter import Adapter, LeaseMode
from voicepool.errors import ConfigError, ConnectError
from voicepool.settings import NO_SECRET, OptionalSecret

from ._binding import (  # noqa: TID251
    PJSUA_MAX_ACC,
    TLS_HINT,
    BindingMissing,
    choose,
    load,
    summary,
)
from ._owner import OwnerContext  # noqa: TID251
from ._types import AccountSpec, RegEvent  # noqa: TID251
from .engine import SipEngine, _bridge  # noqa: TID251

__all__ = ["RegState", "SipAdapter", "SipOptions", "SipRegistration"]

T = TypeVar("T")
log = logging.getLogger("voicepool.sip")

# Retrying cannot cure these answers to a REGISTER: wrong credentials, forbidden, unknown user.
FATAL_STATUSES = frozenset({401, 403, 404, 407})


class SipOptions(BaseModel):
    """Options of one SIP pool (validated at boot; the password is never logged)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    aor: str = Field(description="Address of record, e.g. sip:alice@carrier.example.")
    registrar: str | None = Field(
        default=None,
        description="Registrar URI, e.g. sip:carrier.example:5060; default: the AOR's host.",
    )
    username: str | None = Field(
        default=None, description="Digest user; default: the AOR's user part."
    )
    password: OptionalSecret = Field(default=NO_SECRET, description="Digest password.")
    realm: str = Field(default="*", description="Digest realm the credentials answer; * = any.")
    transport: Literal["udp", "tcp", "tls"] = "udp"
    expires: int = Field(
        default=300,
        ge=10,
        le=86400,
        description="Requested registration lifetime (s); pjsua needs >= 10.",
    )
    bind_address: str | None = Field(
        default=None, description="Local address of the SIP transport; default: all interfaces."
    )
    proxies: tuple[str, ...] = Field(default=(), description="Outbound proxy URIs, in order.")
    unregister_timeout: float = Field(
        default=2.0, gt=0, le=30, description="Longest wait for the un-REGISTER answer on close."
    )
    tls_ca_file: str | None = Field(
        default=None,
        description="TLS: PEM file of the CAs that sign the registrar's certificate (default:"
        " the bundled OpenSSL's default paths).",
    )
    tls_verify_server: bool = Field(
        default=True,
        description="TLS: refuse a registrar whose certificate or name does not verify.",
    )

    @field_validator("aor")
    @classmethod
    def _check_aor(cls, value: str) -> str:
        scheme, _, rest = value.partition(":")
        user, at, host = rest.partition("@")
        if scheme not in ("sip", "sips") or not at or not user or not host:
            raise ValueError(f"aor must look like sip:user@host, got {value!r}")
        return value

    @field_validator("registrar")
    @classmethod
    def _check_registrar(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("sip:", "sips:")):
            raise ValueError(f"registrar must be a sip: or sips: URI, got {value!r}")
        return value

    @field_validator("proxies")
    @classmethod
    def _check_proxies(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for proxy in value:
            if not proxy.startswith(("sip:", "sips:")):
                raise ValueError(f"proxies must be sip: or sips: URIs, got {proxy!r}")
        return value

    @model_validator(mode="after")
    def _check_transport(self) -> SipOptions:
        secure = self.aor.startswith("sips:") or self.registrar_uri_base.startswith("sips:")
        if secure and self.transport != "tls":
            raise ValueError("a sips: URI needs transport 'tls'")
        return self

    @property
    def aor_user(self) -> str:
        return self.aor.partition(":")[2].partition("@")[0]

    @property
    def aor_host(self) -> str:
        return self.aor.partition("@")[2]

    @property
    def registrar_uri_base(self) -> str:
        """The registrar URI without transport parameter."""
        if self.registrar is not None:
            return self.registrar
        return f"{self.aor.partition(':')[0]}:{self.aor_host}"

    @property
    def registrar_uri(self) -> str:
        """The registrar URI as pjsua gets it, with the transport made explicit."""
        base = self.registrar_uri_base
        if ";transport=" in base.lower():
            return base
        return f"{base};transport={self.transport}"


class RegState(enum.Enum):
    """Lifecycle of a :class:`SipRegistration`."""

    REGISTERING = "registering"
    REGISTERED = "registered"
    LOST = "lost"  # the registrar refused a refresh, went silent, or the binding lapsed
    CLOSING = "closing"
    CLOSED = "closed"


class SipRegistration:
    """One registered SIP account: the connection a :class:`SipAdapter` pool lends.

    Read-only attributes for call handlers and health checks: ``aor``, ``contact_tag``,
    ``state``, ``status`` / ``reason`` (last REGISTER answer), ``expires`` (granted seconds),
    ``registered_at`` and ``valid_until`` (monotonic), ``registers`` (successful REGISTERs).
    """

    __slots__ = (
        "_adapter",
        "_engine",
        "_lapse",
        "_waiters",
        "aor",
        "contact_tag",
        "expires",
        "key",
        "loss_error",
        "reason",
        "registered_at",
        "registers",
        "state",
        "status",
        "valid_until",
    )

    def __init__(self, adapter: SipAdapter, engine: SipEngine, aor: str, contact_tag: str) -> None:
        self._adapter = adapter
        self._engine = engine
        self.aor = aor
        self.contact_tag = contact_tag
        self.key: int | None = None
        self.state = RegState.REGISTERING
        self.status: int | None = None
        self.loss_error: ConnectError | None = None  # the failed REGISTER that ended it
        self.reason = ""
        self.expires = 0
        self.registered_at = 0.0
        self.valid_until = 0.0
        self.registers = 0
        self._waiters: list[asyncio.Future[RegEvent]] = []
        self._lapse: asyncio.TimerHandle | None = None

    @property
    def registered(self) -> bool:
        """Registered now, by our own account of it (no I/O, nothing asked of pjsua)."""
        return self.state is RegState.REGISTERED and time.monotonic() < self.valid_until

    async def run(self, fn: Callable[[OwnerContext], T]) -> T:
        """Run ``fn(ctx)`` on the pjsua2 owner thread with this registration's account.

        This is how a call handler places or accepts calls: ``ctx.account`` is the
        ``pjsua2.Account``; keep the ``pjsua2.Call`` objects with ``ctx.keep``. Raises
        ConnectError once the registration is closing; exceptions of ``fn`` propagate.
        Cancelling the await does not stop ``fn`` once it started.
        """
        if self.key is None or self.state in (RegState.CLOSING, RegState.CLOSED):
            raise ConnectError(f"SIP registration of {self.aor} is closed")
        return await self._engine.run(self.key, fn)

    def __repr__(self) -> str:
        return (
            f"<SipRegistration {self.aor} #{self.key} {self.state.value}"
            f" status={self.status} expires={self.expires}>"
        )

    # -- driven by the adapter, on the event loop --------------------------------------------------

    def _expect(self) -> asyncio.Future[RegEvent]:
        """A future for the next RegEvent of this account."""
        fut: asyncio.Future[RegEvent] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        return fut

    def _on_event(self, event: RegEvent) -> None:
        """Sink for the engine: runs on the event loop for each onRegState. Never raises."""
        waiters, self._waiters = self._waiters, []
        if self.state in (RegState.REGISTERING, RegState.REGISTERED, RegState.LOST):
            self.status, self.reason = event.code, event.reason
            if event.ok:
                self.state = RegState.REGISTERED
                self.registers += 1
                self.expires = event.expiration
                self.registered_at = event.at
                self.valid_until = event.at + event.expiration
                self._arm_lapse()
            else:
                # Kept for the pool (SipAdapter.connection_error): a 403 on a refresh is the
                # reason the registration ended, fatal, with its status.
                self.loss_error = self._adapter._register_error(event, refresh=True)
                self._lost()
        for fut in waiters:
            if not fut.done():
                fut.set_result(event)

    def _arm_lapse(self) -> None:
        # The binding expires at valid_until unless a refresh succeeds first: treat that moment
        # as a loss even if pjsua never reports one (a UDP registrar that went silent).
        if self._lapse is not None:
            self._lapse.cancel()
        loop = asyncio.get_running_loop()
        delay = self.valid_until - time.monotonic()
        self._lapse = loop.call_at(loop.time() + delay, self._lapsed)

    def _lapsed(self) -> None:
        self._lapse = None
        if self.state is RegState.REGISTERED and time.monotonic() >= self.valid_until:
            self.reason = "registration expired without a successful refresh"
            self._lost()

    def _lost(self) -> None:
        was = self.state
        self.state = RegState.LOST
        if self._lapse is not None:
            self._lapse.cancel()
            self._lapse = None
        if was is RegState.REGISTERED:
            log.info(
                "SIP registration of %s (#%s) lost: %s %s", self.aor, self.key, self.status,
                self.reason,
            )  # fmt: skip
            self._adapter.connection_changed(self)

    def _closing(self) -> None:
        self.state = RegState.CLOSING
        if self._lapse is not None:
            self._lapse.cancel()
            self._lapse = None
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_exception(ConnectError(f"SIP registration of {self.aor} is closing"))
                fut.exception()  # whoever awaits it still gets it; nobody awaiting is fine too


class SipAdapter(Adapter[SipRegistration]):
    """SIP registrations on pjsua2 (``adapter = "sip"``); see the module docstring.

    Raises ConfigError at construction when pjsua2 is not installed. ``connect`` registers and
    waits for the 200: 401/403/404/407 raise ``ConnectError(fatal=True, status=...)``, other
    answers (503, 408, transport errors) a retryable ``ConnectError`` with the status.
    """

    service: ClassVar[str | None] = "sip"
    lease_mode = LeaseMode.MULTIPLEXED
    max_streams = 4  # concurrent calls per registration; PoolSettings.max_streams overrides
    max_connections_per_process: ClassVar[int | None] = PJSUA_MAX_ACC
    # A lease hands out a registration; nothing it does proves the registrar still holds it.
    use_proves_liveness: ClassVar[bool] = False
    Options: ClassVar[type[BaseModel] | None] = SipOptions

    def __init__(self, options: SipOptions, *, engine: SipEngine | None = None) -> None:
        try:
            choose()
        except BindingMissing as exc:
            raise ConfigError(f"adapter 'sip': {exc}") from None
        self.options = options
        self._engine = engine if engine is not None else SipEngine.get()

    def describe(self) -> str:
        o = self.options
        return f"SIP registrar {o.registrar_uri_base} ({o.transport}) as {o.aor}, on {summary()}"

    # -- the pool contract -------------------------------------------------------------------------

    async def connect(self) -> SipRegistration:
        """REGISTER a new account and wait for the registrar's 200.

        Cancellation-safe: a cancelled connect un-REGISTERs (if it got that far) and removes the
        account in the background. Raises ConnectError (see the class docstring).
        """
        try:
            binding = load()
        except BindingMissing as exc:
            raise ConnectError(f"adapter 'sip': {exc}", fatal=True) from exc
        o = self.options
        if o.transport == "tls" and not binding.has_tls:
            raise ConnectError(
                f"adapter 'sip': {binding.name} has no TLS transport (PJSIP built without"
                f" OpenSSL). {TLS_HINT}",
                fatal=True,
            )
        tag = secrets.token_hex(4)
        reg = SipRegistration(self, self._engine, o.aor, tag)
        first = reg._expect()
        try:
            reg.key = await self._engine.add_account(self._spec(tag), reg._on_event)
            event = await first
        except BaseException:
            first.cancel()
            self._discard(reg)
            raise
        if not event.ok:
            self._discard(reg)
            raise self._register_error(event)
        return reg

    async def ping(self, conn: SipRegistration) -> None:
        """Refresh the registration now (a REGISTER, or join the one in flight) and wait for 200.

        Raises ConnectError when the registrar refuses it or the registration is not live;
        the pool's ``ping_timeout`` bounds a silent registrar.
        """
        if not conn.registered or conn.key is None:
            raise ConnectError(
                f"SIP registration of {conn.aor} is {conn.state.value}: {conn.reason}",
                status=conn.status,
            )
        waiter = conn._expect()
        try:
            await self._engine.refresh(conn.key)
            event = await waiter
        finally:
            waiter.cancel()
        if not event.ok:
            raise self._register_error(event, refresh=True)

    def is_open(self, conn: SipRegistration) -> bool:
        return conn.registered

    def connection_error(self, conn: SipRegistration) -> BaseException | None:
        """The refused REGISTER that ended ``conn`` (fatal for 401/403/404/407), or None."""
        return conn.loss_error if conn.state is RegState.LOST else None

    async def close(self, conn: SipRegistration) -> None:
        """Un-REGISTER and remove the account (bounded by ``unregister_timeout``).

        The un-REGISTER runs on the owner thread to its end even if this await is cancelled.
        """
        conn._closing()
        if conn.key is not None:
            await asyncio.shield(_bridge(self._engine.remove(conn.key)))
        conn.state = RegState.CLOSED

    # -- engine users: a pool attaches with watch() and detaches with unwatch() --------------------

    def watch(self, callback: Callable[[Any], None]) -> None:
        super().watch(callback)
        self._engine.retain()

    def unwatch(self, callback: Callable[[Any], None]) -> None:
        if self._watchers and callback in self._watchers:
            super().unwatch(callback)
            self._engine.release()

    # -- helpers -----------------------------------------------------------------------------------

    def _spec(self, tag: str) -> AccountSpec:
        o = self.options
        return AccountSpec(
            id_uri=o.aor,
            registrar_uri=o.registrar_uri,
            transport=o.transport,
            username=o.username or o.aor_user,
            password=o.password,
            realm=o.realm,
            expires=o.expires,
            bind_address=o.bind_address,
            # A distinct Contact per pooled registration: N registrations of one AOR are N
            # bindings on the registrar, and un-REGISTERing one leaves the others in place.
            contact_uri_params=f";vpl={tag}",
            proxies=o.proxies,
            unregister_timeout=o.unregister_timeout,
            tls_ca_file=o.tls_ca_file,
            tls_verify_server=o.tls_verify_server,
        )

    def _discard(self, reg: SipRegistration) -> None:
        reg._closing()
        if reg.key is not None:
            self._engine.remove(reg.key)  # un-REGISTERs in the background if it got a 200
        reg.state = RegState.CLOSED

    def _register_error(self, event: RegEvent, *, refresh: bool = False) -> ConnectError:
        o = self.options
        what = "refresh REGISTER" if refresh else "REGISTER"
        # A certificate that does not verify is configuration, not an outage: retrying
        # cannot cure it (PJSIP reports it as a 503 with status PJSIP_TLS_ECERT*).
        bad_certificate = "PJSIP_TLS_ECERT" in event.reason
        fatal = event.code in FATAL_STATUSES or bad_certificate
        hint = ""
        if bad_certificate:
            hint = " (set tls_ca_file to the CA that signs the registrar's certificate?)"
        elif event.code in (401, 407):
            hint = " (wrong username or password?)"
        elif event.code == 403:
            hint = " (credentials or account refused)"
        detail = f"{event.code} {event.reason}".strip()
        if event.status and event.code not in FATAL_STATUSES and not bad_certificate:
            detail += " (no SIP answer: transport error or timeout)"
        return ConnectError(
            f"SIP registrar {o.registrar_uri_base} ({o.transport}) answered the {what} of"
            f" {o.aor} with {detail}{hint}",
            fatal=fatal,
            status=event.code,
        )

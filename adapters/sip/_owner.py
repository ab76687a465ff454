"""The owner-thread side of the SIP engine: everything that touches pjsua2.

An :class:`Owner` lives for one run of the engine's thread and is only ever used on that thread:
it boots PJSIP, creates and closes accounts, receives their callbacks, and destroys the library.
:mod:`voicepool.adapters.sip.engine` drives it and is the only way in from asyncio.

Closing an account is a small state machine (un-REGISTER, wait for the answer up to the spec's
``unregister_timeout``, then ``shutdown``) so that it completes even when whoever asked for it
was cancelled. Accounts are finalized from the loop, never inside a PJSIP callback.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import logging
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from voicepool.errors import ConnectError

from ._binding import PJSUA_MAX_ACC, TLS_HINT, Binding, load  # noqa: TID251
from ._types import AccountSpec, EngineConfig, RegEvent  # noqa: TID251

__all__ = ["Owner", "OwnerContext"]

log = logging.getLogger("voicepool.sip")
T = TypeVar("T")

_PJ_EEOF = 70016  # pj_status_t "End of file": what a dropped connection reports
_DESTROY_NO_NETWORK = 3  # PJSUA_DESTROY_NO_NETWORK: 17-31 ms instead of a fixed ~1 s wait


class OwnerContext:
    """Handed to functions run on the owner thread (:meth:`SipRegistration.run`).

    Valid only during that call and only on that thread: ``account`` is the ``pjsua2.Account``,
    ``endpoint`` the ``pjsua2.Endpoint``, ``pj`` the ``pjsua2`` module. Objects that must live as
    long as the account (the ``pjsua2.Call`` of a placed or accepted call) go into :meth:`keep`:
    they are dropped on the owner thread when the account closes. Never keep pjsua2 objects
    anywhere else: dropping one on another thread aborts the process.
    """

    __slots__ = ("_endpoint", "_rec", "pj")

    def __init__(self, pj: Any, endpoint: Any, rec: _Record) -> None:
        self.pj = pj
        self._endpoint = endpoint
        self._rec: _Record | None = rec

    @property
    def endpoint(self) -> Any:
        self._check()
        return self._endpoint

    @property
    def account(self) -> Any:
        return self._check().account

    def _check(self) -> _Record:
        if self._rec is None:
            raise RuntimeError("an OwnerContext is only valid during the call it was given to")
        return self._rec

    def _expire(self) -> None:
        # A context kept past its call must not keep pjsua2 objects alive (they would then die
        # on whichever thread drops the context last, which aborts the process).
        self._rec = None
        self._endpoint = None

    def keep(self, name: str, obj: T) -> T:
        """Keep ``obj`` alive until :meth:`drop` or the account closes; returns ``obj``."""
        self._check().objects[name] = obj
        return obj

    def get(self, name: str) -> Any:
        """The object kept under ``name``, or None."""
        return self._check().objects.get(name)

    def drop(self, name: str) -> None:
        """Release the object kept under ``name`` (here, on the owner thread). Unknown: ignored."""
        self._check().objects.pop(name, None)

    def on_incoming_call(self, handler: Callable[[OwnerContext, int], None] | None) -> None:
        """Call ``handler(ctx, call_id)`` on the owner thread for each incoming INVITE.

        The handler must create the ``pjsua2.Call`` for ``call_id`` (and :meth:`keep` it) before
        it returns: pjsua2 hangs up calls that no ``Call`` object claims, which is also what
        happens without a handler. Exceptions are logged and the call is left to that default.
        """
        self._check().incoming = handler


class _Record:
    """Owner-thread state of one account."""

    __slots__ = (
        "account",
        "closing",
        "deadline",
        "done",
        "in_flight",
        "incoming",
        "key",
        "loop",
        "notify_at",
        "objects",
        "registered",
        "sink",
        "spec",
        "unreg_sent",
    )

    def __init__(
        self,
        key: int,
        spec: AccountSpec,
        loop: asyncio.AbstractEventLoop,
        sink: Callable[[RegEvent], None],
    ) -> None:
        self.key = key
        self.spec = spec
        self.loop = loop
        self.sink = sink
        self.account: Any = None
        self.registered = False
        self.in_flight = False  # a REGISTER transaction runs: PJSIP refuses a second (EBUSY)
        self.closing = False
        self.unreg_sent = False
        self.deadline = 0.0  # closing: finalize (shutdown) at this time
        self.notify_at = 0.0  # closing: release whoever awaits the close at this time
        self.done: list[cf.Future[None]] = []
        self.objects: dict[str, Any] = {}
        self.incoming: Callable[[OwnerContext, int], None] | None = None


class Owner:
    """PJSIP state of one run of the owner thread. Every method runs on that thread."""

    def __init__(self, config: EngineConfig, free_slot: Callable[[int], None]) -> None:
        self.config = config
        self._free_slot = free_slot
        self._b: Binding | None = None
        self._ep: Any = None
        self._records: dict[int, _Record] = {}
        # (transport, bind address, TLS (CA file, verify) or None) -> PJSIP transport id
        self._transports: dict[tuple[str, str, tuple[str | None, bool] | None], int] = {}
        self._account_cls: Any = None
        self._pj_types: tuple[type, ...] | None = None
        self._transport_watch: Any = None  # a ctypes callback PJSIP calls until libDestroy
        self._connection_dropped = False

    @property
    def idle(self) -> bool:
        return not self._records

    # -- lifecycle ---------------------------------------------------------------------------------

    def boot(self) -> tuple[str, int]:
        """libCreate, libInit (no PJSIP threads), a loopback wake transport, null audio, libStart.

        Returns the wake transport's address. Raises BindingMissing or a pjsua2 error;
        call :meth:`teardown` afterwards in any case.
        """
        b = self._b = load()
        pj = b.pj
        config = self.config
        b.set_log_level(config.log_level)  # before libCreate: silences its banner
        self._ep = ep = pj.Endpoint()
        ep.libCreate()
        epc = pj.EpConfig()
        epc.uaConfig.threadCnt = 0  # PJSIP worker threads + Python callbacks deadlock: we poll
        epc.uaConfig.mainThreadOnly = False
        epc.uaConfig.maxCalls = config.max_calls
        epc.logConfig.level = config.log_level
        epc.logConfig.consoleLevel = config.log_level
        ep.libInit(epc)
        tc = pj.TransportConfig()
        tc.boundAddress = "127.0.0.1"
        tc.port = 0
        wake_id = ep.transportCreate(b.transport_type("udp"), tc)
        host, _, port = ep.transportGetInfo(wake_id).localName.rpartition(":")
        b.use_null_audio(ep)
        ep.libStart()
        b.set_transaction_timeout(round(config.transaction_timeout * 1000))
        self._transport_watch = b.watch_transports(self._on_connection_dropped)
        self._account_cls = _account_class(pj)
        return host, int(port)

    def poll(self, msec: int) -> None:
        assert self._b is not None
        self._b.handle_events(msec)
        if self._connection_dropped:
            self._connection_dropped = False
            self._verify_connected_accounts()

    def _on_connection_dropped(self) -> None:
        # Inside PJSIP's transport code: only note it; poll() acts once PJSIP has returned.
        self._connection_dropped = True

    def _verify_connected_accounts(self) -> None:
        """A TCP/TLS connection dropped: check every account that uses TCP/TLS.

        A registrar reaches a TCP/TLS binding only over the connection it was registered on,
        so the binding is as good as gone with it, and pjsua (its own retry is off) reports
        nothing. A refresh proves it either way: over a new connection it answers 200, and
        with the registrar down it fails at once (connection refused), which the adapter
        records as LOST. A REGISTER already in flight may have gone out on the dropped
        connection, where its answer can no longer arrive: PJSIP would wait for the
        transaction timeout (32 s by default), so it is reported failed now (its real outcome,
        later, is still delivered). Which connection dropped is not looked up (the binding
        exposes no transport of an account): an account whose connection is fine pays one
        REGISTER exchange, or one reconnect, on a rare event.
        """
        now = time.monotonic()
        for rec in list(self._records.values()):
            if rec.spec.transport == "udp" or rec.closing:
                continue
            if rec.in_flight:
                reason = "connection lost with the REGISTER in flight"
                lost = RegEvent(503, reason, 0, _PJ_EEOF, now)
                with contextlib.suppress(RuntimeError):  # that loop is closed
                    rec.loop.call_soon_threadsafe(rec.sink, lost)
            elif rec.registered:
                with contextlib.suppress(ConnectError):
                    self.refresh(rec.key)

    def expire(self, now: float) -> None:
        """Finalize closing accounts whose un-REGISTER was answered or timed out, and release
        the closers of those still waiting for a REGISTER in flight.
        """
        for rec in [r for r in self._records.values() if r.closing]:
            if rec.deadline <= now:
                self._finalize(rec)
            elif rec.notify_at <= now and rec.done:
                _resolve(rec.done)

    def close_all(self) -> None:
        """Start closing every account (un-REGISTER first), for an engine stop."""
        for rec in list(self._records.values()):
            self._close(rec, True, None)

    def teardown(self) -> None:
        """Shut every account down and destroy the library, on this thread. Never raises."""
        for rec in list(self._records.values()):
            self._finalize(rec)
        self._transports.clear()
        self._account_cls = None
        self._pj_types = None
        ep, self._ep = self._ep, None
        if ep is not None:
            try:
                ep.libDestroy(_DESTROY_NO_NETWORK)
            except Exception as exc:
                log.warning("SIP engine: libDestroy failed: %s", exc)
            del ep  # the Endpoint dies here, on the owner thread, after libDestroy
        self._transport_watch = None  # PJSIP is gone: nothing calls these any more

    # -- commands ----------------------------------------------------------------------------------

    def create(
        self,
        key: int,
        spec: AccountSpec,
        loop: asyncio.AbstractEventLoop,
        sink: Callable[[RegEvent], None],
    ) -> None:
        """Create account ``key``; it REGISTERs at once. Raises ConnectError / RuntimeError."""
        assert self._b is not None
        if self._b.account_count() >= PJSUA_MAX_ACC:  # a 9th create() would abort the process
            raise ConnectError(f"pjsua2 already holds {PJSUA_MAX_ACC} accounts")
        pj = self._b.pj
        tid = self._transport(spec)
        ac = pj.AccountConfig()  # not a standalone AccountRegConfig(): that one is all zeros
        ac.idUri = spec.id_uri
        reg = ac.regConfig
        reg.registrarUri = spec.registrar_uri
        reg.registerOnAdd = True
        reg.timeoutSec = spec.expires
        # The pool owns retries and backoff; PJSIP's own retry would double them (and it ignores
        # Retry-After). Refresh at half the interval, at most 30 s early, never sooner than 5 s.
        reg.retryIntervalSec = 0
        reg.firstRetryIntervalSec = 0
        reg.randomRetryIntervalSec = 0
        reg.delayBeforeRefreshSec = max(5, min(spec.expires // 2, 30))
        reg.unregWaitMsec = round(spec.unregister_timeout * 1000)
        reg.dropCallsOnFail = False
        sip = ac.sipConfig
        sip.transportId = tid
        sip.contactUriParams = spec.contact_uri_params
        for proxy in spec.proxies:
            sip.proxies.append(proxy)
        if spec.password is not None:
            secret = spec.password.get_secret_value()  # revealed only into PJSIP's own struct
            sip.authCreds.append(pj.AuthCredInfo("digest", spec.realm, spec.username, 0, secret))
        rec = _Record(key, spec, loop, sink)
        acc = self._account_cls(weakref.ref(self), key)
        rec.account = acc
        rec.in_flight = True
        self._records[key] = rec
        try:
            with self._b.distinct_instance(spec.contact_uri_params or str(key)):
                acc.create(ac)
        except BaseException as exc:
            self._records.pop(key, None)
            rec.account = None
            del acc  # dropped here, on the owner thread
            if isinstance(exc, self._b.errors) and not isinstance(exc, RuntimeError):
                raise ConnectError(f"pjsua2 refused the account: {_pj_reason(exc)}") from None
            raise

    def refresh(self, key: int) -> bool:
        """Send a refresh REGISTER (True) or join the one in flight (False)."""
        rec = self._live(key)
        if rec.in_flight:
            return False
        assert self._b is not None
        try:
            rec.in_flight = True
            rec.account.setRegistration(True)
        except self._b.errors:
            return False  # PJSIP_EBUSY: a transaction we did not see start; its outcome will do
        return True

    def run_for(self, key: int, fn: Callable[[OwnerContext], T]) -> T:
        """``fn(ctx)`` for account ``key``. Raises TypeError if it returns a pjsua2 object."""
        rec = self._live(key)
        assert self._b is not None
        ctx = OwnerContext(self._b.pj, self._ep, rec)
        try:
            result = fn(ctx)
        finally:
            ctx._expire()
        self._check_result(result)
        return result

    def _check_result(self, result: object) -> None:
        # pjsua2 objects must stay on this thread: dropped elsewhere they abort the process.
        assert self._b is not None
        if self._pj_types is None:
            pj = self._b.pj
            self._pj_types = tuple(v for v in vars(pj).values() if isinstance(v, type))
        items = result if isinstance(result, tuple | list) else (result,)
        for item in items:
            if isinstance(item, self._pj_types):
                raise TypeError(
                    f"a function run on the SIP owner thread returned a pjsua2 object"
                    f" ({type(item).__name__}); return plain data, keep pjsua2 objects with"
                    " ctx.keep()"
                )

    def begin_close(self, key: int, unregister: bool, done: cf.Future[None]) -> None:
        rec = self._records.get(key)
        if rec is None:  # never created: the add was cancelled, or it failed
            self._free_slot(key)
            if not done.done():
                done.set_result(None)
            return
        self._close(rec, unregister, done)

    def _live(self, key: int) -> _Record:
        rec = self._records.get(key)
        if rec is None or rec.closing or rec.account is None:
            raise ConnectError(f"SIP account #{key} is closed")
        return rec

    def _transport(self, spec: AccountSpec) -> int:
        assert self._b is not None
        bind = spec.bind_address or ""
        tls = (spec.tls_ca_file, spec.tls_verify_server) if spec.transport == "tls" else None
        tid = self._transports.get((spec.transport, bind, tls))
        if tid is not None:
            return tid
        if spec.transport not in ("udp", "tcp", "tls"):
            raise ConnectError(f"unknown SIP transport {spec.transport!r}", fatal=True)
        if spec.transport == "tls" and not self._b.has_tls:
            # creating it anyway would fail an assertion (abort)
            raise ConnectError(
                f"{self._b.name} has no TLS transport (PJSIP built without OpenSSL). {TLS_HINT}",
                fatal=True,
            )
        tc = self._b.pj.TransportConfig()
        tc.boundAddress = bind
        tc.port = 0
        if tls is not None:
            # A client transport: the registrar's certificate is checked against the CA list
            # (and its name against the registrar host) unless verification is turned off.
            if spec.tls_ca_file:
                tc.tlsConfig.CaListFile = spec.tls_ca_file
            tc.tlsConfig.verifyServer = spec.tls_verify_server
        try:
            tid = int(self._ep.transportCreate(self._b.transport_type(spec.transport), tc))
        except self._b.errors as exc:
            raise ConnectError(
                f"cannot open a SIP {spec.transport} transport on {bind or '*'}: {_pj_reason(exc)}",
                fatal=True,
            ) from None
        self._transports[(spec.transport, bind, tls)] = tid
        return tid

    # -- closing -----------------------------------------------------------------------------------

    def _close(self, rec: _Record, unregister: bool, done: cf.Future[None] | None) -> None:
        if done is not None:
            rec.done.append(done)
        if rec.closing:
            return
        now = time.monotonic()
        rec.closing = True
        rec.incoming = None
        rec.notify_at = now + rec.spec.unregister_timeout
        if not unregister or rec.account is None:
            rec.deadline = 0.0
        elif rec.in_flight:
            # A REGISTER is in flight (a connect given up, a refresh unanswered): a late 200
            # would leave a binding on the registrar, and shutdown() cannot stop the
            # transaction. Keep the account until its outcome (at most the transaction
            # timeout), then un-REGISTER if it succeeded. The closer is released at notify_at.
            rec.deadline = now + self.config.transaction_timeout + 2.0
        elif rec.registered:
            self._unregister(rec)
        else:
            rec.deadline = 0.0

    def _unregister(self, rec: _Record) -> None:
        rec.deadline = time.monotonic() + rec.spec.unregister_timeout
        assert self._b is not None
        try:
            rec.unreg_sent = True
            rec.in_flight = True
            rec.account.setRegistration(False)
        except self._b.errors as exc:
            log.debug("SIP account #%d: un-REGISTER not sent: %s", rec.key, exc)
            rec.deadline = 0.0

    def _finalize(self, rec: _Record) -> None:
        if self._records.pop(rec.key, None) is None:
            return
        rec.objects.clear()  # calls go before their account
        acc, rec.account = rec.account, None
        if acc is not None:
            try:
                assert self._b is not None
                if self._b.account_valid(acc):  # reading an account after shutdown() aborts
                    acc.shutdown()
            except Exception as exc:
                log.debug("SIP account #%d: shutdown failed: %s", rec.key, exc)
            del acc  # the last reference: the C++ Account dies here, on the owner thread
        self._free_slot(rec.key)
        _resolve(rec.done)

    # -- callbacks (inside poll(), from PJSIP) -----------------------------------------------------

    def on_reg_started(self, key: int) -> None:
        rec = self._records.get(key)
        if rec is not None:
            rec.in_flight = True

    def on_reg_state(self, key: int, event: RegEvent) -> None:
        rec = self._records.get(key)
        if rec is None:
            return
        rec.in_flight = False
        rec.registered = event.ok
        with contextlib.suppress(RuntimeError):  # that loop is closed: nobody listens any more
            rec.loop.call_soon_threadsafe(rec.sink, event)
        if rec.closing:
            if not rec.unreg_sent and event.ok:
                self._unregister(rec)
            else:
                rec.deadline = 0.0  # finalized by the loop, outside this callback

    def on_incoming_call(self, key: int, call_id: int) -> None:
        rec = self._records.get(key)
        if rec is None or rec.incoming is None or rec.closing:
            return
        assert self._b is not None
        ctx = OwnerContext(self._b.pj, self._ep, rec)
        try:
            rec.incoming(ctx, call_id)
        finally:
            ctx._expire()


def _pj_reason(exc: BaseException) -> str:
    """The message of a pjsua2 error (SWIG's ``pjsua2.Error`` keeps it in ``info()``)."""
    info = getattr(exc, "info", None)
    if callable(info):
        with contextlib.suppress(Exception):
            return str(info())
    return str(exc) or type(exc).__name__


def _resolve(futures: list[cf.Future[None]]) -> None:
    for fut in futures:
        if not fut.done():
            fut.set_result(None)
    futures.clear()


def _account_class(pj: Any) -> Any:
    """The ``pjsua2.Account`` subclass whose callbacks feed the :class:`Owner`."""

    class _Account(pj.Account):  # type: ignore[misc]
        # Callbacks run inside pjsua_handle_events on the owner thread. An exception escaping
        # into C++ would terminate the process, so every one is caught and logged. The owner is
        # held weakly: no reference cycle may keep an Account for the garbage collector, which
        # could run on any thread.
        def __init__(self, owner: weakref.ref[Owner], key: int) -> None:
            super().__init__()
            self._owner = owner
            self._key = key

        def onRegStarted(self, prm: Any) -> None:
            try:
                owner = self._owner()
                if owner is not None:
                    owner.on_reg_started(self._key)
            except Exception:
                log.exception("SIP account #%d: onRegStarted failed", self._key)

        def onRegState(self, prm: Any) -> None:
            try:
                owner = self._owner()
                if owner is not None:
                    event = RegEvent(
                        int(prm.code),
                        str(prm.reason),
                        int(prm.expiration),
                        int(prm.status),
                        time.monotonic(),
                    )
                    owner.on_reg_state(self._key, event)
            except Exception:
                log.exception("SIP account #%d: onRegState failed", self._key)

        def onIncomingCall(self, prm: Any) -> None:
            try:
                owner = self._owner()
                if owner is not None:
                    owner.on_incoming_call(self._key, int(prm.callId))
            except Exception:
                log.exception("SIP account #%d: incoming call handler failed", self._key)

    return _Account

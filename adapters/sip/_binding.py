"""Lazy access to the optional ``pjsua2`` binding and its C functions; which binding, and why.

Two PyPI wheels provide the module ``pjsua2``:

* ``pjsua2-pybind11`` (``voicepool[sip]``, the default): PJSIP 2.14.1, pybind11, no OpenSSL, so
  UDP and TCP only. A top-level extension module ``pjsua2.cpython-*.so``.
* ``pjsua2-python`` (``voicepool[sip-tls]``): PJSIP 2.15, SWIG, TLS through the OpenSSL it
  bundles, which is **OpenSSL 1.0.2k** (end of life since 2019: no TLS 1.3, no security fixes).
  A package ``pjsua2/``. Choose it only where a carrier requires SIP over TLS.

Installed side by side, the package would shadow the extension for a plain ``import pjsua2``, so
:func:`load` never relies on that: it finds each wheel through its installed metadata and loads
the chosen one's file itself. The choice is made once per process, when pjsua2 is first
loaded: ``VOICEPOOL_SIP_BINDING`` (``pjsua2-pybind11`` or ``pjsua2-python``) if set, else
pjsua2-pybind11 when installed, else pjsua2-python. Both bindings cannot live in one process
(one PJSIP, one Endpoint), and ``voicepool check`` names the one in use.

Neither binding exposes all an event-loop integration needs (``libHandleEvents`` that releases
the GIL, the log level before ``libCreate``, transaction timers, transport state), so those few
C functions are called through :mod:`ctypes` on the extension module, whose handle also reaches
the libraries it links. ctypes releases the GIL while a C function runs, which is what lets the
owner thread poll PJSIP without freezing the asyncio thread. The few places where the two
bindings' Python APIs differ are methods of :class:`Binding`.

Nothing here is imported at module import time: :func:`load` does it on first use and raises
:class:`BindingMissing` with an installation hint when the optional dependency is absent.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

__all__ = [
    "BINDINGS",
    "BINDING_ENV",
    "PJSUA_MAX_ACC",
    "PJSUA_MAX_CALLS",
    "Binding",
    "BindingMissing",
    "available",
    "choose",
    "load",
    "summary",
]

BINDINGS = ("pjsua2-pybind11", "pjsua2-python")
"""The supported wheels, in the order tried when ``VOICEPOOL_SIP_BINDING`` is not set."""
BINDING_ENV = "VOICEPOOL_SIP_BINDING"

PJSUA_MAX_ACC = 8
"""Accounts per process, compiled into the wheel: the 9th ``Account.create()`` aborts (SIGABRT)."""

PJSUA_MAX_CALLS = 32
"""Compile-time call limit; ``uaConfig.maxCalls`` above it fails an assertion (abort)."""

INSTALL_HINT = (
    "the SIP adapter needs the optional dependency pjsua2: pip install 'voicepool[sip]'"
    " (PyPI pjsua2-pybind11: CPython 3.10-3.12 wheels for x86_64 Linux; UDP and TCP), or"
    " 'voicepool[sip-tls]' for SIP over TLS (PyPI pjsua2-python, bundles OpenSSL 1.0.2k)"
)
TLS_HINT = (
    "SIP over TLS needs the pjsua2-python binding: pip install 'voicepool[sip-tls]' and, if"
    f" pjsua2-pybind11 is installed too, set {BINDING_ENV}=pjsua2-python (one binding per process)"
)

# pjsip defaults (RFC 3261 timers, milliseconds): T1, T2, T4.
_T1_MS, _T2_MS, _T4_MS = 500, 4000, 5000


class BindingMissing(ImportError):
    """pjsua2 (or one of the C libraries it ships) cannot be loaded here."""


# pjsip_tp_state_callback(pjsip_transport *tp, pjsip_transport_state state, const info *info)
_TpStateCallback = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p)
_TP_STATE_DISCONNECTED = 1  # PJSIP_TP_STATE_DISCONNECTED


class _PjStr(ctypes.Structure):
    _fields_ = (("ptr", ctypes.c_void_p), ("slen", ctypes.c_ssize_t))


@dataclass(frozen=True, slots=True)
class Binding:
    """The pjsua2 module plus the C entry points the owner thread calls through ctypes."""

    pj: ModuleType
    name: str
    """Which wheel: ``pjsua2-pybind11`` or ``pjsua2-python`` (one of :data:`BINDINGS`)."""
    version: str
    has_tls: bool
    _lib: ctypes.CDLL
    _hostname: Any = None  # pj_gethostname, when exported

    @property
    def swig(self) -> bool:
        return self.name == "pjsua2-python"

    @property
    def errors(self) -> tuple[type[BaseException], ...]:
        """What a failing pjsua2 call raises: RuntimeError (pybind11), ``pjsua2.Error`` (SWIG)."""
        swig_error = getattr(self.pj, "Error", None)
        if self.swig and isinstance(swig_error, type) and issubclass(swig_error, BaseException):
            return (RuntimeError, swig_error)
        return (RuntimeError,)

    def describe(self) -> str:
        """``pjsua2-pybind11 0.1a3 (PJSIP 2.14.1, UDP/TCP)``, for ``voicepool check``."""
        transports = "UDP/TCP/TLS" if self.has_tls else "UDP/TCP"
        if self.has_tls and self.swig:
            transports += " with its bundled OpenSSL 1.0.2k"
        return f"{self.name} {self.version} ({transports})"

    def transport_type(self, kind: str) -> Any:
        """The ``transportCreate`` type for ``udp`` / ``tcp`` / ``tls``."""
        if self.swig:
            return getattr(self.pj, f"PJSIP_TRANSPORT_{kind.upper()}")
        return getattr(self.pj.TransportType, kind.upper())

    def use_null_audio(self, endpoint: Any) -> None:
        """No sound device: ``audDevManager`` is a property in pybind11, a method in SWIG."""
        manager = endpoint.audDevManager() if self.swig else endpoint.audDevManager
        manager.setNullDev()

    def account_valid(self, account: Any) -> bool:
        """Whether ``account`` may still be read (reading one after ``shutdown()`` aborts)."""
        return bool(account.isValid() if self.swig else account.valid)

    def handle_events(self, msec: int) -> int:
        """``pjsua_handle_events``: poll timers and sockets for up to ``msec`` (GIL released)."""
        return int(self._lib.pjsua_handle_events(msec))

    def account_count(self) -> int:
        """``pjsua_acc_get_count``: accounts PJSUA holds now (checked before every create)."""
        return int(self._lib.pjsua_acc_get_count())

    def set_log_level(self, level: int) -> None:
        """``pj_log_set_level``: also silences the banner ``libCreate`` prints before libInit."""
        self._lib.pj_log_set_level(level)

    def set_transaction_timeout(self, msec: int) -> None:
        """``pjsip_tsx_set_timers``: keep T1/T2/T4, set the transaction timeout (Timer B/F/D).

        Process-wide. It bounds how long an unanswered REGISTER lives (and keeps being
        retransmitted over UDP) after its account was abandoned.
        """
        self._lib.pjsip_tsx_set_timers(_T1_MS, _T2_MS, _T4_MS, msec)

    def watch_transports(self, on_disconnect: Callable[[], None]) -> Any:
        """Call ``on_disconnect()`` whenever a connection-oriented transport (TCP/TLS) drops.

        The binding has no ``Endpoint.onTransportState``, so this installs a C callback as the
        transport manager's state callback, in place of pjsua's, and does the part of pjsua's
        that matters here (shut the dropped transport down). The rest of pjsua's only acts for
        accounts with its own retry on (``retryIntervalSec`` > 0; ours are off: the pool owns
        retries) and then calls ``Endpoint.onTransportState``, which this binding cannot
        override; the manager's own dispatch (what ``pjsip_tpmgr_get_state_cb`` returns, and
        what calls this callback) must not be chained, it would call us again. Call after
        ``libInit``, on the owner thread; the callback runs inside :meth:`handle_events` there.
        Returns the ctypes callback, to keep alive until after ``libDestroy``.
        ``on_disconnect`` must not raise and must not call into PJSIP.
        """
        lib = self._lib

        def relay(tp: int | None, state: int, info: int | None) -> None:
            if state == _TP_STATE_DISCONNECTED:
                # What pjsua's callback did first: shut the transport down, so that the next
                # request to that peer opens a new connection instead of queueing on this one.
                lib.pjsip_transport_shutdown(tp)
                on_disconnect()

        callback = _TpStateCallback(relay)
        manager = lib.pjsip_endpt_get_tpmgr(lib.pjsua_get_pjsip_endpt())
        lib.pjsip_tpmgr_set_state_cb(manager, callback)
        return callback

    @contextlib.contextmanager
    def distinct_instance(self, salt: str) -> Iterator[None]:
        """Make the next ``Account.create()`` derive its own RFC 5626 ``+sip.instance``.

        Over TCP/TLS pjsua adds ``+sip.instance`` (a hash of ``pj_gethostname()``) and
        ``reg-id=1`` to every account's Contact, and this binding cannot set them (no
        ``natConfig``). Registrars that follow RFC 5626 then keep ONE binding for all the
        registrations of an AOR, and un-REGISTERing one removes them all. While this context
        is open, PJSIP's cached host name reads ``<host>/<salt>``: the account created inside
        gets an instance of its own. Owner thread only; restored on exit.
        """
        if self._hostname is None:
            yield
            return
        name = self._hostname().contents
        saved = (name.ptr, name.slen)
        original = ctypes.string_at(name.ptr, name.slen) if name.ptr else b""
        buf = ctypes.create_string_buffer(original + b"/" + salt.encode())
        name.ptr = ctypes.cast(buf, ctypes.c_void_p).value
        name.slen = len(buf.value)
        try:
            yield
        finally:
            name.ptr, name.slen = saved
            del buf  # only after PJSIP points back at its own buffer


_lock = threading.Lock()
_binding: Binding | None = None


def _installed(name: str) -> tuple[str, str] | None:
    """(file to load as ``pjsua2``, version) of the wheel ``name``, from its metadata."""
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        parts = file.parts
        if name == "pjsua2-pybind11":
            found = len(parts) == 1 and parts[0].startswith("pjsua2.")
            found = found and parts[0].endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
        else:
            found = parts == ("pjsua2", "__init__.py")
        if found:
            path = str(dist.locate_file(file))
            return (path, dist.version) if os.path.exists(path) else None
    return None


def choose() -> tuple[str, str, str]:
    """(binding name, file, version) this process uses; see the module docstring.

    Cheap (metadata only, nothing imported). Raises BindingMissing with what to install, or
    naming a bad ``VOICEPOOL_SIP_BINDING``.
    """
    if "pjsua2" in sys.modules and sys.modules["pjsua2"] is None:
        raise BindingMissing(f"{INSTALL_HINT} (pjsua2 is blocked in sys.modules)")
    wanted = os.environ.get(BINDING_ENV, "").strip()
    if wanted and wanted not in BINDINGS:
        raise BindingMissing(f"{BINDING_ENV}={wanted!r}: expected one of {', '.join(BINDINGS)}")
    for name in (wanted,) if wanted else BINDINGS:
        found = _installed(name)
        if found is not None:
            return name, *found
    if wanted:
        extra = "sip" if wanted == "pjsua2-pybind11" else "sip-tls"
        raise BindingMissing(
            f"{BINDING_ENV}={wanted} but {wanted} is not installed:"
            f" pip install 'voicepool[{extra}]'"
        )
    raise BindingMissing(INSTALL_HINT)


def summary() -> str:
    """The binding this process uses, for ``voicepool check`` and descriptions. Never raises."""
    if _binding is not None:
        return _binding.describe()
    try:
        name, _, version = choose()
    except BindingMissing:
        return "no pjsua2 binding"
    return f"{name} {version}"


def available() -> bool:
    """Whether a pjsua2 binding is installed, without importing it (cheap; for constructors)."""
    try:
        choose()
    except BindingMissing:
        return False
    return True


def _import(name: str, path: str) -> ModuleType:
    """Import the wheel's file as ``pjsua2`` (a plain import could pick the other wheel)."""
    loaded = sys.modules.get("pjsua2")
    if loaded is not None:
        if os.path.realpath(getattr(loaded, "__file__", "") or "") != os.path.realpath(path):
            raise BindingMissing(
                f"pjsua2 is already imported from {loaded.__file__}, not from {name} ({path});"
                f" one binding per process: set {BINDING_ENV} to the binding in use"
            )
        module = loaded
    else:
        package = [os.path.dirname(path)] if name == "pjsua2-python" else None
        spec = importlib.util.spec_from_file_location(
            "pjsua2", path, submodule_search_locations=package
        )
        if spec is None or spec.loader is None:
            raise BindingMissing(f"cannot load {name} from {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules["pjsua2"] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop("pjsua2", None)
            raise
    if name == "pjsua2-python":
        # The package resolves names lazily from its SWIG module: use that module directly.
        return importlib.import_module("pjsua2.pjsua2")
    return module


def load() -> Binding:
    """Import the chosen pjsua2 binding and open its C functions (once per process).

    Raises BindingMissing.
    """
    global _binding
    with _lock:
        if _binding is not None:
            return _binding
        name, path, version = choose()
        try:
            pj = _import(name, path)
        except ImportError as exc:
            raise BindingMissing(f"{INSTALL_HINT} ({exc})") from exc
        extension = sys.modules.get("pjsua2._pjsua2") if name == "pjsua2-python" else pj
        try:
            # dlsym through the extension module's handle also searches the libraries it links
            # (libpjsua, libpjsip, libpj...), wherever the wheel or a system build put them.
            lib = ctypes.CDLL(getattr(extension, "__file__", None) or "")
            lib.pjsua_handle_events  # noqa: B018 - probe: raises AttributeError if absent
        except (OSError, AttributeError) as exc:
            raise BindingMissing(
                f"cannot reach the PJSIP C functions through {name}: {exc}"
            ) from exc
        lib.pjsua_handle_events.argtypes = [ctypes.c_uint]
        lib.pjsua_handle_events.restype = ctypes.c_int
        lib.pjsua_acc_get_count.argtypes = []
        lib.pjsua_acc_get_count.restype = ctypes.c_uint
        lib.pj_log_set_level.argtypes = [ctypes.c_int]
        lib.pj_log_set_level.restype = None
        lib.pjsip_tsx_set_timers.argtypes = [ctypes.c_uint] * 4
        lib.pjsip_tsx_set_timers.restype = None
        lib.pjsua_get_pjsip_endpt.argtypes = []
        lib.pjsua_get_pjsip_endpt.restype = ctypes.c_void_p
        lib.pjsip_endpt_get_tpmgr.argtypes = [ctypes.c_void_p]
        lib.pjsip_endpt_get_tpmgr.restype = ctypes.c_void_p
        lib.pjsip_tpmgr_set_state_cb.argtypes = [ctypes.c_void_p, _TpStateCallback]
        lib.pjsip_tpmgr_set_state_cb.restype = ctypes.c_int
        lib.pjsip_transport_shutdown.argtypes = [ctypes.c_void_p]
        lib.pjsip_transport_shutdown.restype = ctypes.c_int
        # Built without OpenSSL, the wheel has no TLS transport; creating one would fail an
        # assertion deep inside PJSIP, so the adapter refuses "tls" up front instead.
        has_tls = hasattr(lib, "pjsip_tls_transport_start2")
        hostname = getattr(lib, "pj_gethostname", None)
        if hostname is not None:
            hostname.argtypes = []
            hostname.restype = ctypes.POINTER(_PjStr)
        _binding = Binding(pj, name, version, has_tls, lib, hostname)
        return _binding

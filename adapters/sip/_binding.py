"""Lazy access to the optional ``pjsua2`` binding (PyPI ``pjsua2-pybind11``) and its C libraries.

The wheel binds PJSIP's C++ API but leaves out what an event-loop integration needs
(``libHandleEvents``, ``libRegisterThread``, log level before ``libCreate``, transaction timers),
so those few C functions are called through :mod:`ctypes` on the libraries the extension module
links (``libpjsua``, ``libpjsip``, ``libpj``). ctypes releases the GIL while a C function runs,
which is what lets the owner thread poll PJSIP without freezing the asyncio thread.

Nothing here is imported at module import time: :func:`load` does it on first use and raises
:class:`BindingMissing` with an installation hint when the optional dependency is absent.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import importlib.util
import platform
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

__all__ = [
    "PJSUA_MAX_ACC",
    "PJSUA_MAX_CALLS",
    "Binding",
    "BindingMissing",
    "available",
    "install_hint",
    "load",
]

PJSUA_MAX_ACC = 8
"""Accounts per process, compiled into the wheel: the 9th ``Account.create()`` aborts (SIGABRT)."""

PJSUA_MAX_CALLS = 32
"""Compile-time call limit; ``uaConfig.maxCalls`` above it fails an assertion (abort)."""


def install_hint(
    version: tuple[int, int] = sys.version_info[:2],
    machine: str = platform.machine(),
    system: str = platform.system(),
) -> str:
    """What to do when pjsua2 cannot be imported, for this Python and platform.

    ``voicepool[sip]`` pulls ``pjsua2-pybind11`` only where it has wheels (CPython 3.10-3.12,
    x86_64 Linux; the marker in pyproject.toml): elsewhere the extra installs nothing and
    saying "pip install 'voicepool[sip]'" would send the user round in circles."""
    has_wheel = (3, 10) <= version <= (3, 12) and machine == "x86_64" and system == "Linux"
    if has_wheel:
        return (
            "the SIP adapter needs the optional dependency pjsua2: pip install 'voicepool[sip]'"
            " (PyPI pjsua2-pybind11)"
        )
    here = f"CPython {version[0]}.{version[1]} on {system} {machine}"
    return (
        f"the SIP adapter needs pjsua2, and PyPI's pjsua2-pybind11 has no wheel for {here}"
        " ('voicepool[sip]' installs nothing here): run the worker on CPython 3.10-3.12 on"
        " x86_64 Linux, or build pjsua2 from pjproject's SWIG bindings for this Python; the"
        " other adapters work without it"
    )


INSTALL_HINT = install_hint()

# pjsip defaults (RFC 3261 timers, milliseconds): T1, T2, T4.
_T1_MS, _T2_MS, _T4_MS = 500, 4000, 5000


class BindingMissing(ImportError):
    """pjsua2 (or one of the C libraries it ships) cannot be loaded here."""


class _PjStr(ctypes.Structure):
    _fields_ = (("ptr", ctypes.c_void_p), ("slen", ctypes.c_ssize_t))


@dataclass(frozen=True, slots=True)
class Binding:
    """The pjsua2 module plus the C entry points the owner thread calls through ctypes."""

    pj: ModuleType
    has_tls: bool
    _lib: ctypes.CDLL
    _hostname: Any = None  # pj_gethostname, when exported

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


def available() -> bool:
    """Whether ``pjsua2`` looks importable, without importing it (cheap; for constructors)."""
    if "pjsua2" in sys.modules:
        return sys.modules["pjsua2"] is not None
    try:
        return importlib.util.find_spec("pjsua2") is not None
    except (ImportError, ValueError):
        return False


def load() -> Binding:
    """Import pjsua2 and open its C libraries (once per process). Raises BindingMissing."""
    global _binding
    with _lock:
        if _binding is not None:
            return _binding
        try:
            pj = importlib.import_module("pjsua2")
        except ImportError as exc:
            raise BindingMissing(f"{INSTALL_HINT} ({exc})") from exc
        try:
            # dlsym through the extension module's handle also searches the libraries it links
            # (libpjsua, libpjsip, libpj...), wherever the wheel or a system build put them.
            lib = ctypes.CDLL(pj.__file__ or "")
            lib.pjsua_handle_events  # noqa: B018 - probe: raises AttributeError if absent
        except (OSError, AttributeError) as exc:
            raise BindingMissing(
                f"cannot reach the PJSIP C functions through pjsua2: {exc}"
            ) from exc
        lib.pjsua_handle_events.argtypes = [ctypes.c_uint]
        lib.pjsua_handle_events.restype = ctypes.c_int
        lib.pjsua_acc_get_count.argtypes = []
        lib.pjsua_acc_get_count.restype = ctypes.c_uint
        lib.pj_log_set_level.argtypes = [ctypes.c_int]
        lib.pj_log_set_level.restype = None
        lib.pjsip_tsx_set_timers.argtypes = [ctypes.c_uint] * 4
        lib.pjsip_tsx_set_timers.restype = None
        # Built without OpenSSL, the wheel has no TLS transport; creating one would fail an
        # assertion deep inside PJSIP, so the adapter refuses "tls" up front instead.
        has_tls = hasattr(lib, "pjsip_tls_transport_start2")
        hostname = getattr(lib, "pj_gethostname", None)
        if hostname is not None:
            hostname.argtypes = []
            hostname.restype = ctypes.POINTER(_PjStr)
        _binding = Binding(pj, has_tls, lib, hostname)
        return _binding

"""SIP registrations as pooled connections, on ``pjsua2`` (optional extra ``voicepool[sip]``).

* :class:`SipAdapter` / :class:`SipOptions`: the ``sip`` adapter (MULTIPLEXED; at most 8
  registrations per process, ``max_connections_per_process``).
* :class:`SipRegistration`: what a lease holds; ``await reg.run(fn)`` runs ``fn(ctx)`` on the
  pjsua2 owner thread with the account, to place or accept calls.
* :class:`SipEngine`: the one pjsua2 engine of the process (owner thread, started by the first
  SIP pool, stopped after the last); :func:`configure_engine` sets its process-wide options.

Importing this package never imports pjsua2: that happens when the engine first starts.
"""

from ._binding import PJSUA_MAX_ACC  # noqa: TID251
from ._owner import OwnerContext  # noqa: TID251
from ._types import AccountSpec, EngineConfig, EngineStats, RegEvent  # noqa: TID251
from .adapter import RegState, SipAdapter, SipOptions, SipRegistration  # noqa: TID251
from .engine import SipEngine, configure_engine  # noqa: TID251

__all__ = [
    "PJSUA_MAX_ACC",
    "AccountSpec",
    "EngineConfig",
    "EngineStats",
    "OwnerContext",
    "RegEvent",
    "RegState",
    "SipAdapter",
    "SipEngine",
    "SipOptions",
    "SipRegistration",
    "configure_engine",
]

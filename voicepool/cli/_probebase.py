"""What every step of a probe shares: the target, the options, the sample, the clock, errors.

:mod:`voicepool.cli._probes` (the cold connection, per protocol) and
:mod:`voicepool.cli._sipprobe` (the SIP user agent) both build on this module; neither imports
the other's internals.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

__all__ = ["FAILURES", "Clock", "ProbeError", "ProbeOptions", "Sample", "Target"]

FAILURES = (OSError, ssl.SSLError, ValueError, EOFError, asyncio.LimitOverrunError)
T = TypeVar("T")


class ProbeError(Exception):
    """A step failed; the message names the step (``tls: certificate verify failed``)."""


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed endpoint. ``kind``: websocket, https, http or sip."""

    url: str
    kind: Literal["websocket", "https", "http", "sip"]
    host: str
    port: int
    path: str = "/"
    tls: bool = False
    transport: Literal["tcp", "udp"] = "tcp"
    user: str | None = None  # sip: the AOR's user part, if the URI has one


@dataclass
class ProbeOptions:
    """How to probe: trust (``ca_file``, or the system store; ``insecure`` skips verification),
    extra request headers, the per-step timeout, SIP digest credentials."""

    ca_file: str | None = None
    insecure: bool = False
    headers: Sequence[tuple[str, str]] = ()
    timeout: float = 10.0
    sip_user: str | None = None
    sip_password: str | None = None

    def ssl_context(self, alpn: list[str]) -> ssl.SSLContext:
        """A fresh client context (raises OSError / ssl.SSLError for an unreadable CA file)."""
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if self.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(alpn)
        return ctx


@dataclass
class Sample:
    """One cold connection: step durations (seconds, in order), the warm round trip, notes."""

    steps: dict[str, float] = field(default_factory=dict)
    warm: float | None = None
    warm_what: str = ""
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def cold(self) -> float:
        return sum(self.steps.values())


class Clock:
    """Times named steps into a sample; a failing step raises ProbeError naming it."""

    def __init__(self, sample: Sample, timeout: float) -> None:
        self.sample = sample
        self.timeout = timeout

    async def step(self, name: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn()`` as the cold step ``name``; its duration joins ``sample.steps``."""
        result, took = await self.time(name, fn)
        self.sample.steps[name] = took
        return result

    async def time(self, name: str, fn: Callable[[], Awaitable[T]]) -> tuple[T, float]:
        """``(fn(), seconds)`` under the timeout; failures become ProbeError naming ``name``."""
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout):
                result = await fn()
        except TimeoutError:
            raise ProbeError(f"{name}: no answer within {self.timeout:g} s") from None
        except FAILURES as exc:
            raise ProbeError(f"{name}: {_reason(exc)}") from exc
        return result, time.perf_counter() - t0


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate rejected ({exc.verify_message}); use --ca-file or --insecure"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "the server closed the connection"
    return str(exc) or type(exc).__name__

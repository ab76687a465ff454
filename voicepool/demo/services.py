"""The demo's "internet": voicepool's service emulators behind latency relays, on 127.0.0.1 only.

::

    async with ServiceStack(rtt=0.040) as endpoints:      # in this process
        endpoints.asr_url, endpoints.llm_url, endpoints.sip_registrar, ...

    async with spawn_services(rtt=0.040) as endpoints:    # in a child process (what the demo does)
        ...

Every TCP service (Deepgram-like ASR, ElevenLabs-like TTS, the OpenAI-compatible LLM over HTTP/2,
the CRM REST API over HTTP/1.1) serves TLS with the throwaway ``trustme`` CA and sits behind a
:class:`~voicepool.testing.FaultProxy` that adds ``rtt / 2`` each way (and the TCP handshake's round
trip on every new connection); the SIP registrar sits behind a
:class:`~voicepool.testing.UdpDelayRelay`. So a cold connection costs what it costs on a real
network: TCP + TLS (+ WebSocket upgrade) round trips, and a warm one only the request.

:func:`spawn_services` runs the stack in a child process (``python -m voicepool.demo.services``),
so that the worker process being measured spends its CPU on its own work only: on a small machine
the servers' TLS handshakes would otherwise queue behind the worker's on one event loop. The child
prints its endpoints as one JSON line and lives until its stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any

from voicepool.testing.asr import DeepgramEmulator
from voicepool.testing.faultproxy import FaultProxy
from voicepool.testing.llm import LlmEmulator
from voicepool.testing.rest import RestEmulator
from voicepool.testing.sip_registrar import SipRegistrar
from voicepool.testing.tls import test_certificates
from voicepool.testing.tts import ElevenLabsEmulator
from voicepool.testing.udp_delay import UdpDelayRelay

__all__ = [
    "DEMO_KEY",
    "Endpoints",
    "ServiceStack",
    "latency_proxy",
    "raise_fd_limit",
    "spawn_services",
]

DEMO_KEY = "demo-key-not-a-secret"
"""The only API key the emulators accept: credentials travel the real path (headers, digest)."""

SIP_USER = "demo"
SIP_PASSWORD = "demo-sip-password"
log = logging.getLogger("voicepool.demo")
_START_TIMEOUT = 30.0  # the child imports, makes a CA and binds its ports well within this
_STOP_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class Endpoints:
    """Where the emulated services listen (through their latency relays) and how to reach them."""

    rtt: float
    ca_file: str
    api_key: str
    asr_url: str  # wss://127.0.0.1:PORT (Deepgram-like; the adapter adds /v1/listen)
    tts_url: str  # wss://127.0.0.1:PORT (ElevenLabs-like)
    llm_url: str  # https://127.0.0.1:PORT (OpenAI-compatible, HTTP/2)
    crm_url: str  # https://127.0.0.1:PORT (REST, HTTP/1.1 keep-alive)
    sip_registrar: str  # sip:127.0.0.1:PORT (UDP)
    sip_aor: str
    sip_password: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> Endpoints:
        """Parse :meth:`to_json` output. Raises ValueError (or TypeError) on anything else."""
        data = json.loads(line)
        if not isinstance(data, dict):
            raise ValueError(f"not an endpoints object: {line[:80]!r}")
        return cls(**data)


class ServiceStack:
    """Every emulator of the demo and its latency relay, started and stopped together.

    ``async with ServiceStack(rtt=0.04) as endpoints``. ``llm_ttft`` is the emulated model's time
    to first token (kept small: the demo is about connections, not models). Raises OSError if a
    port cannot be bound. Closing is idempotent and closes everything already started.
    """

    def __init__(
        self,
        *,
        rtt: float = 0.040,
        api_key: str = DEMO_KEY,
        llm_ttft: float = 0.020,
        llm_tokens: int = 8,
    ) -> None:
        if rtt < 0:
            raise ValueError(f"rtt must be >= 0, got {rtt}")
        self.rtt = rtt
        self.api_key = api_key
        self.llm_ttft = llm_ttft
        self.llm_tokens = llm_tokens
        self._stack = contextlib.AsyncExitStack()
        self.endpoints: Endpoints | None = None

    async def start(self) -> Endpoints:
        key = self.api_key
        one_way = self.rtt / 2
        certs = test_certificates()
        stack = self._stack
        try:
            asr = await stack.enter_async_context(DeepgramEmulator(tls=True, api_key=key))
            tts = await stack.enter_async_context(ElevenLabsEmulator(tls=True, api_key=key))
            llm = await stack.enter_async_context(
                LlmEmulator(
                    api_key=key,
                    ttft=self.llm_ttft,
                    tokens=self.llm_tokens,
                    tokens_per_second=400.0,
                )
            )
            crm = await stack.enter_async_context(
                RestEmulator(api_key=key, ssl_context=certs.server_context(["http/1.1"]))
            )
            sip = await stack.enter_async_context(
                SipRegistrar(users={SIP_USER: SIP_PASSWORD}, transports=("udp",))
            )
            proxies = []
            for port in (asr.port, tts.port, llm.port, crm.port):
                proxies.append(await stack.enter_async_context(latency_proxy(port, self.rtt)))
            relay = await stack.enter_async_context(
                UdpDelayRelay((sip.host, sip.port), delay=one_way)
            )
        except BaseException:
            await self.aclose()
            raise
        asr_p, tts_p, llm_p, crm_p = (p.port for p in proxies)
        self.endpoints = Endpoints(
            rtt=self.rtt,
            ca_file=str(certs.ca_path),
            api_key=key,
            asr_url=f"wss://127.0.0.1:{asr_p}",
            tts_url=f"wss://127.0.0.1:{tts_p}",
            llm_url=f"https://127.0.0.1:{llm_p}",
            crm_url=f"https://127.0.0.1:{crm_p}",
            sip_registrar=f"sip:127.0.0.1:{relay.port}",
            sip_aor=f"sip:{SIP_USER}@127.0.0.1",
            sip_password=SIP_PASSWORD,
        )
        return self.endpoints

    async def aclose(self) -> None:
        """Stop every relay and emulator (relays first, so no client hangs half-way)."""
        await self._stack.aclose()

    async def __aenter__(self) -> Endpoints:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def latency_proxy(port: int, rtt: float) -> FaultProxy:
    """The relay in front of one emulator: ``rtt / 2`` each way (a new connection pays the TCP
    handshake's round trip too). Used by the demo and by ``voicepool emulate``."""
    return FaultProxy("127.0.0.1", port, latency=rtt / 2)


@contextlib.asynccontextmanager
async def spawn_services(rtt: float, *, api_key: str = DEMO_KEY) -> AsyncIterator[Endpoints]:
    """Run a :class:`ServiceStack` in a child process; yield its endpoints.

    The child is stopped on exit by closing its stdin (then by its PID if it lingers).
    Raises RuntimeError when the child does not report its endpoints within 30 s (its stderr
    is passed through, so its error is visible). Cancellation-safe: the child is stopped.
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "voicepool.demo.services",
        "--rtt",
        repr(rtt),
        "--api-key",
        api_key,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(_START_TIMEOUT):
                line = (await proc.stdout.readline()).decode()
            endpoints = Endpoints.from_json(line)
        except (TimeoutError, ValueError, TypeError) as exc:
            raise RuntimeError(
                f"the demo's emulator process did not start (exit code {proc.returncode}): {exc}"
            ) from None
        yield endpoints
    finally:
        await asyncio.shield(_stop(proc))


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.stdin is not None and not proc.stdin.is_closing():
        proc.stdin.close()
    try:
        async with asyncio.timeout(_STOP_TIMEOUT):
            await proc.wait()
    except TimeoutError:
        proc.kill()  # this child only, by its handle
        await proc.wait()


def _network_shrugs(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The child's loop exception handler: a socket error in a relay's callback (a peer that
    vanished while its half-close was in flight) is what a network does, not a demo failure;
    anything else goes to asyncio's default handler."""
    if isinstance(context.get("exception"), OSError):
        log.debug("demo services: %s", context.get("message"))
        return
    loop.default_exception_handler(context)


async def _serve(rtt: float, api_key: str) -> None:
    asyncio.get_running_loop().set_exception_handler(_network_shrugs)
    async with ServiceStack(rtt=rtt, api_key=api_key) as endpoints:
        print(endpoints.to_json(), flush=True)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
        )
        try:
            while await reader.read(4096):
                pass  # EOF: the demo is done (or died)
        finally:
            transport.close()


def raise_fd_limit(wanted: int = 8192) -> None:
    """Raise this process's soft open-files limit toward ``wanted`` (up to the hard limit).

    A demo with many calls holds thousands of sockets (each proxied connection is three here),
    more than a default soft limit of 1024. Never raises; a no-op where ``resource`` is missing.
    """
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError):
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="voicepool demo services (child process)")
    parser.add_argument("--rtt", type=float, default=0.040, help="round trip, seconds")
    parser.add_argument("--api-key", default=DEMO_KEY)
    args = parser.parse_args(argv)
    # Ctrl-C reaches the whole process group: the parent stops this child by closing stdin, and
    # a traceback from here would only clutter the terminal.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise_fd_limit()
    asyncio.run(_serve(args.rtt, args.api_key))


if __name__ == "__main__":
    main()

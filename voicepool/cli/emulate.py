"""``voicepool emulate``: run emulators as a standalone local server for a user's own bot or tests.

::

    voicepool emulate deepgram elevenlabs llm --rtt 40 --tls [--json]
    voicepool emulate all --429 2 --idle-close 5 --control-port 8099

Each emulator listens on 127.0.0.1 behind a :class:`~voicepool.testing.FaultProxy` (the demo's
latency relay, :func:`voicepool.demo.services.latency_proxy`); the printed base URL is the
proxy's. Faults: ``--refuse`` (the proxy resets new connections), ``--drop-after S`` (the proxy
drops connections idle for S seconds), ``--idle-close S`` (the provider's own idle close after S
seconds), ``--429 N`` (the next N handshakes or API requests get HTTP 429). The same faults can be
set while running on the control endpoint (127.0.0.1 only)::

    GET  /                              endpoints and counters (JSON)
    POST /<service>/refuse?on=1         POST /<service>/429?count=N&retry_after=S
    POST /<service>/drop-after?seconds=S (0: off)   POST /<service>/reset (RST every connection)

SIGINT (Ctrl-C) and SIGTERM stop it cleanly: proxies first, then the emulators; exit status 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported when the command runs: `voicepool --help` stays light
    from voicepool.testing import FaultProxy
    from voicepool.testing.rest import HttpRequest, HttpResponse

__all__ = ["SERVICES", "run"]

SERVICES = ("deepgram", "elevenlabs", "cartesia", "llm")
DEFAULT_KEY = "voicepool-emulator-key"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """What a client needs for one emulated service."""

    service: str
    base_url: str
    api_key: str
    ca_file: str | None


class Emulated:
    """One emulator and its proxy, and the faults that can be set on them."""

    def __init__(self, service: str, emulator: Any, proxy: FaultProxy, tls: bool) -> None:
        self.service = service
        self.emulator = emulator
        self.proxy = proxy
        self.tls = tls

    def endpoint(self, key: str) -> Endpoint:
        if self.service == "llm":
            scheme = "https" if self.tls else "http"
            url = f"{scheme}://127.0.0.1:{self.proxy.port}/v1"
        else:
            url = f"{'wss' if self.tls else 'ws'}://127.0.0.1:{self.proxy.port}"
        from voicepool.testing import test_certificates

        ca = str(test_certificates().ca_path) if self.tls else None
        return Endpoint(self.service, url, key, ca)

    def reject(self, count: int, retry_after: float = 1.0) -> None:
        if self.service == "llm":
            self.emulator.fail_next(429, count=count, retry_after=retry_after)
        else:
            self.emulator.reject_next(429, count)

    def counters(self) -> dict[str, Any]:
        em = self.emulator
        names = ("accepted", "active", "idle_closes", "connections_accepted", "open_streams")
        out = {n: getattr(em, n) for n in names if isinstance(getattr(em, n, None), int)}
        out["proxy_accepted"] = self.proxy.accepted
        out["proxy_refused"] = self.proxy.refused
        return out


def _emulator(service: str, args: argparse.Namespace) -> Any:
    from voicepool.testing import (
        CartesiaEmulator,
        DeepgramEmulator,
        ElevenLabsEmulator,
        LlmEmulator,
    )

    idle: Any = ... if args.idle_close is None else args.idle_close
    if service == "llm":
        return LlmEmulator(tls=args.tls, alpn=("h2", "http/1.1"), api_key=args.api_key)
    cls = {"deepgram": DeepgramEmulator, "elevenlabs": ElevenLabsEmulator}.get(
        service, CartesiaEmulator
    )
    return cls(tls=args.tls, api_key=args.api_key, idle_timeout=idle)


async def _control(services: dict[str, Emulated], key: str, req: HttpRequest) -> HttpResponse:
    from voicepool.testing.rest import HttpResponse

    if req.method == "GET" and req.path == "/":
        state = {
            name: {**asdict(e.endpoint(key)), "counters": e.counters()}
            for name, e in services.items()
        }
        return HttpResponse.json(200, state)
    parts = req.path.strip("/").split("/")
    if req.method != "POST" or len(parts) != 2 or parts[0] not in services:
        return HttpResponse.json(404, {"error": f"no control {req.method} {req.path}"})
    target, action = services[parts[0]], parts[1]
    query = {k: v[-1] for k, v in req.query.items()}
    try:
        if action == "refuse":
            target.proxy.refuse(query.get("on", "1") not in ("0", "false"))
        elif action == "429":
            target.reject(int(query.get("count", "1")), float(query.get("retry_after", "1")))
        elif action == "drop-after":
            seconds = float(query.get("seconds", "0"))
            target.proxy.kill_idle(seconds if seconds > 0 else None)
        elif action == "reset":
            return HttpResponse.json(200, {"reset": await target.proxy.reset_all()})
        else:
            return HttpResponse.json(404, {"error": f"no fault {action!r}"})
    except ValueError as exc:
        return HttpResponse.json(400, {"error": str(exc)})
    return HttpResponse.json(200, {"ok": True})


async def serve(args: argparse.Namespace, stop: asyncio.Event) -> int:
    """Start the emulators, print their endpoints, serve until ``stop`` is set."""
    from voicepool.demo.services import latency_proxy
    from voicepool.testing import test_certificates
    from voicepool.testing.rest import Http1Connection

    names = list(SERVICES) if "all" in args.services else list(dict.fromkeys(args.services))
    services: dict[str, Emulated] = {}
    async with contextlib.AsyncExitStack() as stack:
        for name in names:
            emulator = await stack.enter_async_context(_emulator(name, args))
            relay = latency_proxy(emulator.port, args.rtt / 1000)
            proxy = await stack.enter_async_context(relay)
            services[name] = Emulated(name, emulator, proxy, args.tls)
            if args.refuse:
                proxy.refuse(True)
            if args.drop_after:
                proxy.kill_idle(args.drop_after)
            if args.reject:
                services[name].reject(args.reject)

        async def control(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            conn = Http1Connection(reader, writer, lambda r: _control(services, args.api_key, r))
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                await conn.run()

        server = await asyncio.start_server(control, "127.0.0.1", args.control_port)
        stack.push_async_callback(server.wait_closed)
        stack.callback(server.close)
        control_url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        endpoints = [services[n].endpoint(args.api_key) for n in names]
        if args.json:
            print(json.dumps({"control": control_url, "services": [asdict(e) for e in endpoints]}))
        else:
            for e in endpoints:
                print(f"{e.service:<11} {e.base_url}")
            print(f"api key     {args.api_key}")
            if args.tls:
                print(f"CA file     {test_certificates().ca_path}  (SSL_CERT_FILE=... for SDKs)")
            print(f"control     {control_url}")
            print("Ctrl-C stops.")
        sys.stdout.flush()
        await stop.wait()
    return 0


def add_parser(sub: Any) -> None:
    emulate = sub.add_parser(
        "emulate",
        help="run provider emulators as local servers for your own bots and tests",
        description="Run Deepgram-, ElevenLabs-, Cartesia- and OpenAI/Anthropic-compatible"
        " emulators on 127.0.0.1 (the official SDKs accept them), behind a latency relay with"
        " fault controls. Prints each base URL, the API key and the CA file.",
    )
    emulate.add_argument(
        "services",
        nargs="+",
        choices=[*SERVICES, "all"],
        metavar="SERVICE",
        help=f"one or more of {', '.join(SERVICES)}, or all",
    )
    emulate.add_argument("--rtt", type=float, default=0.0, help="round trip to add, ms")
    emulate.add_argument("--tls", action="store_true", help="serve TLS (wss://, https://)")
    emulate.add_argument("--json", action="store_true", help="print the endpoints as one JSON line")
    emulate.add_argument("--api-key", default=DEFAULT_KEY, help="the key the emulators accept")
    emulate.add_argument("--refuse", action="store_true", help="reset every new connection")
    emulate.add_argument(
        "--drop-after",
        type=float,
        metavar="S",
        help="drop connections idle for S seconds (a load balancer)",
    )
    emulate.add_argument(
        "--idle-close", type=float, metavar="S", help="the provider's idle close after S seconds"
    )
    emulate.add_argument(
        "--429",
        dest="reject",
        type=int,
        default=0,
        metavar="N",
        help="answer the next N handshakes or requests with HTTP 429",
    )
    emulate.add_argument("--control-port", type=int, default=0, help="control endpoint port")


def run(args: argparse.Namespace) -> int:
    """Run until SIGINT or SIGTERM; return the exit status."""
    if args.rtt < 0 or (args.drop_after is not None and args.drop_after <= 0):
        print("voicepool emulate: --rtt must be >= 0 and --drop-after > 0", file=sys.stderr)
        return 2

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await serve(args, stop)

    return asyncio.run(main())

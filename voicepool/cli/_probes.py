"""One cold connection to an endpoint, step by step, then one warm round trip on it.

Each probe opens its own socket and times every step separately, because the steps are what a pool
saves: DNS (``getaddrinfo``), the TCP handshake, the TLS handshake, then the protocol's own opening
(the WebSocket upgrade; the server's first HTTP/2 frame, its SETTINGS; an HTTP/1.1 first response;
the REGISTER round trips of SIP, challenge and authenticated). The warm round trip is the cheapest
exchange on the now-open connection (WebSocket ping/pong, HTTP/2 PING/ACK, a second HTTP/1.1
request, a SIP OPTIONS). The connection is then closed politely (close frame, GOAWAY, un-REGISTER).

Protocol work uses the sans-I/O parts of ``websockets`` and ``h2`` on plain asyncio streams, so
nothing but the step being timed happens between two clock readings.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import re
import secrets
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar
from urllib.parse import urlsplit

import h2.config
import h2.connection
import h2.events
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

__all__ = ["ProbeError", "Sample", "Target", "parse_target", "probe_once"]

_READ = 65536
_SIP_EXPIRES = 60
_FAILURES = (OSError, ssl.SSLError, ValueError, EOFError, asyncio.LimitOverrunError)
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


def parse_target(url: str) -> Target:
    """Parse a ``wss://``, ``ws://``, ``https://``, ``http://`` or ``sip:`` URL (or ValueError)."""
    if url.startswith(("sip:", "sips:")):
        return _parse_sip(url)
    parts = urlsplit(url)
    scheme = parts.scheme
    if scheme not in ("ws", "wss", "http", "https") or not parts.hostname:
        raise ValueError(f"{url!r}: expected wss://, ws://, https://, http:// or sip: URL")
    tls = scheme in ("wss", "https")
    try:
        port = parts.port or (443 if tls else 80)
    except ValueError as exc:
        raise ValueError(f"{url!r}: {exc}") from None
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    kind: Literal["websocket", "https", "http"]
    kind = "websocket" if scheme in ("ws", "wss") else ("https" if tls else "http")
    return Target(url, kind, parts.hostname, port, path, tls)


def _parse_sip(url: str) -> Target:
    scheme, _, rest = url.partition(":")
    if scheme == "sips":
        raise ValueError(f"{url!r}: sips: (SIP over TLS) is not probed; use sip:...;transport=tcp")
    address, _, params = rest.partition(";")
    user = None
    if "@" in address:
        user, _, address = address.rpartition("@")
    host, _, port_text = address.partition(":")
    if address.startswith("["):
        host, _, port_text = address[1:].partition("]")
        port_text = port_text.removeprefix(":")
    if not host:
        raise ValueError(f"{url!r}: expected sip:host[:port][;transport=udp|tcp]")
    if port_text and not port_text.isdigit():
        raise ValueError(f"{url!r}: bad port {port_text!r}")
    found = re.search(r"(?:^|;)transport=(\w+)", params, re.I)
    name = found.group(1).lower() if found else "udp"
    transport: Literal["tcp", "udp"]
    if name == "udp":
        transport = "udp"
    elif name == "tcp":
        transport = "tcp"
    else:
        raise ValueError(f"{url!r}: transport must be udp or tcp, got {name!r}")
    return Target(url, "sip", host, int(port_text or 5060), transport=transport, user=user or None)


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


class _Clock:
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
        except _FAILURES as exc:
            raise ProbeError(f"{name}: {_reason(exc)}") from exc
        return result, time.perf_counter() - t0


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate rejected ({exc.verify_message}); use --ca-file or --insecure"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "the server closed the connection"
    return str(exc) or type(exc).__name__


async def probe_once(target: Target, options: ProbeOptions) -> Sample:
    """One cold connection to ``target`` and one warm round trip. Raises ProbeError."""
    sample = Sample()
    clock = _Clock(sample, options.timeout)
    loop = asyncio.get_running_loop()
    dgram = target.kind == "sip" and target.transport == "udp"
    kind = socket.SOCK_DGRAM if dgram else socket.SOCK_STREAM

    async def resolve() -> tuple[int, tuple[str, int]]:
        if literal is not None:
            return literal
        infos = await loop.getaddrinfo(target.host, target.port, type=kind)
        if not infos:
            raise OSError(f"{target.host} has no address")
        family, _, _, _, addr = infos[0]
        return family, (str(addr[0]), int(addr[1]))

    literal = _ip_literal(target.host, target.port)
    family, addr = await clock.step("dns", resolve)
    if literal is not None:
        sample.notes["dns"] = "IP address: no lookup"

    if dgram:
        await _sip_udp(target, options, clock, family, addr)
        return sample
    reader, writer = await _tcp(clock, family, addr)
    try:
        if target.tls:
            await _tls(clock, writer, target, options)
        if target.kind == "websocket":
            await _websocket(target, options, clock, reader, writer)
        elif target.kind == "sip":
            await _sip_stream(target, options, clock, reader, writer)
        elif _alpn(writer) == "h2":
            await _http2(clock, reader, writer)
        else:
            await _http1(target, options, clock, reader, writer)
    finally:
        writer.close()
        try:
            async with asyncio.timeout(1.0):
                await writer.wait_closed()
        except (*_FAILURES, TimeoutError):
            writer.transport.abort()  # a peer that does not finish the close: drop it
    return sample


def _ip_literal(host: str, port: int) -> tuple[int, tuple[str, int]] | None:
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    return (socket.AF_INET6 if ip.version == 6 else socket.AF_INET), (str(ip), port)


async def _tcp(
    clock: _Clock, family: int, addr: tuple[str, int]
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    loop = asyncio.get_running_loop()
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        await clock.step("tcp", lambda: loop.sock_connect(sock, addr))
        return await asyncio.open_connection(sock=sock)
    except BaseException:
        sock.close()
        raise


async def _tls(
    clock: _Clock, writer: asyncio.StreamWriter, target: Target, options: ProbeOptions
) -> None:
    alpn = ["http/1.1"] if target.kind == "websocket" else ["h2", "http/1.1"]
    try:
        ctx = options.ssl_context(alpn)
    except (OSError, ssl.SSLError) as exc:
        raise ProbeError(f"tls: cannot load the CA file: {exc}") from exc
    await clock.step("tls", lambda: writer.start_tls(ctx, server_hostname=target.host))
    sslobj = writer.get_extra_info("ssl_object")
    if sslobj is not None:
        clock.sample.notes["tls"] = str(sslobj.version())
        clock.sample.notes["alpn"] = str(sslobj.selected_alpn_protocol() or "-")


def _alpn(writer: asyncio.StreamWriter) -> str | None:
    sslobj = writer.get_extra_info("ssl_object")
    return None if sslobj is None else sslobj.selected_alpn_protocol()


# -- WebSocket ------------------------------------------------------------------------------------


async def _websocket(
    target: Target,
    options: ProbeOptions,
    clock: _Clock,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    protocol = ClientProtocol(parse_uri(target.url), max_size=2**22)
    request = protocol.connect()
    for name, value in options.headers:
        request.headers[name] = value

    async def upgrade() -> Response:
        protocol.send_request(request)
        _flush(writer, protocol.data_to_send())
        while True:
            data = await reader.read(_READ)
            if not data:
                raise OSError("the server closed the connection during the upgrade")
            protocol.receive_data(data)
            for event in protocol.events_received():
                if isinstance(event, Response):
                    return event

    response = await clock.step("upgrade", upgrade)
    clock.sample.notes["status"] = f"HTTP {response.status_code}"
    if protocol.handshake_exc is not None:
        hint = " (pass the API key with -H)" if response.status_code in (401, 403) else ""
        clock.sample.notes["warm"] = f"no WebSocket: upgrade answered HTTP {response.status_code}"
        clock.sample.notes["warm"] += hint
        return

    async def ping() -> None:
        payload = secrets.token_bytes(4)
        protocol.send_ping(payload)
        _flush(writer, protocol.data_to_send())
        while True:
            data = await reader.read(_READ)
            if not data:
                raise OSError("the server closed the WebSocket")
            protocol.receive_data(data)
            for event in protocol.events_received():
                is_pong = isinstance(event, Frame) and event.opcode is Opcode.PONG
                if is_pong and getattr(event, "data", None) == payload:
                    return

    _, clock.sample.warm = await clock.time("warm", ping)
    clock.sample.warm_what = "WebSocket ping -> pong"
    protocol.send_close(1000, "probe done")
    _flush(writer, protocol.data_to_send())


def _flush(writer: asyncio.StreamWriter, chunks: Sequence[bytes]) -> None:
    for chunk in chunks:
        if chunk:
            writer.write(chunk)


# -- HTTP/2 and HTTP/1.1 --------------------------------------------------------------------------


async def _http2(clock: _Clock, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))

    async def until(kind: type[h2.events.Event]) -> None:
        while True:
            data = await reader.read(_READ)
            if not data:
                raise OSError("the server closed the HTTP/2 connection")
            events = conn.receive_data(data)
            writer.write(conn.data_to_send())
            if any(isinstance(e, kind) for e in events):
                return

    async def settings() -> None:
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        await until(h2.events.RemoteSettingsChanged)

    await clock.step("http2", settings)
    clock.sample.notes["http2"] = "first frame: server SETTINGS"

    async def ping() -> None:
        conn.ping(secrets.token_bytes(8))
        writer.write(conn.data_to_send())
        await until(h2.events.PingAckReceived)

    _, clock.sample.warm = await clock.time("warm", ping)
    clock.sample.warm_what = "HTTP/2 PING -> ACK"
    conn.close_connection()
    writer.write(conn.data_to_send())


async def _http1(
    target: Target,
    options: ProbeOptions,
    clock: _Clock,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    default = 443 if target.tls else 80
    host = target.host if target.port == default else f"{target.host}:{target.port}"
    extra = "".join(f"{k}: {v}\r\n" for k, v in options.headers)
    request = (
        f"HEAD {target.path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: voicepool-probe\r\n{extra}\r\n"
    ).encode()
    closes = False

    async def exchange() -> None:
        nonlocal closes
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0].decode("latin-1")
        clock.sample.notes["status"] = status.partition(" ")[2] or status
        closes = b"\nconnection: close" in head.lower()

    await clock.step("http1", exchange)
    if closes:
        clock.sample.notes["warm"] = "the server closes the connection after each response"
        return
    _, clock.sample.warm = await clock.time("warm", exchange)
    clock.sample.warm_what = "a second HEAD on the same connection"


# -- SIP ------------------------------------------------------------------------------------------


class _SipUdp(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.queue.put_nowait(data)

    def error_received(self, exc: Exception) -> None:
        self.queue.put_nowait(b"")  # ICMP port unreachable: nobody listens there


class _SipDialog:
    """The few SIP requests a probe sends: REGISTER (challenged, then authenticated), OPTIONS."""

    def __init__(self, target: Target, options: ProbeOptions, local: tuple[str, int]) -> None:
        self.target = target
        self.user = options.sip_user or target.user or "voicepool-probe"
        self.password = options.sip_password
        self.local = local
        self.call_id = f"{secrets.token_hex(8)}@voicepool-probe"
        self.tag = secrets.token_hex(4)
        self.cseq = 0
        self.uri = f"sip:{target.host}:{target.port}"
        self.aor = f"sip:{self.user}@{target.host}"
        self.auth: str | None = None
        self.nc = 0
        self.challenge: dict[str, str] | None = None

    def request(self, method: str, *, expires: int | None = None) -> tuple[bytes, str]:
        """(message bytes, branch) for ``method``; REGISTER carries the digest once challenged."""
        self.cseq += 1
        branch = f"z9hG4bK{secrets.token_hex(8)}"
        host, port = self.local
        proto = self.target.transport.upper()
        lines = [
            f"{method} {self.uri} SIP/2.0",
            f"Via: SIP/2.0/{proto} {host}:{port};branch={branch};rport",
            "Max-Forwards: 70",
            f"From: <{self.aor}>;tag={self.tag}",
            f"To: <{self.aor}>",
            f"Call-ID: {self.call_id}",
            f"CSeq: {self.cseq} {method}",
            f"Contact: <sip:{self.user}@{host}:{port};transport={self.target.transport}>",
            "User-Agent: voicepool-probe",
        ]
        if expires is not None:
            lines.append(f"Expires: {expires}")
        if method == "REGISTER" and self.challenge is not None:
            lines.append(f"Authorization: {self._digest(method)}")
        lines += ["Content-Length: 0", "", ""]
        return "\r\n".join(lines).encode(), branch

    def _digest(self, method: str) -> str:
        ch = self.challenge or {}
        realm, nonce = ch.get("realm", ""), ch.get("nonce", "")
        password = self.password or ""

        def md5(text: str) -> str:
            return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()

        ha1 = md5(f"{self.user}:{realm}:{password}")
        ha2 = md5(f"{method}:{self.uri}")
        parts = [
            f'username="{self.user}"',
            f'realm="{realm}"',
            f'nonce="{nonce}"',
            f'uri="{self.uri}"',
            "algorithm=MD5",
        ]
        if "auth" in ch.get("qop", "").split(","):
            self.nc += 1
            nc, cnonce = f"{self.nc:08x}", secrets.token_hex(8)
            response = md5(f"{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}")
            parts += ["qop=auth", f"nc={nc}", f'cnonce="{cnonce}"']
        else:
            response = md5(f"{ha1}:{nonce}:{ha2}")
        parts.append(f'response="{response}"')
        if "opaque" in ch:
            parts.append(f'opaque="{ch["opaque"]}"')
        return "Digest " + ", ".join(parts)

    def learn(self, response: bytes) -> None:
        """Keep the digest challenge of a 401/407 answer."""
        found = re.search(rb"(?im)^(?:www|proxy)-authenticate\s*:\s*digest\s+(.+)$", response)
        if found is None:
            return
        params = {}
        for m in re.finditer(
            r'([\w-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]+)', found.group(1).decode()
        ):
            raw = m.group(2)
            params[m.group(1).lower()] = raw[1:-1] if raw.startswith('"') else raw
        self.challenge = params


def _status(message: bytes) -> int:
    first = message.split(b"\r\n", 1)[0].split(b" ")
    if len(first) < 2 or not first[0].startswith(b"SIP/") or not first[1].isdigit():
        raise OSError(f"not a SIP response: {message[:40]!r}")
    return int(first[1])


def _branch_of(message: bytes) -> str | None:
    found = re.search(rb"(?im)^(?:via|v)\s*:[^\r\n]*branch=([^;,\s]+)", message)
    return found.group(1).decode() if found else None


Recv = Callable[[], Awaitable[bytes]]


async def _sip_exchange(
    dialog: _SipDialog,
    send: Callable[[bytes], object],
    recv: Recv,
    method: str,
    expires: int | None = None,
) -> bytes:
    """Send one request, return its final response (1xx skipped; UDP retransmits, T1 x 2^n)."""
    message, branch = dialog.request(method, expires=expires)
    send(message)
    udp = dialog.target.transport == "udp"
    interval = 0.5
    while True:
        try:
            async with asyncio.timeout(interval if udp else None):
                data = await recv()
        except TimeoutError:
            send(message)  # a lost datagram: retransmit like a SIP client (Timer A)
            interval = min(interval * 2, 4.0)
            continue
        if not data:
            raise OSError("connection refused or closed (nothing listens there?)")
        if _branch_of(data) != branch:
            continue  # a late answer to an earlier request
        status = _status(data)
        if status >= 200:
            return data


async def _sip_steps(
    dialog: _SipDialog, clock: _Clock, send: Callable[[bytes], object], recv: Recv
) -> None:
    sample = clock.sample
    answer: dict[str, bytes] = {}

    async def register() -> None:
        answer["r"] = await _sip_exchange(dialog, send, recv, "REGISTER", expires=_SIP_EXPIRES)

    await clock.step("register", register)
    status = _status(answer["r"])
    sample.notes["register"] = str(status)
    registered = status == 200
    if status in (401, 407):
        dialog.learn(answer["r"])
        if dialog.password is None:
            sample.notes["auth"] = "challenged: pass --sip-user/--sip-password for the 2nd trip"
        else:
            await clock.step("register_auth", register)
            status = _status(answer["r"])
            sample.notes["register_auth"] = str(status)
            registered = status == 200
            if not registered:
                raise ProbeError(f"register_auth: the registrar answered {status}")
    elif status >= 300:
        raise ProbeError(f"register: the registrar answered {status}")

    async def options() -> None:
        answer["o"] = await _sip_exchange(dialog, send, recv, "OPTIONS")

    _, sample.warm = await clock.time("warm", options)
    sample.warm_what = f"OPTIONS -> {_status(answer['o'])}"
    if registered:  # leave the registrar as we found it (not timed, bounded)
        with contextlib.suppress(*_FAILURES, TimeoutError):
            async with asyncio.timeout(min(clock.timeout, 3.0)):
                await _sip_exchange(dialog, send, recv, "REGISTER", expires=0)


async def _sip_udp(
    target: Target, options: ProbeOptions, clock: _Clock, family: int, addr: tuple[str, int]
) -> None:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        _SipUdp, remote_addr=addr, family=family
    )
    try:
        local = transport.get_extra_info("sockname")
        dialog = _SipDialog(target, options, (str(local[0]), int(local[1])))
        await _sip_steps(dialog, clock, transport.sendto, protocol.queue.get)
    finally:
        transport.close()


async def _sip_stream(
    target: Target,
    options: ProbeOptions,
    clock: _Clock,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    local = writer.get_extra_info("sockname")

    async def recv() -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        found = re.search(rb"(?im)^(?:content-length|l)\s*:\s*(\d+)", head)
        body = await reader.readexactly(int(found.group(1))) if found else b""
        return head + body

    dialog = _SipDialog(target, options, (str(local[0]), int(local[1])))
    await _sip_steps(dialog, clock, writer.write, recv)

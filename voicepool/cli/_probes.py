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
import ipaddress
import re
import secrets
import socket
import ssl
from collections.abc import Sequence
from typing import Literal
from urllib.parse import urlsplit

import h2.config
import h2.connection
import h2.events
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from voicepool.cli._probebase import FAILURES, Clock, ProbeError, ProbeOptions, Sample, Target
from voicepool.cli._sipprobe import sip_stream, sip_udp

__all__ = [
    "FAILURES",
    "Clock",
    "ProbeError",
    "ProbeOptions",
    "Sample",
    "Target",
    "parse_target",
    "probe_once",
]

_READ = 65536


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


async def probe_once(target: Target, options: ProbeOptions) -> Sample:
    """One cold connection to ``target`` and one warm round trip. Raises ProbeError."""
    sample = Sample()
    clock = Clock(sample, options.timeout)
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
        await sip_udp(target, options, clock, family, addr)
        return sample
    reader, writer = await _tcp(clock, family, addr)
    try:
        if target.tls:
            await _tls(clock, writer, target, options)
        if target.kind == "websocket":
            await _websocket(target, options, clock, reader, writer)
        elif target.kind == "sip":
            await sip_stream(target, options, clock, reader, writer)
        elif _alpn(writer) == "h2":
            await _http2(clock, reader, writer)
        else:
            await _http1(target, options, clock, reader, writer)
    finally:
        writer.close()
        try:
            async with asyncio.timeout(1.0):
                await writer.wait_closed()
        except (*FAILURES, TimeoutError):
            writer.transport.abort()  # a peer that does not finish the close: drop it
    return sample


def _ip_literal(host: str, port: int) -> tuple[int, tuple[str, int]] | None:
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    return (socket.AF_INET6 if ip.version == 6 else socket.AF_INET), (str(ip), port)


async def _tcp(
    clock: Clock, family: int, addr: tuple[str, int]
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
    clock: Clock, writer: asyncio.StreamWriter, target: Target, options: ProbeOptions
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
    clock: Clock,
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


async def _http2(clock: Clock, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
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
    clock: Clock,
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

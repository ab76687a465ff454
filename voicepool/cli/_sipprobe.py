"""The SIP part of ``voicepool probe``: REGISTER (challenged, then authenticated), OPTIONS.

A probe is a minimal user agent over UDP (with RFC 3261 retransmissions) or TCP: the first REGISTER
is answered 401 with a digest challenge (one round trip), the authenticated one 200 (another);
OPTIONS is the warm round trip. A successful registration is removed again (``Expires: 0``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import secrets
from collections.abc import Awaitable, Callable

from voicepool.cli._probes import FAILURES, Clock, ProbeError, ProbeOptions, Target

__all__ = ["sip_stream", "sip_udp"]

_SIP_EXPIRES = 60


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
    dialog: _SipDialog, clock: Clock, send: Callable[[bytes], object], recv: Recv
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
        with contextlib.suppress(*FAILURES, TimeoutError):
            async with asyncio.timeout(min(clock.timeout, 3.0)):
                await _sip_exchange(dialog, send, recv, "REGISTER", expires=0)


async def sip_udp(
    target: Target, options: ProbeOptions, clock: Clock, family: int, addr: tuple[str, int]
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


async def sip_stream(
    target: Target,
    options: ProbeOptions,
    clock: Clock,
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

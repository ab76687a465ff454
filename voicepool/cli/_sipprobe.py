"""The SIP part of ``voicepool probe``: REGISTER (challenged, then authenticated), OPTIONS.

A probe is a minimal user agent over UDP (with RFC 3261 retransmissions) or TCP: the first REGISTER
is answered 401 with a digest challenge (one round trip), the authenticated one 200 (another);
OPTIONS is the warm round trip. A successful registration is removed again (``Expires: 0``).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Awaitable, Callable

from voicepool._sip import (
    SipMessage,
    build_request,
    digest_authorization,
    new_branch,
    parse_digest,
    parse_message,
    split_stream,
)
from voicepool.cli._probebase import FAILURES, Clock, ProbeError, ProbeOptions, Target

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
        self.nc = 0
        self.challenge: dict[str, str] | None = None

    def request(self, method: str, *, expires: int | None = None) -> tuple[bytes, str]:
        """(message bytes, branch) for ``method``; REGISTER carries the digest once challenged."""
        self.cseq += 1
        branch = new_branch()
        host, port = self.local
        transport = self.target.transport
        headers = [
            f"Contact: <sip:{self.user}@{host}:{port};transport={transport}>",
            "User-Agent: voicepool-probe",
        ]
        if expires is not None:
            headers.append(f"Expires: {expires}")
        if method == "REGISTER" and self.challenge is not None:
            self.nc += 1
            authorization = digest_authorization(
                self.challenge,
                user=self.user,
                password=self.password or "",
                method=method,
                uri=self.uri,
                nc=self.nc,
            )
            headers.append(f"Authorization: {authorization}")
        message = build_request(
            method,
            self.uri,
            via=(transport, host, port),
            branch=branch,
            from_uri=self.aor,
            from_tag=self.tag,
            to_uri=self.aor,
            call_id=self.call_id,
            cseq=self.cseq,
            headers=headers,
        )
        return message, branch

    def learn(self, response: SipMessage) -> None:
        """Keep the digest challenge of a 401/407 answer (a new nonce restarts the count)."""
        value = response.header("www-authenticate") or response.header("proxy-authenticate")
        challenge = parse_digest(value or "")
        if challenge:
            self.challenge = challenge
            self.nc = 0


def _response(data: bytes) -> SipMessage:
    """The response in ``data``; OSError (a failed probe step) when it is not one."""
    try:
        message = parse_message(data)
    except ValueError:
        message = None
    if message is None or not message.is_response:
        raise OSError(f"not a SIP response: {data[:40]!r}")
    return message


Recv = Callable[[], Awaitable[bytes]]


async def _sip_exchange(
    dialog: _SipDialog,
    send: Callable[[bytes], object],
    recv: Recv,
    method: str,
    expires: int | None = None,
) -> SipMessage:
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
        response = _response(data)
        if response.branch != branch:
            continue  # a late answer to an earlier request
        if response.status >= 200:
            return response


async def _sip_steps(
    dialog: _SipDialog, clock: Clock, send: Callable[[bytes], object], recv: Recv
) -> None:
    sample = clock.sample
    answer: dict[str, SipMessage] = {}

    async def register() -> None:
        answer["r"] = await _sip_exchange(dialog, send, recv, "REGISTER", expires=_SIP_EXPIRES)

    await clock.step("register", register)
    status = answer["r"].status
    sample.notes["register"] = str(status)
    registered = status == 200
    if status in (401, 407):
        dialog.learn(answer["r"])
        if dialog.password is None:
            sample.notes["auth"] = "challenged: pass --sip-user/--sip-password for the 2nd trip"
        else:
            await clock.step("register_auth", register)
            status = answer["r"].status
            sample.notes["register_auth"] = str(status)
            registered = status == 200
            if not registered:
                raise ProbeError(f"register_auth: the registrar answered {status}")
    elif status >= 300:
        raise ProbeError(f"register: the registrar answered {status}")

    async def options() -> None:
        answer["o"] = await _sip_exchange(dialog, send, recv, "OPTIONS")

    _, sample.warm = await clock.time("warm", options)
    sample.warm_what = f"OPTIONS -> {answer['o'].status}"
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

    buffer = bytearray()
    framed: list[bytes] = []

    async def recv() -> bytes:
        while not framed:
            data = await reader.read(65536)
            if not data:
                return b""  # closed by the registrar
            buffer.extend(data)
            framed.extend(split_stream(buffer))
        return framed.pop(0)

    dialog = _SipDialog(target, options, (str(local[0]), int(local[1])))
    await _sip_steps(dialog, clock, writer.write, recv)

"""A small SIP registrar emulator: asyncio, UDP and TCP on one port, digest auth, fault modes.

::

    async with SipRegistrar(users={"alice": "secret"}) as registrar:
        registrar.uri            # "sip:127.0.0.1:PORT" (UDP and TCP)
        registrar.mode = "503"   # every REGISTER now gets 503 Service Unavailable
        registrar.binding_count(), registrar.register_count, registrar.register_times

Modes (:class:`RegistrarMode`, settable at any time):

* ``"ok"``: a REGISTER without valid credentials gets ``401`` with a digest challenge (MD5,
  qop=auth); a valid one is saved and answered ``200`` with the AOR's bindings. A wrong password
  is challenged again (``401``), like Kamailio, or answered ``wrong_password_status`` (403).
  Expiry below ``min_expires`` is raised to it silently, like Kamailio's default.
* ``"401"``: every REGISTER is challenged, even with valid credentials.
* ``"403"``: authenticated REGISTERs get ``403 Forbidden``.
* ``"423"``: expiry below ``min_expires`` gets ``423 Interval Too Brief`` + ``Min-Expires``.
* ``"503"``: ``503 Service Unavailable`` (with ``Retry-After`` when ``retry_after`` is set).
* ``"no-answer"``: requests are swallowed.

The protocol logic (:class:`RegistrarCore`) is sans-I/O: bytes in, bytes out, an injectable
clock; SIP parsing, framing, answers and the digest come from :mod:`voicepool._sip`, which the
``voicepool probe`` SIP client shares. OPTIONS gets ``200`` (except in no-answer mode); other
methods ``501``. Everything listens on 127.0.0.1 by default and only ever answers the peer that
wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import re
import secrets
import socket
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import cast

from voicepool._sip import (
    SipMessage,
    build_response,
    digest_response,
    parse_digest,
    parse_message,
    split_stream,
)
from voicepool.testing._service import LocalService

__all__ = [
    "Binding",
    "RegistrarCore",
    "RegistrarMode",
    "SipMessage",
    "SipRegistrar",
    "digest_response",
    "parse_digest",
    "parse_message",
    "split_stream",
]


class RegistrarMode(enum.StrEnum):
    """How the emulator answers REGISTER (see the module docstring)."""

    OK = "ok"
    UNAUTHORIZED = "401"
    FORBIDDEN = "403"
    INTERVAL_TOO_BRIEF = "423"
    UNAVAILABLE = "503"
    NO_ANSWER = "no-answer"


@dataclass
class Binding:
    """One contact registered for an AOR."""

    aor: str  # the To user, e.g. "alice"
    contact: str  # the Contact URI as sent, without <>
    expires_at: float
    call_id: str
    transport: str
    source: tuple[str, int]


@dataclass
class RegistrarCore:
    """The registrar's protocol logic, without I/O (see the module docstring for the modes)."""

    users: Mapping[str, str] = field(default_factory=lambda: {"alice": "secret"})
    realm: str = "voicepool"
    mode: RegistrarMode = RegistrarMode.OK
    min_expires: int = 10
    max_expires: int = 3600
    default_expires: int = 3600
    retry_after: int | None = None
    wrong_password_status: int = 401
    qop: bool = True
    clock: Callable[[], float] = time.monotonic

    register_count: int = 0
    """REGISTER requests received (retransmissions included)."""
    register_times: list[float] = field(default_factory=list)
    """Arrival time (``clock``) of each REGISTER."""
    transactions: set[tuple[str, str]] = field(default_factory=set)
    """Distinct (Call-ID, CSeq) of the REGISTERs received: attempts, not packets."""
    answers: Counter[int] = field(default_factory=Counter)
    """Responses sent, by status code."""
    _bindings: dict[tuple[str, str], Binding] = field(default_factory=dict)
    _nonces: deque[str] = field(default_factory=lambda: deque(maxlen=4096))

    def bindings(self, aor: str | None = None) -> list[Binding]:
        """Live bindings (expired ones are dropped), optionally of one AOR user."""
        now = self.clock()
        for key in [k for k, b in self._bindings.items() if b.expires_at <= now]:
            del self._bindings[key]
        return [b for b in self._bindings.values() if aor is None or b.aor == aor]

    def handle(self, data: bytes, transport: str, source: tuple[str, int]) -> bytes | None:
        """Answer one datagram / framed message; None means no answer (or not SIP)."""
        if not data.strip(b"\r\n"):
            return None  # keep-alive
        try:
            msg = parse_message(data)
        except ValueError:
            return None
        if msg.is_response:
            return None  # a response: we never send requests
        if msg.method == "REGISTER":
            self.register_count += 1
            self.register_times.append(self.clock())
            self.transactions.add((msg.header("call-id") or "", msg.header("cseq") or ""))
        if self.mode is RegistrarMode.NO_ANSWER:
            return None
        if msg.method == "OPTIONS":
            return self._reply(msg, 200, source)
        if msg.method != "REGISTER":
            return self._reply(msg, 501, source)
        return self._register(msg, transport, source)

    def _register(self, msg: SipMessage, transport: str, source: tuple[str, int]) -> bytes:
        if self.mode is RegistrarMode.UNAVAILABLE:
            extra = [f"Retry-After: {self.retry_after}"] if self.retry_after is not None else []
            return self._reply(msg, 503, source, extra)
        aor = _user_of(msg.header("to") or "")
        verdict = self._authenticate(msg)
        if verdict is not True or self.mode is RegistrarMode.UNAUTHORIZED:
            if verdict == "wrong" and self.wrong_password_status == 403:
                return self._reply(msg, 403, source)
            return self._challenge(msg, source)
        if self.mode is RegistrarMode.FORBIDDEN:
            return self._reply(msg, 403, source)
        now = self.clock()
        default = _int(msg.header("expires"), self.default_expires)
        contacts = msg.all("contact")
        if contacts == ["*"]:
            for key in [k for k in self._bindings if k[0] == aor]:
                del self._bindings[key]
            return self._ok(msg, aor, source)
        changes: list[tuple[str, int]] = []
        for contact in contacts:
            uri = _contact_uri(contact)
            expires = _int(_param(contact, "expires"), default)
            if 0 < expires < self.min_expires:
                if self.mode is RegistrarMode.INTERVAL_TOO_BRIEF:
                    return self._reply(msg, 423, source, [f"Min-Expires: {self.min_expires}"])
                expires = self.min_expires
            changes.append((uri, min(expires, self.max_expires)))
        for uri, expires in changes:
            if expires == 0:
                self._bindings.pop((aor, uri), None)
            else:
                call_id = msg.header("call-id") or ""
                self._bindings[(aor, uri)] = Binding(
                    aor, uri, now + expires, call_id, transport, source
                )
        return self._ok(msg, aor, source)

    def _authenticate(self, msg: SipMessage) -> bool | str:
        """True, "missing" (no usable credentials) or "wrong" (a bad password)."""
        creds = parse_digest(msg.header("authorization") or "")
        user = creds.get("username", "")
        nonce = creds.get("nonce", "")
        if not creds or nonce not in self._nonces or user not in self.users:
            return "missing"
        if creds.get("realm") != self.realm:
            return "missing"
        expected = digest_response(
            user,
            self.realm,
            self.users[user],
            msg.method,
            creds.get("uri", ""),
            nonce,
            qop=creds.get("qop") or None,
            nc=creds.get("nc", ""),
            cnonce=creds.get("cnonce", ""),
        )
        if not secrets.compare_digest(expected, creds.get("response", "")):
            return "wrong"
        return True

    def _challenge(self, msg: SipMessage, source: tuple[str, int]) -> bytes:
        nonce = secrets.token_hex(16)
        self._nonces.append(nonce)
        qop = ', qop="auth"' if self.qop else ""
        challenge = f'WWW-Authenticate: Digest realm="{self.realm}", nonce="{nonce}"'
        return self._reply(msg, 401, source, [f"{challenge}, algorithm=MD5{qop}"])

    def _ok(self, msg: SipMessage, aor: str, source: tuple[str, int]) -> bytes:
        now = self.clock()
        extra = [
            f"Contact: <{b.contact}>;expires={max(0, round(b.expires_at - now))}"
            for b in self.bindings(aor)
        ]
        return self._reply(msg, 200, source, extra)

    def _reply(
        self, msg: SipMessage, code: int, source: tuple[str, int], extra: Iterable[str] = ()
    ) -> bytes:
        self.answers[code] += 1
        return build_response(msg, code, source=source, headers=extra, server="voicepool-registrar")


def _user_of(name_addr: str) -> str:
    match = re.search(r"sips?:([^@;>]+)@", name_addr)
    return match.group(1) if match else ""


def _contact_uri(contact: str) -> str:
    match = re.search(r"<([^>]*)>", contact)
    return match.group(1) if match else contact.split(";", 1)[0].strip()


def _param(contact: str, name: str) -> str | None:
    tail = contact.rsplit(">", 1)[-1] if ">" in contact else contact
    match = re.search(rf";\s*{name}\s*=\s*([^;\s]+)", tail, re.I)
    return match.group(1) if match else None


def _int(value: str | None, default: int) -> int:
    return int(value) if value is not None and value.strip().isdigit() else default


class SipRegistrar(LocalService):
    """The asyncio driver of :class:`RegistrarCore`: UDP and TCP on one port of ``host``.

    Keyword options are the core's (see :class:`RegistrarCore`). Attributes proxy to the core
    (``mode``, ``register_count``, ``register_times``, ``transactions``, ``answers``).
    ``async with`` starts and stops it; it is not restartable.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        transports: Iterable[str] = ("udp", "tcp"),
        users: Mapping[str, str] | None = None,
        realm: str = "voicepool",
        mode: RegistrarMode | str = RegistrarMode.OK,
        min_expires: int = 10,
        max_expires: int = 3600,
        default_expires: int = 3600,
        retry_after: int | None = None,
        wrong_password_status: int = 401,
        qop: bool = True,
    ) -> None:
        self.host = host
        self.port = port
        self.transports = tuple(transports)
        self.core = RegistrarCore(
            users=dict(users) if users is not None else {"alice": "secret"},
            realm=realm,
            mode=RegistrarMode(mode),
            min_expires=min_expires,
            max_expires=max_expires,
            default_expires=default_expires,
            retry_after=retry_after,
            wrong_password_status=wrong_password_status,
            qop=qop,
        )
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    # -- views of the core -----------------------------------------------------------------------

    @property
    def mode(self) -> RegistrarMode:
        return self.core.mode

    @mode.setter
    def mode(self, value: RegistrarMode | str) -> None:
        self.core.mode = RegistrarMode(value)

    @property
    def register_count(self) -> int:
        return self.core.register_count

    @property
    def register_times(self) -> list[float]:
        return self.core.register_times

    @property
    def transactions(self) -> set[tuple[str, str]]:
        return self.core.transactions

    @property
    def answers(self) -> Counter[int]:
        return self.core.answers

    def bindings(self, aor: str | None = None) -> list[Binding]:
        return self.core.bindings(aor)

    def binding_count(self, aor: str | None = None) -> int:
        """Current (unexpired) bindings, optionally of one AOR user."""
        return len(self.core.bindings(aor))

    @property
    def uri(self) -> str:
        """``sip:HOST:PORT`` (add ``;transport=tcp`` for TCP, or let the client pick)."""
        return f"sip:{self.host}:{self.port}"

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> SipRegistrar:
        """Listen (UDP and TCP on the same port). Raises OSError when the port is taken."""
        requested = self.port
        for _attempt in range(20):
            try:
                await self._listen(requested)
                return self
            except OSError:
                await self.aclose()
                if requested:
                    raise
        raise OSError(f"no port was free for both UDP and TCP on {self.host}")

    async def _listen(self, port: int) -> None:
        # With port 0 the TCP listener picks the port and UDP takes the same number, which
        # another process may hold: start() then retries with a new one.
        if "tcp" in self.transports:
            self._tcp = await asyncio.start_server(self._serve_tcp, self.host, port)
            port = self._tcp.sockets[0].getsockname()[1]
        if "udp" in self.transports:
            self._udp, _ = await asyncio.get_running_loop().create_datagram_endpoint(
                lambda: _UdpProtocol(self.core), local_addr=(self.host, port), family=socket.AF_INET
            )
            port = self._udp.get_extra_info("sockname")[1]
        self.port = port

    async def aclose(self) -> None:
        """Stop listening and drop every TCP connection. Idempotent."""
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            for writer in list(self._writers):
                writer.close()
            await self._tcp.wait_closed()
            self._tcp = None
        for writer in list(self._writers):
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()
        self._writers.clear()

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        peer = writer.get_extra_info("peername")
        buffer = bytearray()
        try:
            while data := await reader.read(65536):
                buffer += data
                for message in split_stream(buffer):
                    answer = self.core.handle(message, "tcp", (peer[0], peer[1]))
                    if answer is not None:
                        writer.write(answer)
                await writer.drain()
        except (ConnectionError, ValueError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()

    def __repr__(self) -> str:
        return f"<SipRegistrar {self.uri} mode={self.mode.value} bindings={self.binding_count()}>"


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, core: RegistrarCore) -> None:
        self.core = core
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        source = (str(addr[0]), int(addr[1]))
        answer = self.core.handle(data, "udp", source)
        if answer is not None and self.transport is not None:
            self.transport.sendto(answer, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP port unreachable from a client that went away: nothing to do

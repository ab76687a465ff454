"""SIP messages and digest authentication, sans-I/O: the one copy of both in voicepool.

Bytes in, bytes out, no sockets and no clock. Used by the ``voicepool probe`` SIP user agent
(:mod:`voicepool.cli._sipprobe`), the registrar emulator (:mod:`voicepool.testing.sip_registrar`)
and the test peers' readiness probe. The pooled SIP adapter does not use it: pjsua2 speaks SIP
there.

* :func:`parse_message` / :class:`SipMessage`: one request or response (compact header names
  expanded, folded lines joined); :func:`split_stream` frames messages off a TCP stream.
* :func:`build_request` / :func:`build_response`: the few headers RFC 3261 requires, in order.
* :func:`parse_digest`, :func:`digest_response`, :func:`digest_authorization`: RFC 2617 / 7616
  MD5 digest (with or without ``qop=auth``), as a client answers a challenge and as a server checks
  the answer.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = [
    "SipMessage",
    "build_request",
    "build_response",
    "digest_authorization",
    "digest_response",
    "new_branch",
    "parse_digest",
    "parse_message",
    "split_stream",
]

_COMPACT = {
    "v": "via",
    "f": "from",
    "t": "to",
    "i": "call-id",
    "m": "contact",
    "l": "content-length",
}
REASONS = {
    200: "OK",
    401: "Unauthorized",
    403: "Forbidden",
    423: "Interval Too Brief",
    501: "Not Implemented",
    503: "Service Unavailable",
}
MAX_MESSAGE = 65536
_PARAM = re.compile(r'([\w-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]+)')
_CONTENT_LENGTH = re.compile(rb"(?im)^(?:content-length|l)[ \t]*:[ \t]*(\d+)")


@dataclass
class SipMessage:
    """A parsed SIP request or response. Header names are kept lowercase, long form."""

    start: str
    headers: list[tuple[str, str]]
    body: bytes = b""

    @property
    def is_response(self) -> bool:
        return self.start.startswith("SIP/")

    @property
    def method(self) -> str:
        """A request's method ("" for a response)."""
        return "" if self.is_response else self.start.split(" ", 1)[0]

    @property
    def uri(self) -> str:
        parts = self.start.split(" ")
        return parts[1] if len(parts) > 1 and not self.is_response else ""

    @property
    def status(self) -> int:
        """A response's status code (0 for a request)."""
        parts = self.start.split(" ")
        if self.is_response and len(parts) > 1 and parts[1].isdigit():
            return int(parts[1])
        return 0

    @property
    def branch(self) -> str | None:
        """The ``branch`` of the top Via: which transaction the message belongs to."""
        via = self.header("via") or ""
        found = re.search(r";\s*branch=([^;,\s]+)", via)
        return found.group(1) if found else None

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        name = name.lower()
        return next((v for n, v in self.headers if n == name), None)

    def all(self, name: str) -> list[str]:
        """Every value of ``name``, comma-separated lists split (outside <> and quotes)."""
        name = name.lower()
        out: list[str] = []
        for n, v in self.headers:
            if n == name:
                out.extend(_split_list(v))
        return out


def parse_message(data: bytes) -> SipMessage:
    """Parse one SIP message. Raises ValueError if it is not one."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        raise ValueError("no end of headers")
    lines = head.decode("utf-8", "replace").split("\r\n")
    start = lines[0].strip()
    if not start or " " not in start:
        raise ValueError(f"bad start line {start[:40]!r}")
    if start.startswith("SIP/") and not start.split(" ")[1].isdigit():
        raise ValueError(f"bad status line {start[:40]!r}")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line[:1] in (" ", "\t") and headers:  # folded continuation line
            name, value = headers[-1]
            headers[-1] = (name, f"{value} {line.strip()}")
            continue
        name, colon, value = line.partition(":")
        if not colon:
            raise ValueError(f"bad header line {line[:40]!r}")
        key = name.strip().lower()
        headers.append((_COMPACT.get(key, key), value.strip()))
    msg = SipMessage(start, headers)
    length = msg.header("content-length")
    msg.body = body[: int(length)] if length and length.isdigit() else body
    return msg


def split_stream(buffer: bytearray) -> list[bytes]:
    """Cut complete messages off the front of a TCP stream buffer (keep-alive CRLFs skipped).

    Raises ValueError when the headers grow past 64 KiB without an end.
    """
    out: list[bytes] = []
    while True:
        while buffer[:2] == b"\r\n":
            del buffer[:2]
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > MAX_MESSAGE:
                raise ValueError("SIP headers too long")
            return out
        match = _CONTENT_LENGTH.search(bytes(buffer[:end]))
        total = end + 4 + (int(match.group(1)) if match else 0)
        if len(buffer) < total:
            return out
        out.append(bytes(buffer[:total]))
        del buffer[:total]


def _split_list(value: str) -> list[str]:
    items: list[str] = []
    cur: list[str] = []
    depth, quoted = 0, False
    for ch in value:
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch == "<":
            depth += 1
        elif not quoted and ch == ">":
            depth -= 1
        elif ch == "," and not quoted and depth == 0:
            items.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    if "".join(cur).strip():
        items.append("".join(cur).strip())
    return items


def new_branch() -> str:
    """A fresh RFC 3261 Via branch (magic cookie + random)."""
    return f"z9hG4bK{secrets.token_hex(8)}"


def build_request(
    method: str,
    uri: str,
    *,
    via: tuple[str, str, int],
    branch: str,
    from_uri: str,
    from_tag: str,
    to_uri: str,
    call_id: str,
    cseq: int,
    headers: Iterable[str] = (),
) -> bytes:
    """One request without body. ``via``: (transport, host, port) the answer goes back to.

    ``headers``: extra ``Name: value`` lines (Contact, Expires, Authorization...), in order.
    """
    proto, host, port = via
    lines = [
        f"{method} {uri} SIP/2.0",
        f"Via: SIP/2.0/{proto.upper()} {host}:{port};branch={branch};rport",
        "Max-Forwards: 70",
        f"From: <{from_uri}>;tag={from_tag}",
        f"To: <{to_uri}>",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} {method}",
        *headers,
        "Content-Length: 0",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def build_response(
    request: SipMessage,
    code: int,
    *,
    source: tuple[str, int] | None = None,
    headers: Iterable[str] = (),
    server: str = "voicepool",
) -> bytes:
    """The answer ``code`` to ``request``: its Vias (the top one stamped with ``received`` and
    ``rport`` of ``source``, RFC 3581), From, To (tagged), Call-ID, CSeq, then ``headers``.
    """
    lines = [f"SIP/2.0 {code} {REASONS.get(code, 'Unknown')}"]
    for i, via in enumerate(request.all("via")):
        if i == 0 and source is not None:
            via = re.sub(r";rport(?=;|$)", f";rport={source[1]}", via)
            via += f";received={source[0]}"
        lines.append(f"Via: {via}")
    to = request.header("to") or ""
    if ";tag=" not in to:
        to += f";tag={secrets.token_hex(4)}"
    lines += [
        f"From: {request.header('from') or ''}",
        f"To: {to}",
        f"Call-ID: {request.header('call-id') or ''}",
        f"CSeq: {request.header('cseq') or ''}",
        *headers,
        f"Server: {server}",
        "Content-Length: 0",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def parse_digest(value: str) -> dict[str, str]:
    """The parameters of a ``Digest ...`` challenge or answer (keys lowercase); {} otherwise."""
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() != "digest":
        return {}
    params = {}
    for match in _PARAM.finditer(rest):
        raw = match.group(2)
        params[match.group(1).lower()] = raw[1:-1] if raw.startswith('"') else raw
    return params


def _md5(text: str) -> str:
    return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()


def digest_response(
    user: str,
    realm: str,
    password: str,
    method: str,
    uri: str,
    nonce: str,
    *,
    qop: str | None = None,
    nc: str = "",
    cnonce: str = "",
) -> str:
    """The RFC 2617 MD5 digest ``response`` value (``qop`` None or ``"auth"``)."""
    ha1 = _md5(f"{user}:{realm}:{password}")
    ha2 = _md5(f"{method}:{uri}")
    if qop:
        return _md5(f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")
    return _md5(f"{ha1}:{nonce}:{ha2}")


def digest_authorization(
    challenge: Mapping[str, str],
    *,
    user: str,
    password: str,
    method: str,
    uri: str,
    nc: int = 1,
) -> str:
    """The ``Authorization`` value answering ``challenge`` (from :func:`parse_digest`).

    Uses ``qop=auth`` when the challenge offers it; ``nc`` is the count of answers to the same
    nonce (1 for the first). The password appears only inside the hash.
    """
    realm, nonce = challenge.get("realm", ""), challenge.get("nonce", "")
    parts = [
        f'username="{user}"',
        f'realm="{realm}"',
        f'nonce="{nonce}"',
        f'uri="{uri}"',
        "algorithm=MD5",
    ]
    if "auth" in [q.strip() for q in challenge.get("qop", "").split(",")]:
        count, cnonce = f"{nc:08x}", secrets.token_hex(8)
        response = digest_response(
            user, realm, password, method, uri, nonce, qop="auth", nc=count, cnonce=cnonce
        )
        parts += ["qop=auth", f"nc={count}", f'cnonce="{cnonce}"']
    else:
        response = digest_response(user, realm, password, method, uri, nonce)
    parts.append(f'response="{response}"')
    if "opaque" in challenge:
        parts.append(f'opaque="{challenge["opaque"]}"')
    return "Digest " + ", ".join(parts)

"""The SIP registrar emulator: sans-I/O core (digest, modes, bindings) and its UDP/TCP driver.

These tests speak raw SIP over real sockets; they need neither pjsua2 nor Kamailio.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from voicepool.testing.sip_registrar import (
    RegistrarCore,
    RegistrarMode,
    SipRegistrar,
    digest_response,
    parse_digest,
    parse_message,
    split_stream,
)

SRC = ("127.0.0.1", 5099)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def register(
    *,
    user: str = "alice",
    contact: str = "<sip:alice@127.0.0.1:5099;ob>",
    expires: int | None = 60,
    cseq: int = 1,
    call_id: str = "call-1",
    auth: str | None = None,
    extra: str = "",
) -> bytes:
    lines = [
        "REGISTER sip:127.0.0.1 SIP/2.0",
        "Via: SIP/2.0/UDP 127.0.0.1:5099;rport;branch=z9hG4bKabc",
        f"From: <sip:{user}@127.0.0.1>;tag=f1",
        f"To: <sip:{user}@127.0.0.1>",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} REGISTER",
        f"Contact: {contact}",
    ]
    if expires is not None:
        lines.append(f"Expires: {expires}")
    if auth:
        lines.append(f"Authorization: {auth}")
    if extra:
        lines.append(extra)
    lines.append("Content-Length: 0")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def answer(core: RegistrarCore, data: bytes) -> tuple[int, dict[str, list[str]]]:
    raw = core.handle(data, "udp", SRC)
    assert raw is not None
    msg = parse_message(raw)
    code = int(msg.start.split()[1])
    headers: dict[str, list[str]] = {}
    for name, value in msg.headers:
        headers.setdefault(name, []).append(value)
    return code, headers


def authorize(
    core: RegistrarCore,
    password: str = "secret",
    *,
    user: str = "alice",
    cseq: int = 1,
    contact: str = "<sip:alice@127.0.0.1:5099;ob>",
    expires: int | None = 60,
) -> bytes:
    """REGISTER once to get a challenge, then build the authenticated request (CSeq + 1)."""
    code, headers = answer(core, register(user=user, cseq=cseq, contact=contact, expires=expires))
    assert code == 401
    challenge = parse_digest(headers["www-authenticate"][0])
    qop = challenge.get("qop")
    response = digest_response(
        user,
        challenge["realm"],
        password,
        "REGISTER",
        "sip:127.0.0.1",
        challenge["nonce"],
        qop=qop,
        nc="00000001",
        cnonce="c0ffee",
    )
    extra = f', qop={qop}, nc=00000001, cnonce="c0ffee"' if qop else ""
    auth = (
        f'Digest username="{user}", realm="{challenge["realm"]}", nonce="{challenge["nonce"]}",'
        f' uri="sip:127.0.0.1", response="{response}", algorithm=MD5{extra}'
    )
    return register(user=user, cseq=cseq + 1, contact=contact, expires=expires, auth=auth)


# -- parsing ------------------------------------------------------------------------------------


def test_parse_compact_headers_folding_and_lists() -> None:
    raw = (
        b"REGISTER sip:x SIP/2.0\r\nv: SIP/2.0/UDP a;branch=z9hG4bK1\r\n"
        b"m: <sip:a@b;x=1,2>;expires=5, <sip:c@d>\r\nSubject: one\r\n two\r\n"
        b"l: 3\r\n\r\nabcEXTRA"
    )
    msg = parse_message(raw)
    assert msg.method == "REGISTER"
    assert msg.uri == "sip:x"
    assert msg.header("via") == "SIP/2.0/UDP a;branch=z9hG4bK1"
    assert msg.all("contact") == ["<sip:a@b;x=1,2>;expires=5", "<sip:c@d>"]
    assert msg.header("subject") == "one two"
    assert msg.body == b"abc"
    with pytest.raises(ValueError, match="end of headers"):
        parse_message(b"REGISTER sip:x SIP/2.0\r\n")


def test_split_stream_frames_messages_and_skips_keepalives() -> None:
    one = register()
    two = b"OPTIONS sip:x SIP/2.0\r\nContent-Length: 4\r\n\r\nbody"
    buffer = bytearray(b"\r\n\r\n" + one + two[:10])
    assert split_stream(buffer) == [one]
    buffer += two[10:]
    assert split_stream(buffer) == [two]
    assert buffer == b""


def test_digest_matches_rfc2617_example() -> None:
    response = digest_response(
        "Mufasa",
        "testrealm@host.com",
        "Circle Of Life",
        "GET",
        "/dir/index.html",
        "dcd98b7102dd2f0e8b11d0f600bfb0c093",
        qop="auth",
        nc="00000001",
        cnonce="0a4f113b",
    )
    assert response == "6629fae49393a05397450978507c4ef1"


# -- the registrar ------------------------------------------------------------------------------


def test_challenge_then_register_then_unregister() -> None:
    core = RegistrarCore(users={"alice": "secret"}, realm="vp")
    code, headers = answer(core, register())
    assert code == 401
    assert 'realm="vp"' in headers["www-authenticate"][0]
    assert "rport=5099" in headers["via"][0]
    assert "received=127.0.0.1" in headers["via"][0]
    assert ";tag=" in headers["to"][0]
    code, headers = answer(core, authorize(core))
    assert code == 200
    assert headers["contact"] == ["<sip:alice@127.0.0.1:5099;ob>;expires=60"]
    assert [b.contact for b in core.bindings("alice")] == ["sip:alice@127.0.0.1:5099;ob"]
    code, headers = answer(core, authorize(core, expires=0, cseq=5))
    assert code == 200
    assert "contact" not in headers
    assert core.bindings() == []
    assert core.register_count == 5
    assert len(core.transactions) == 4  # the first two REGISTERs share CSeq 1
    assert core.answers == {401: 3, 200: 2}


def test_bindings_expire_and_star_removes_all() -> None:
    clock = Clock()
    core = RegistrarCore(clock=clock, qop=False)
    answer(core, authorize(core, contact="<sip:alice@h:1>"))
    answer(core, authorize(core, contact="<sip:alice@h:2>;expires=20", cseq=3))
    assert len(core.bindings("alice")) == 2
    clock.now += 30
    assert [b.contact for b in core.bindings()] == ["sip:alice@h:1"]
    code, _ = answer(core, authorize(core, contact="*", expires=0, cseq=5))
    assert code == 200
    assert core.bindings() == []


def test_expiry_is_raised_to_min_or_capped() -> None:
    core = RegistrarCore(min_expires=30, max_expires=100)
    _, headers = answer(core, authorize(core, expires=5))
    assert headers["contact"][0].endswith(";expires=30")
    _, headers = answer(core, authorize(core, expires=500, cseq=3))
    assert headers["contact"][0].endswith(";expires=100")


def test_wrong_password_is_challenged_again_or_forbidden() -> None:
    core = RegistrarCore()
    code, _ = answer(core, authorize(core, password="wrong"))
    assert code == 401
    core.wrong_password_status = 403
    code, _ = answer(core, authorize(core, password="wrong", cseq=3))
    assert code == 403
    core.users = {}
    code, _ = answer(core, authorize(core, cseq=5))
    assert code == 401  # unknown user: challenged, never registered
    assert core.bindings() == []


@pytest.mark.parametrize(
    ("mode", "code", "header"),
    [
        (RegistrarMode.UNAUTHORIZED, 401, "www-authenticate"),
        (RegistrarMode.FORBIDDEN, 403, None),
        (RegistrarMode.INTERVAL_TOO_BRIEF, 423, "min-expires"),
        (RegistrarMode.UNAVAILABLE, 503, "retry-after"),
    ],
)
def test_fault_modes(mode: RegistrarMode, code: int, header: str | None) -> None:
    core = RegistrarCore(min_expires=30, retry_after=7)
    request = authorize(core, expires=10)
    core.mode = mode
    got, headers = answer(core, request)
    assert got == code
    if header is not None:
        assert header in headers
    assert core.bindings() == []


def test_423_mode_accepts_a_long_enough_expiry() -> None:
    core = RegistrarCore(min_expires=30, mode=RegistrarMode.INTERVAL_TOO_BRIEF)
    code, headers = answer(core, authorize(core, expires=30))
    assert code == 200
    assert headers["contact"][0].endswith(";expires=30")


def test_no_answer_mode_counts_but_stays_silent() -> None:
    core = RegistrarCore(mode=RegistrarMode.NO_ANSWER)
    assert core.handle(register(), "udp", SRC) is None
    assert core.handle(register(), "udp", SRC) is None  # a retransmission: same transaction
    assert core.register_count == 2
    assert core.transactions == {("call-1", "1 REGISTER")}


def test_other_requests_and_garbage() -> None:
    core = RegistrarCore()
    options = register().replace(b"REGISTER", b"OPTIONS")
    code, _ = answer(core, options)
    assert code == 200
    code, _ = answer(core, options.replace(b"OPTIONS", b"INVITE"))
    assert code == 501
    assert core.handle(b"\r\n\r\n", "udp", SRC) is None
    assert core.handle(b"garbage", "udp", SRC) is None
    assert core.handle(b"SIP/2.0 200 OK\r\n\r\n", "udp", SRC) is None
    assert core.register_count == 0


# -- the asyncio driver ---------------------------------------------------------------------------


async def test_udp_and_tcp_on_one_port() -> None:
    async with SipRegistrar() as reg:
        assert reg.uri == f"sip:127.0.0.1:{reg.port}"
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.setblocking(False)
            udp.connect(("127.0.0.1", reg.port))
            await loop.sock_sendall(udp, register())
            async with asyncio.timeout(2):
                data = await loop.sock_recv(udp, 65536)
        assert data.startswith(b"SIP/2.0 401")
        reader, writer = await asyncio.open_connection("127.0.0.1", reg.port)
        try:
            writer.write(register(call_id="a") + b"\r\n\r\n" + register(call_id="b"))
            async with asyncio.timeout(2):
                first = await reader.readuntil(b"\r\n\r\n")
                second = await reader.readuntil(b"\r\n\r\n")
        finally:
            writer.close()
            await writer.wait_closed()
        assert first.startswith(b"SIP/2.0 401")
        assert second.startswith(b"SIP/2.0 401")
        assert reg.register_count == 3
        reg.mode = "503"
        assert reg.mode is RegistrarMode.UNAVAILABLE
        assert "mode=503" in repr(reg)


async def test_driver_closes_open_tcp_connections() -> None:
    reg = await SipRegistrar(transports=("tcp",)).start()
    reader, writer = await asyncio.open_connection("127.0.0.1", reg.port)
    await reg.aclose()
    async with asyncio.timeout(2):
        assert await reader.read() == b""
    writer.close()
    await writer.wait_closed()


async def test_fixed_port_taken_raises() -> None:
    async with SipRegistrar() as first:
        with pytest.raises(OSError):
            await SipRegistrar(port=first.port).start()

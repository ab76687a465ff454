"""SIP over TLS against Kamailio's TLS module, on the second binding (pjsua2-python).

The registrar presents a trustme certificate for 127.0.0.1; the client trusts that CA only.
TLS needs pjsua2-python and the test process runs pjsua2-pybind11 (one binding per process),
so the client runs in a subprocess (:mod:`tests.sip._tls_client`) with the binding that
``make install`` puts in ``.venv/sip-tls`` (outside site-packages, where its package would
shadow the default binding) on its PYTHONPATH.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.peers.kamailio import Kamailio, kamailio_available, kamailio_has_tls

REPO = Path(__file__).resolve().parents[2]
SIP_TLS = REPO / ".venv" / "sip-tls"

pytestmark = [
    pytest.mark.needs_bin,
    pytest.mark.skipif(not kamailio_available(), reason="kamailio is not installed"),
    pytest.mark.skipif(
        not (SIP_TLS / "pjsua2").is_dir(), reason="no pjsua2-python in .venv/sip-tls: make install"
    ),
]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A CA, a certificate for 127.0.0.1 signed by it, and a CA nobody used."""
    folder = tmp_path_factory.mktemp("sip-tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = {name: str(folder / f"{name}.pem") for name in ("ca", "cert", "key", "other_ca")}
    ca.cert_pem.write_to_path(paths["ca"])
    cert.private_key_pem.write_to_path(paths["key"])
    cert.cert_chain_pems[0].write_to_path(paths["cert"])
    trustme.CA().cert_pem.write_to_path(paths["other_ca"])
    return paths


@pytest.fixture
async def kamailio_tls(pki: dict[str, str]) -> AsyncIterator[Kamailio]:
    if not kamailio_has_tls():
        pytest.fail("Kamailio's tls.so is missing: scripts/install-system-deps.sh installs it")
    async with Kamailio(password="secret", tls_cert=(pki["cert"], pki["key"])) as kam:
        yield kam


class Client:
    """The TLS client subprocess: JSON lines out, one line in to let it finish."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, *args: str) -> Client:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(SIP_TLS), str(REPO)])
        env["VOICEPOOL_SIP_BINDING"] = "pjsua2-python"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.sip._tls_client", *args,
            cwd=REPO, env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        return cls(proc)

    async def next(self, timeout: float = 15.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            line = await self.proc.stdout.readline()
        if not line:
            err = b""
            if self.proc.stderr is not None:
                err = await self.proc.stderr.read()
            pytest.fail(f"the TLS client ended early:\n{err.decode(errors='replace')[-3000:]}")
        message: dict[str, Any] = json.loads(line)
        return message

    def go_on(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")

    async def finish(self, timeout: float = 15.0) -> None:
        async with asyncio.timeout(timeout):
            _, err = await self.proc.communicate()
        assert self.proc.returncode == 0, err.decode(errors="replace")[-3000:]

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


async def test_tls_register_refresh_unregister(kamailio_tls: Kamailio, pki: dict[str, str]) -> None:
    client = await Client.start("register", kamailio_tls.tls_uri, pki["ca"])
    try:
        binding = await client.next()
        assert binding["name"] == "pjsua2-python"
        assert "OpenSSL 1.0.2k" in binding["describe"]
        registered = await client.next()
        assert registered["step"] == "registered", registered
        assert registered["registered"]
        assert registered["status"] == 200
        assert registered["registers"] >= 3  # the REGISTER and two refreshes (pings)
        contacts = await kamailio_tls.contacts()
        assert len(contacts) == 1, contacts
        assert "transport=tls" in contacts[0].address.lower()
        client.go_on()
        assert (await client.next())["step"] == "closed"
        await client.finish()
    finally:
        client.kill()
    assert await kamailio_tls.binding_count() == 0  # un-REGISTERed over TLS


async def test_tls_wrong_password_is_a_fatal_403(pki: dict[str, str]) -> None:
    cert = (pki["cert"], pki["key"])
    async with Kamailio(password="secret", tls_cert=cert, wrong_password_403=True) as kam:
        client = await Client.start("refuse", kam.tls_uri, pki["ca"], "wrong")
        try:
            await client.next()
            refused = await client.next()
            await client.finish()
        finally:
            client.kill()
        assert refused["step"] == "refused", refused
        assert refused["status"] == 403
        assert refused["fatal"]
        assert "wrong" not in refused["message"].replace("wrong username", "")
        assert await kam.binding_count() == 0


async def test_tls_untrusted_certificate_is_fatal(
    kamailio_tls: Kamailio, pki: dict[str, str]
) -> None:
    client = await Client.start("refuse", kamailio_tls.tls_uri, pki["other_ca"], "secret")
    try:
        await client.next()
        refused = await client.next()
        await client.finish()
    finally:
        client.kill()
    assert refused["step"] == "refused", refused
    assert refused["fatal"]
    assert "certificate" in refused["message"]
    assert "tls_ca_file" in refused["message"]
    assert refused["seconds"] < 2
    assert await kamailio_tls.binding_count() == 0

"""Run the ``voicepool`` command as a real process, and the emulators it talks to in this one.

The CLI runs as ``python -m voicepool.cli`` in a child process (the SIP engine, signal handling
and ``asyncio.run`` belong to a process of their own), started with ``asyncio`` so the emulators
served by this test's event loop keep answering while it runs. The child is stopped by its handle
if it overruns.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from voicepool.testing.asr import DeepgramEmulator
from voicepool.testing.faultproxy import FaultProxy
from voicepool.testing.llm import LlmEmulator
from voicepool.testing.rest import RestEmulator
from voicepool.testing.sip_registrar import SipRegistrar
from voicepool.testing.tls import test_certificates
from voicepool.testing.tts import ElevenLabsEmulator
from voicepool.testing.udp_delay import UdpDelayRelay

KEY = "cli-test-key-0123"
SIP_PASSWORD = "cli-sip-secret-0123"
RTT = 0.020  # through the latency relays: large enough to see, small enough to be fast


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


async def run_cli(*args: str, timeout: float = 45.0, prelude: str | None = None) -> Result:
    """``voicepool ARGS`` in a child process; its exit code, stdout and stderr.

    ``prelude``: Python run in the child before the CLI (e.g. to hide an optional dependency).
    Warnings are shown (``PYTHONWARNINGS=default``) so that a test can assert there are none.
    """
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("VOICEPOOL_")}
    env["PYTHONWARNINGS"] = "default"
    if prelude is None:
        cmd = [sys.executable, "-m", "voicepool.cli", *args]
    else:
        code = (
            f"{prelude}\nimport sys\nfrom voicepool.cli import main\nsys.exit(main(sys.argv[1:]))"
        )
        cmd = [sys.executable, "-c", code, *args]
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()  # this child only, by its handle
        out, err = await proc.communicate()
        pytest.fail(f"voicepool {' '.join(args)} ran over {timeout}s:\n{err.decode()[-3000:]}")
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


def assert_clean(result: Result) -> None:
    """No traceback and no warning from the CLI or its emulator child."""
    for marker in ("Traceback", "Warning:", "Exception in callback", "was never awaited"):
        assert marker not in result.err, result.err[-3000:]


@dataclass
class Services:
    """The emulators, each behind a latency relay; URLs for the CLI."""

    ca_file: str
    asr_url: str
    tts_url: str
    llm_url: str
    crm_url: str
    sip_uri: str
    sip_tcp_uri: str
    asr: DeepgramEmulator
    tts: ElevenLabsEmulator
    crm: RestEmulator
    registrar: SipRegistrar


@pytest.fixture
async def services() -> AsyncIterator[Services]:
    certs = test_certificates()
    async with (
        DeepgramEmulator(tls=True, api_key=KEY) as asr,
        # Handshake-time auth: the real service would accept a socket without the key header
        # (the key may come in the first message), so `check` could not see an unset key.
        ElevenLabsEmulator(tls=True, api_key=KEY, key_in_first_message=False) as tts,
        LlmEmulator(api_key=KEY, ttft=0.0, tokens=2) as llm,
        RestEmulator(api_key=KEY, ssl_context=certs.server_context(["http/1.1"])) as crm,
        SipRegistrar(users={"demo": SIP_PASSWORD}) as registrar,
        FaultProxy("127.0.0.1", asr.port, latency=RTT / 2) as asr_p,
        FaultProxy("127.0.0.1", tts.port, latency=RTT / 2) as tts_p,
        FaultProxy("127.0.0.1", llm.port, latency=RTT / 2) as llm_p,
        FaultProxy("127.0.0.1", crm.port, latency=RTT / 2) as crm_p,
        FaultProxy("127.0.0.1", registrar.port, latency=RTT / 2) as sip_tcp,
        UdpDelayRelay((registrar.host, registrar.port), delay=RTT / 2) as sip_udp,
    ):
        yield Services(
            ca_file=str(certs.ca_path),
            asr_url=f"wss://127.0.0.1:{asr_p.port}",
            tts_url=f"wss://127.0.0.1:{tts_p.port}",
            llm_url=f"https://127.0.0.1:{llm_p.port}",
            crm_url=f"https://127.0.0.1:{crm_p.port}",
            sip_uri=f"sip:127.0.0.1:{sip_udp.port}",
            sip_tcp_uri=f"sip:127.0.0.1:{sip_tcp.port};transport=tcp",
            asr=asr,
            tts=tts,
            crm=crm,
            registrar=registrar,
        )

"""The SIP-over-TLS client of tests/sip/test_tls.py, run in a subprocess on pjsua2-python.

One process holds one pjsua2 binding, and the test process already holds pjsua2-pybind11
(which has no TLS), so the TLS cases run here: ``python -m tests.sip._tls_client SCENARIO ...``
with ``VOICEPOOL_SIP_BINDING=pjsua2-python``. It prints one JSON object a line for the parent to
check; after ``{"step": "registered"}`` it waits for a line on stdin (the parent has looked at
Kamailio's location table) before it un-REGISTERs.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from pydantic import SecretStr

from tests.sip.conftest import fast, sip_adapter
from voicepool import ConnectError, Pool
from voicepool.adapters.sip import SipEngine, configure_engine
from voicepool.adapters.sip._binding import load
from voicepool.testing import wait_until


def say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


async def register_refresh_unregister(uri: str, ca_file: str) -> None:
    adapter = sip_adapter(uri, transport="tls", tls_ca_file=ca_file)
    # Pings every 0.5 s: each is a refresh REGISTER over the same TLS connection.
    settings = fast(ping_interval=0.5, ping_timeout=0.4)
    async with Pool(adapter, settings, name="sip-tls") as pool:
        async with pool.acquire() as lease:
            reg = lease.conn
        first = reg.registers
        await wait_until(lambda: reg.registers >= first + 2, timeout=5)
        say(step="registered", registered=reg.registered, registers=reg.registers,
            status=reg.status, expires=reg.expires)  # fmt: skip
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    say(step="closed")


async def refused(uri: str, ca_file: str, password: str) -> None:
    adapter = sip_adapter(uri, transport="tls", tls_ca_file=ca_file, password=SecretStr(password))
    t0 = time.monotonic()
    try:
        conn = await adapter.connect()
    except ConnectError as exc:
        say(step="refused", status=exc.status, fatal=exc.fatal, message=str(exc),
            seconds=time.monotonic() - t0)  # fmt: skip
    else:
        await adapter.close(conn)
        say(step="accepted")


async def main(argv: list[str]) -> None:
    configure_engine(transaction_timeout=3.0, stop_timeout=2.0)
    say(step="binding", name=load().name, describe=load().describe())
    scenario, uri, ca_file, *rest = argv
    if scenario == "register":
        await register_refresh_unregister(uri, ca_file)
    else:
        await refused(uri, ca_file, *rest)
    assert await SipEngine.get().wait_stopped(5)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))

"""Run Node's own HTTP/2 server (``node:http2``, on nghttp2) on 127.0.0.1 for a test.

::

    async with NodeH2Server(refuse_times=3) as server:
        server.url  # https://127.0.0.1:<port> (trust test_certificates().ca_path)

The script (``node_h2_server.mjs`` next to this file) refuses streams with REFUSED_STREAM or
answers GOAWAY with a last-stream-id below streams it already received, the faults of RFC 9113
8.7 and 6.8 that a client must retry transparently; ``GET /stats`` reports how often each
``x-request-id`` was processed. The runner stops node by its PID (SIGTERM, then SIGKILL).
``scripts/install-system-deps.sh`` installs ``nodejs``.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

from tests.peers._process import stop_process
from voicepool.testing._service import LocalService
from voicepool.testing.tls import test_certificates

__all__ = ["NodeH2Server", "node_available"]

_SCRIPT = Path(__file__).with_name("node_h2_server.mjs")


def node_available() -> bool:
    """Whether a ``node`` binary is on PATH."""
    return shutil.which("node") is not None


class NodeH2Server(LocalService):
    """One ``node`` process serving HTTP/2 over TLS with the test certificates."""

    def __init__(
        self,
        *,
        max_streams: int = 100,
        refuse_times: int = 0,
        goaway_after: int = 0,
        delay_ms: int = 5,
        startup_timeout: float = 10.0,
    ) -> None:
        certs = test_certificates()
        self._options = {
            "cert": str(certs.cert_path),
            "key": str(certs.key_path),
            "maxStreams": max_streams,
            "refuseTimes": refuse_times,
            "goawayAfter": goaway_after,
            "delayMs": delay_ms,
        }
        self.startup_timeout = startup_timeout
        self.port = 0
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    async def start(self) -> NodeH2Server:
        """Start node and wait for its port. Raises RuntimeError (no node, early exit)."""
        node = shutil.which("node")
        if node is None:
            raise RuntimeError("node is not installed (scripts/install-system-deps.sh installs it)")
        self._proc = await asyncio.create_subprocess_exec(
            node,
            str(_SCRIPT),
            json.dumps(self._options),
            stdin=asyncio.subprocess.PIPE,  # node exits when it closes: no orphan after a crash
            stdout=asyncio.subprocess.PIPE,
            stderr=None,  # node's own errors go to the test's captured stderr
        )
        try:
            assert self._proc.stdout is not None
            async with asyncio.timeout(self.startup_timeout):
                line = await self._proc.stdout.readline()
            if not line:
                raise RuntimeError("node http2 server exited at start (its stderr is above)")
            self.port = int(json.loads(line)["port"])
        except BaseException:
            await asyncio.shield(self.aclose())
            raise
        return self

    async def aclose(self) -> None:
        """Stop node by its PID (SIGTERM, SIGKILL after 5 s) and reap it. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        await stop_process(proc, 5.0)
        if proc.stdin is not None:
            proc.stdin.close()

"""The examples run: custom_adapter.py and worker.py as real processes (real signals for the
worker), fastapi_app.py served by hypercorn on a real socket."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from tests.settings.conftest import EchoServer, echo_pool
from voicepool.settings import VoicePoolSettings

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
MakeServer = Callable[..., Awaitable[EchoServer]]
# Warnings are errors in the examples too; an unclosed transport shows as "Exception ignored".
# Except one: voicepool.testing.tls keeps its certificate directory until exit, and tempfile's
# implicit cleanup then warns (reported to the lead; not a socket or transport leak).
PYTHON = [sys.executable, "-W", "error", "-W", "ignore::ResourceWarning:tempfile"]
BAD_STDERR = (
    "Traceback",
    "Exception ignored",
    "ResourceWarning",
    "was destroyed but it is pending",
)


class Process:
    """A running example: stdout read line by line, stderr collected in a file."""

    def __init__(self, proc: asyncio.subprocess.Process, stderr: Path) -> None:
        self.proc = proc
        self.stderr_path = stderr
        self.lines: list[str] = []

    async def line_starting(self, prefix: str, timeout: float = 20.0) -> str:
        """The next stdout line starting with ``prefix`` (raises on EOF or timeout)."""
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.proc.stdout.readline()
                if not raw:
                    raise AssertionError(f"no line {prefix!r}; got {self.lines}: {self.stderr()}")
                line = raw.decode().rstrip("\n")
                self.lines.append(line)
                if line.startswith(prefix):
                    return line

    async def finish(self, timeout: float = 20.0) -> int:
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            rest = await self.proc.stdout.read()
            self.lines.extend(rest.decode().splitlines())
            return await self.proc.wait()

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)


@asynccontextmanager
async def run(tmp_path: Path, script: str, *args: str) -> AsyncIterator[Process]:
    err = tmp_path / f"{script}.stderr"
    with err.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            *PYTHON,
            str(EXAMPLES / script),
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            cwd=tmp_path,
        )
    process = Process(proc, err)
    try:
        yield process
    finally:
        if proc.returncode is None:
            proc.kill()  # only this process, by its PID
            await proc.wait()
        if proc.stdout is not None:
            await proc.stdout.read()


def assert_clean(process: Process) -> None:
    stderr = process.stderr()
    for bad in BAD_STDERR:
        assert bad not in stderr, stderr


# -- custom_adapter.py ----------------------------------------------------------------------------


async def test_custom_adapter_example(tmp_path: Path) -> None:
    async with run(tmp_path, "custom_adapter.py") as process:
        assert await process.finish() == 0, process.stderr()
    out = "\n".join(process.lines)
    assert "booted: 2 connections opened before the first request" in out
    assert "inventory: apples" in out
    assert "inventory: plums" in out
    assert "closed: 2 connections were opened in all" in out  # three requests, no new handshake
    assert "token=SecretStr('**********')" in out
    assert "demo-token" not in out
    health = json.loads(next(ln for ln in process.lines if ln.startswith("health: "))[8:])
    assert health["status"] == "ready"
    assert_clean(process)


# -- worker.py ------------------------------------------------------------------------------------


@pytest.mark.parametrize("services", ["auto", "line"])
async def test_worker_serves_a_fixed_number_of_calls(tmp_path: Path, services: str) -> None:
    """auto: the Deepgram, ElevenLabs and LLM emulators with the real adapters, where installed."""
    args = ("--calls", "6", "--turns", "2", "--hold-ms", "5", "--services", services)
    async with run(tmp_path, "worker.py", *args) as process:
        ready = await process.line_starting("ready: ")
        if services == "line":
            assert "asr=ready(line) llm=ready(line) tts=ready(line)" in ready
        else:  # voicepool's emulators where installed, line servers for the others
            assert re.search(r"asr=ready\((deepgram|line)\)", ready), ready
            assert re.search(r"llm=ready\((http2|line)\)", ready), ready
            assert re.search(r"tts=ready\((elevenlabs|line)\)", ready), ready
        assert await process.finish() == 0, process.stderr()
    stopped = process.lines[-1]
    assert stopped.startswith("stopped: graceful, calls=6/6 failed=0 turns=12"), stopped
    assert_clean(process)


async def test_worker_drains_on_sigterm(tmp_path: Path) -> None:
    args = ("--turns", "2", "--hold-ms", "60", "--concurrency", "3")
    async with run(tmp_path, "worker.py", *args) as process:
        await process.line_starting("ready: ")
        await process.line_starting("call 0: done")  # calls are flowing
        process.signal(signal.SIGTERM)
        draining = await process.line_starting("draining: ")
        in_flight = int(draining.split()[1])
        assert in_flight >= 1, process.lines
        t0 = time.monotonic()
        assert await process.finish() == 0, process.stderr()
        assert time.monotonic() - t0 < 10
    stopped = process.lines[-1]
    assert stopped.startswith("stopped: graceful"), stopped
    done, _, total = stopped.split("calls=")[1].split()[0].partition("/")
    assert done == total  # every call in flight finished
    assert " failed=0 " in stopped
    assert_clean(process)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
async def test_worker_second_signal_closes_hard(
    tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    # Turns hold their leases for 30 s: a graceful drain would take that long.
    args = ("--turns", "1", "--hold-ms", "30000", "--drain-timeout", "30")
    async with run(tmp_path, "worker.py", *args) as process:
        await process.line_starting("ready: ")
        await process.line_starting("call 0: started")
        process.signal(sig)
        draining = await process.line_starting("draining: ")
        assert int(draining.split()[1]) >= 1
        t0 = time.monotonic()
        process.signal(sig)
        assert await process.finish() == code, process.stderr()
        assert time.monotonic() - t0 < 5
    assert process.lines[-1].startswith("stopped: hard, calls=0/"), process.lines[-1]
    assert process.lines[-1].endswith(f"exit={code}")
    assert "closing hard" in process.stderr()
    assert_clean(process)


# -- fastapi_app.py -------------------------------------------------------------------------------


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"voicepool_example_{name}", EXAMPLES / name)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@asynccontextmanager
async def serve_app(app: Any) -> AsyncIterator[str]:
    """Serve ``app`` with hypercorn on a 127.0.0.1 socket of our own; yields its base URL."""
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn takes the descriptor over and closes it
    config.accesslog = None
    config.graceful_timeout = 2
    stop = asyncio.Event()
    server = asyncio.create_task(serve(app, config, shutdown_trigger=stop.wait))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            async with asyncio.timeout(20):
                while True:  # the lifespan (pool boot) runs before the socket is served
                    if server.done():
                        server.result()  # startup failed: raise its error
                    try:
                        await client.get("/livez")
                        break
                    except httpx.TransportError:
                        await asyncio.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop.set()
        await asyncio.wait_for(server, 20)


async def test_fastapi_app_health_and_probe(echo_server: MakeServer) -> None:
    asr = await echo_server()
    tts = await echo_server()
    tts.refuse = True  # an optional pool whose provider is down at boot
    settings = VoicePoolSettings(
        pools={
            "asr": echo_pool(asr.port, min_size=2, max_size=2, ping_interval=0.2, ping_timeout=0.2),
            "tts": echo_pool(tts.port, min_size=1, max_size=1, required=False),
        }
    )
    example = load_example("fastapi_app.py")
    async with (
        serve_app(example.create_app(settings)) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as client,
    ):
        assert asr.open == 2  # warmed before the first request was served
        health = await client.get("/healthz")
        assert health.status_code == 200
        body = health.json()
        assert body["status"] == "degraded"
        assert body["pools"]["asr"]["status"] == "ready"
        assert body["pools"]["tts"]["status"] in {"degraded", "unavailable"}

        probe = await client.post("/pools/asr/probe")
        assert probe.status_code == 200
        assert probe.json()["pool"] == "asr"
        assert asr.accepted == 2  # served on a warm connection: no new handshake
        assert (await client.post("/pools/nope/probe")).status_code == 404

        # The provider rotates its key and drops us: the required pool cannot reconnect.
        asr.token = "rotated-key-0000"
        await asr.drop_connections()
        for _ in range(200):  # the pool notices at its next ping (every 0.2 s)
            health = await client.get("/healthz")
            if health.status_code == 503:
                break
            await asyncio.sleep(0.05)
        body = health.json()
        assert body["status"] == "unavailable"
        assert body["pools"]["asr"]["status"] == "unavailable"
        assert "key rejected" in body["pools"]["asr"]["reason"]
        assert "SUPERSECRET" not in health.text
        assert (await client.post("/pools/asr/probe")).status_code == 503
    await asr.all_closed()


async def test_fastapi_app_refuses_to_start_without_a_required_pool(
    echo_server: MakeServer,
) -> None:
    down = await echo_server()
    down.refuse = True
    example = load_example("fastapi_app.py")
    app = example.create_app(VoicePoolSettings(pools={"asr": echo_pool(down.port)}))
    from hypercorn.utils import LifespanFailureError

    with pytest.raises(LifespanFailureError, match="required pool 'asr' could not start"):
        async with serve_app(app):
            pytest.fail("the app should not have started")

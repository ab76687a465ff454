"""Run a real nginx on 127.0.0.1 for a test: a generated config, a private prefix, stopped by PID.

::

    port = free_port()
    block = f'server {{ listen 127.0.0.1:{port}; location / {{ return 200 "ok"; }} }}'
    async with Nginx(block) as nginx:
        ...  # nginx accepts on 127.0.0.1:port

The runner writes a whole ``nginx.conf`` around ``http_block`` (daemon off, pid, error log and
temp paths inside the work directory, ``events {}``, ``http { ... }``), starts
``nginx -p DIR -e DIR/error.log -c nginx.conf`` in its own process group, waits until every
``listen`` port in the block accepts, and on exit stops the master by its PID (SIGTERM, then
SIGKILL to its process group if it lingers). ``listen`` directives must name a loopback address:
a test server is never reachable from outside the machine.

The Debian package (``scripts/install-system-deps.sh``) provides the binary; tests skip when
:func:`nginx_available` is false.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import tempfile
from pathlib import Path

from voicepool.testing._service import LocalService

__all__ = [
    "Nginx",
    "NginxError",
    "free_port",
    "listen_addresses",
    "nginx_available",
    "nginx_binary",
]

_FALLBACK_BINARY = "/usr/sbin/nginx"
_LISTEN = re.compile(r"(?:^|[;{}\s])listen\s+([^\s;]+)")
_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "[::1]"}


class NginxError(RuntimeError):
    """nginx failed to start or to stop; the message carries the tail of its error log."""


def nginx_binary() -> str | None:
    """Path of the nginx binary (``PATH`` first, then /usr/sbin/nginx), or None."""
    found = shutil.which("nginx")
    if found:
        return found
    if os.access(_FALLBACK_BINARY, os.X_OK):
        return _FALLBACK_BINARY
    return None


def nginx_available() -> bool:
    """Whether an nginx binary is installed here."""
    return nginx_binary() is not None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (bind to port 0, read it, close).

    Another process may take it before you bind it: use it at once, for servers such as nginx
    whose config must name a port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def listen_addresses(http_block: str) -> list[tuple[str, int]]:
    """The (host, port) pairs named by ``listen`` directives in ``http_block``.

    Raises ValueError for a listen address that is not loopback (or not a TCP port).
    """
    addrs: list[tuple[str, int]] = []
    for match in _LISTEN.finditer(http_block):
        target = match.group(1)
        host, sep, port = target.rpartition(":")
        if not sep or host not in _LOOPBACK_HOSTS or not port.isdigit():
            raise ValueError(
                f"nginx test servers must listen on 127.0.0.1:<port> (or [::1]), got {target!r}"
            )
        addr = ("::1" if host == "[::1]" else "127.0.0.1", int(port))
        if addr not in addrs:
            addrs.append(addr)
    return addrs


class Nginx(LocalService):
    """One nginx master (plus ``worker_processes`` workers) with a generated configuration.

    ``workdir``: the prefix directory (kept); by default a temporary one, removed on exit.
    ``main_block``: extra main-context directives (e.g. ``worker_shutdown_timeout 1s;``).
    Attributes after start: ``pid``, ``ports``, ``workdir``, ``config_path``, ``error_log``.
    """

    def __init__(
        self,
        http_block: str,
        *,
        workdir: str | os.PathLike[str] | None = None,
        main_block: str = "",
        worker_processes: int = 1,
        worker_connections: int = 4096,
        startup_timeout: float = 10.0,
        stop_timeout: float = 5.0,
    ) -> None:
        self.http_block = http_block
        self._addrs = listen_addresses(http_block)
        self._given_workdir = Path(workdir) if workdir is not None else None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.workdir = self._given_workdir or Path()
        self.main_block = main_block
        self.worker_processes = worker_processes
        self.worker_connections = worker_connections
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def ports(self) -> list[int]:
        """The ports of the ``listen`` directives, in order."""
        return [port for _, port in self._addrs]

    @property
    def config_path(self) -> Path:
        return self.workdir / "nginx.conf"

    @property
    def error_log(self) -> Path:
        return self.workdir / "error.log"

    @property
    def pid(self) -> int | None:
        """PID of the nginx master, while it runs."""
        return self._proc.pid if self._proc is not None else None

    def render(self) -> str:
        """The full nginx.conf for the current ``http_block``."""
        d = self.workdir
        tmp = d / "tmp"
        # As root, nginx would switch its workers to "nobody", who cannot read the temp prefix.
        user = "user root;\n" if os.geteuid() == 0 else ""
        return (
            f"# generated by tests.peers.nginx\n"
            f"daemon off;\nmaster_process on;\nworker_processes {self.worker_processes};\n"
            f"{user}pid {d / 'nginx.pid'};\nerror_log {self.error_log} info;\n"
            f"{self.main_block}\n"
            f"events {{ worker_connections {self.worker_connections}; }}\n"
            f"http {{\n"
            f"    access_log {d / 'access.log'};\n"
            f"    client_body_temp_path {tmp / 'client_body'};\n"
            f"    proxy_temp_path {tmp / 'proxy'};\n"
            f"    fastcgi_temp_path {tmp / 'fastcgi'};\n"
            f"    uwsgi_temp_path {tmp / 'uwsgi'};\n"
            f"    scgi_temp_path {tmp / 'scgi'};\n"
            f"{self.http_block}\n"
            f"}}\n"
        )

    def error_log_tail(self, lines: int = 20) -> str:
        """The last lines of the error log (and of nginx's own stderr), for failure messages."""
        out: list[str] = []
        for path in (self.workdir / "stderr.log", self.error_log):
            with contextlib.suppress(OSError):
                out.extend(path.read_text(errors="replace").splitlines()[-lines:])
        return "\n".join(out[-lines:])

    async def start(self) -> Nginx:
        """Write the config, start nginx, wait until every listen port accepts; return self.

        Raises NginxError (no binary, bad config, exited early, ports not accepting in
        ``startup_timeout``); nginx is stopped before the error escapes. Cancelling stops it too.
        """
        if self._proc is not None:
            raise NginxError("nginx already started")
        binary = nginx_binary()
        if binary is None:
            raise NginxError("nginx is not installed (scripts/install-system-deps.sh installs it)")
        stderr_fd = self._prepare()
        try:
            self._proc = await asyncio.create_subprocess_exec(
                binary,
                "-p",
                f"{self.workdir}/",
                "-e",
                str(self.error_log),
                "-c",
                str(self.config_path),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=stderr_fd,
                start_new_session=True,  # its own process group: workers can be killed with it
            )
        finally:
            os.close(stderr_fd)
        try:
            await self._wait_ready()
        except BaseException:
            await asyncio.shield(self.aclose())
            raise
        return self

    def _prepare(self) -> int:
        """Make the work directory and write the config; return an fd for nginx's stderr."""
        if self._given_workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="voicepool-nginx-")
            self.workdir = Path(self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "tmp").mkdir(exist_ok=True)
        self.config_path.write_text(self.render())
        return os.open(self.workdir / "stderr.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    async def _wait_ready(self) -> None:
        proc = self._proc
        assert proc is not None
        try:
            async with asyncio.timeout(self.startup_timeout):
                for host, port in self._addrs:
                    while True:
                        if proc.returncode is not None:
                            raise NginxError(
                                f"nginx exited with status {proc.returncode} at start:\n"
                                f"{self.error_log_tail()}"
                            )
                        if await _accepts(host, port):
                            break
                        # No event tells us that nginx has bound its sockets: poll, bounded.
                        await asyncio.sleep(0.02)
        except TimeoutError:
            raise NginxError(
                f"nginx did not accept on ports {self.ports} within {self.startup_timeout:g}s:\n"
                f"{self.error_log_tail()}"
            ) from None

    async def reload(self, http_block: str | None = None) -> None:
        """Rewrite the config (optionally with a new ``http_block``) and send SIGHUP.

        nginx starts new workers and gracefully retires the old ones (HTTP/2 clients get GOAWAY).
        Returns once the signal is sent; the new ports are not waited for.
        """
        if self._proc is None or self._proc.returncode is not None:
            raise NginxError("nginx is not running")
        if http_block is not None:
            self._addrs = listen_addresses(http_block)
            self.http_block = http_block
        self.config_path.write_text(self.render())
        self._proc.send_signal(signal.SIGHUP)

    async def aclose(self) -> None:
        """Stop nginx (SIGTERM to the master's PID; SIGKILL to its process group after
        ``stop_timeout``), reap it, and remove a temporary work directory. Idempotent.
        """
        proc, self._proc = self._proc, None
        try:
            if proc is not None:
                await asyncio.shield(self._stop(proc))
        finally:
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None

    async def _stop(self, proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()  # SIGTERM: nginx's fast shutdown
            try:
                async with asyncio.timeout(self.stop_timeout):
                    await proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)  # the group we created: master + workers
                await proc.wait()
        else:
            await proc.wait()

    def __repr__(self) -> str:
        return f"<Nginx pid={self.pid} ports={self.ports} workdir={str(self.workdir)!r}>"


async def _accepts(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection(host, port)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True

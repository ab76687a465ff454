"""Run a real Kamailio registrar on 127.0.0.1 for a test: generated config, free port, PID stop.

::

    async with Kamailio(password="secret") as kam:      # UDP and TCP on kam.port
        registrar = kam.uri                              # "sip:127.0.0.1:PORT"
        await kam.binding_count("alice")                 # from `kamcmd ul.dump`
        await kam.stop(); await kam.start()              # an outage, same port and config

The configuration is generated in a work directory (a temporary one by default) from the approach
of ``shared/reference/sip/kamailio.cfg``: a loopback registrar with digest auth against one static
password, usrloc in memory, a ``ctl`` socket in the work directory, and the variants of that file
as options (``wrong_password_403``, ``min_expires``, ``min_expires_423``). Kamailio runs in the
foreground (``-DD -E``) in its own process group; :meth:`Kamailio.stop` sends SIGTERM to its PID
and SIGKILL to the group if it lingers. Every REGISTER it receives is logged with its
arrival time, so :meth:`registers` can count them.

The Debian package (``scripts/install-system-deps.sh``) provides the binary; tests skip when
:func:`kamailio_available` is false.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import re
import signal
import socket
import tempfile
from pathlib import Path
from typing import NamedTuple

from tests.peers._process import find_binary, free_sip_port, poll_ready, port_bound, stop_process
from voicepool._sip import build_request, new_branch, parse_message
from voicepool.testing._service import LocalService

__all__ = [
    "Kamailio",
    "KamailioContact",
    "KamailioError",
    "free_sip_port",
    "kamailio_available",
    "kamailio_binary",
    "kamailio_has_tls",
    "options_ok",
    "port_bound",
]

_MODULE_DIRS = (
    "/usr/lib/x86_64-linux-gnu/kamailio/modules",
    "/usr/lib/aarch64-linux-gnu/kamailio/modules",
    "/usr/lib64/kamailio/modules",
    "/usr/lib/kamailio/modules",
    "/usr/local/lib64/kamailio/modules",
    "/usr/local/lib/kamailio/modules",
)
_RX = re.compile(r"RX REGISTER t=(\d+\.\d+) .* callid=(\S+) cseq=(\d+)\b")


class KamailioContact(NamedTuple):
    """One binding of Kamailio's location table."""

    aor: str  # the user part, e.g. "alice"
    address: str  # the Contact URI
    expires: int | None  # seconds left (-1: expired or permanent; None: not shown)


class KamailioError(RuntimeError):
    """Kamailio failed to start or stop; the message carries the tail of its log."""


def _which(name: str) -> str | None:
    return find_binary(name, "/usr/sbin", "/usr/local/sbin")


def kamailio_binary() -> str | None:
    """Path of the kamailio binary (``PATH``, then /usr/sbin), or None."""
    return _which("kamailio")


def kamailio_available() -> bool:
    """Whether kamailio (and kamcmd, to read its location table) are installed."""
    return kamailio_binary() is not None and _which("kamcmd") is not None


def module_dir() -> str | None:
    """The folder holding Kamailio's modules (registrar.so), or None."""
    for folder in _MODULE_DIRS:
        if os.path.exists(os.path.join(folder, "registrar.so")):
            return folder + "/"
    found = glob.glob("/usr/**/kamailio/modules/registrar.so", recursive=True)
    return os.path.dirname(found[0]) + "/" if found else None


def kamailio_has_tls() -> bool:
    """Whether Kamailio's TLS module is installed (Debian ``kamailio-tls-modules``)."""
    folder = module_dir()
    return folder is not None and os.path.exists(os.path.join(folder, "tls.so"))


class Kamailio(LocalService):
    """One Kamailio registrar with a generated configuration (see the module docstring).

    ``password`` / ``realm``: the digest credentials every user must present. ``min_expires``,
    ``default_expires``, ``max_expires``: registrar parameters; ``min_expires_423`` answers 423
    below the minimum instead of raising it. ``wrong_password_403`` answers a wrong password
    with 403 instead of a new 401 challenge. ``tls_cert`` (certificate chain PEM, key PEM)
    adds a TLS listener (module ``tls.so``, Debian ``kamailio-tls-modules``) on ``tls_port``.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        password: str = "secret",
        realm: str = "voicepool",
        min_expires: int = 10,
        min_expires_423: bool = False,
        default_expires: int = 60,
        max_expires: int = 3600,
        wrong_password_403: bool = False,
        tls_cert: tuple[str, str] | None = None,
        workdir: str | os.PathLike[str] | None = None,
        startup_timeout: float = 10.0,
        stop_timeout: float = 5.0,
    ) -> None:
        if host not in ("127.0.0.1", "localhost"):
            raise ValueError(f"test registrars listen on 127.0.0.1, got {host!r}")
        for name, value in (("password", password), ("realm", realm)):
            if '"' in value or "\\" in value or "\n" in value:
                raise ValueError(f"{name} must not contain quotes, backslashes or newlines")
        self.host = "127.0.0.1"
        self.port = port if port is not None else free_sip_port(self.host)
        self.password = password
        self.realm = realm
        self.min_expires = min_expires
        self.min_expires_423 = min_expires_423
        self.default_expires = default_expires
        self.max_expires = max_expires
        self.wrong_password_403 = wrong_password_403
        self.tls_cert = tls_cert
        self.tls_port = free_sip_port(self.host) if tls_cert is not None else None
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self._given_workdir = Path(workdir) if workdir is not None else None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.workdir = self._given_workdir or Path()
        self._proc: asyncio.subprocess.Process | None = None
        self._log_offset = 0

    @property
    def uri(self) -> str:
        """The registrar URI, ``sip:127.0.0.1:PORT`` (UDP and TCP)."""
        return f"sip:{self.host}:{self.port}"

    @property
    def tls_uri(self) -> str:
        """The registrar URI over TLS, ``sip:127.0.0.1:TLS_PORT;transport=tls``."""
        if self.tls_port is None:
            raise KamailioError("this Kamailio has no TLS listener (pass tls_cert)")
        return f"sip:{self.host}:{self.tls_port};transport=tls"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def ctl_socket(self) -> Path:
        return self.workdir / "kamailio.ctl"

    @property
    def log_path(self) -> Path:
        return self.workdir / "kamailio.log"

    def render(self) -> str:
        """The kamailio.cfg for the current options."""
        mpath = module_dir()
        if mpath is None:
            raise KamailioError("Kamailio modules (registrar.so) not found")
        defines = ""
        if self.wrong_password_403:
            defines += "#!define WRONGPW_403\n"
        mode_423 = 'modparam("registrar", "min_expires_mode", 1)\n' if self.min_expires_423 else ""
        listen = f"{self.host}:{self.port}"
        tls_listen = tls_module = ""
        if self.tls_cert is not None:
            if not kamailio_has_tls():
                raise KamailioError(
                    "Kamailio's TLS module (tls.so) is not installed: Debian kamailio-tls-modules"
                    " (scripts/install-system-deps.sh)"
                )
            tls_address = f"{self.host}:{self.tls_port}"
            tls_listen = f'enable_tls=yes\nlisten=tls:{tls_address}\nalias="{tls_address}"\n'
            tls_module = (
                f'loadmodule "tls.so"\nmodparam("tls", "config", "{self.workdir / "tls.cfg"}")\n'
            )
        return f"""#!KAMAILIO
# generated by tests.peers.kamailio
{defines}
debug=2
log_stderror=yes
memdbg=5
memlog=5
children=2
tcp_children=2
auto_aliases=no
listen=udp:{listen}
listen=tcp:{listen}
alias="{listen}"
{tls_listen}tcp_connection_lifetime=3605
dns=no
rev_dns=no
use_dns_cache=no

mpath="{mpath}"
{tls_module}loadmodule "kex.so"
loadmodule "corex.so"
loadmodule "tm.so"
loadmodule "sl.so"
loadmodule "pv.so"
loadmodule "maxfwd.so"
loadmodule "textops.so"
loadmodule "siputils.so"
loadmodule "xlog.so"
loadmodule "usrloc.so"
loadmodule "registrar.so"
loadmodule "auth.so"
loadmodule "ctl.so"

modparam("ctl", "binrpc", "unix:{self.ctl_socket}")
modparam("usrloc", "db_mode", 0)
modparam("usrloc", "timer_interval", 10)
modparam("registrar", "min_expires", {self.min_expires})
{mode_423}modparam("registrar", "default_expires", {self.default_expires})
modparam("registrar", "max_expires", {self.max_expires})
modparam("auth", "nonce_expire", 300)

request_route {{
    if (!mf_process_maxfwd_header("10")) {{
        sl_send_reply("483", "Too Many Hops");
        exit;
    }}
    xlog("L_INFO", "RX $rm t=$TV(Sn) from $si:$sp/$pr user=$fU callid=$ci cseq=$cs\\n");
    if (is_method("REGISTER")) {{
        # checks=1: the auth username must match the To user of the REGISTER
        pv_auth_check("{self.realm}", "{self.password}", "0", "1");
        $var(rc) = $rc;
        if ($var(rc) < 0) {{
#!ifdef WRONGPW_403
            if ($var(rc) == -2) {{
                sl_send_reply("403", "Forbidden");
                exit;
            }}
#!endif
            www_challenge("{self.realm}", "0");
            exit;
        }}
        consume_credentials();
        if (!save("location")) {{
            sl_reply_error();
        }}
        exit;
    }}
    if (is_method("OPTIONS")) {{
        sl_send_reply("200", "OK");
        exit;
    }}
    sl_send_reply("404", "Not Found");
    exit;
}}
"""

    def _tls_config(self) -> str:
        """The tls module's profiles: our certificate as server, no client certificates."""
        assert self.tls_cert is not None
        chain, key = self.tls_cert
        profile = "method = TLSv1.2+\nverify_certificate = no\nrequire_certificate = no\n"
        return (
            f"[server:default]\n{profile}certificate = {chain}\nprivate_key = {key}\n\n"
            f"[client:default]\n{profile}"
        )

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> Kamailio:
        """Write the config, start Kamailio, wait until it answers OPTIONS on UDP and its ctl
        socket exists; return self. Also restarts a stopped instance on the same port.

        Raises KamailioError (no binary, bad config, exited early, not ready in time); Kamailio is
        stopped before the error escapes, also when cancelled.
        """
        if self._proc is not None:
            raise KamailioError("kamailio already running")
        binary = kamailio_binary()
        if binary is None:
            raise KamailioError("kamailio is not installed (scripts/install-system-deps.sh)")
        if self._given_workdir is None and self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="voicepool-kamailio-")
            self.workdir = Path(self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "kamailio.cfg"
        cfg.write_text(self.render())
        if self.tls_cert is not None:
            (self.workdir / "tls.cfg").write_text(self._tls_config())
        with contextlib.suppress(FileNotFoundError):
            self.ctl_socket.unlink()
        log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                binary,
                "-f", str(cfg),
                "-DD", "-E",
                "-Y", str(self.workdir),
                "-P", str(self.workdir / "kamailio.pid"),
                "-m", "64", "-M", "8",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
                start_new_session=True,  # its own group: children die with it
            )  # fmt: skip
        finally:
            os.close(log_fd)
        try:
            await poll_ready(
                self._proc,
                self._ready,
                timeout=self.startup_timeout,
                exited=lambda status: KamailioError(
                    f"kamailio exited with status {status} at start:\n{self.log_tail()}"
                ),
                late=lambda: KamailioError(
                    f"kamailio not ready on {self.uri} within {self.startup_timeout:g}s:\n"
                    f"{self.log_tail()}"
                ),
            )
        except BaseException:
            await asyncio.shield(self.stop())
            raise
        return self

    async def _ready(self) -> bool:
        # Its workers forked and listening: the ctl socket exists and OPTIONS gets a 200.
        return self.ctl_socket.exists() and await options_ok(self.host, self.port)

    async def stop(self) -> None:
        """Stop Kamailio by its PID (SIGTERM; SIGKILL to its group after ``stop_timeout``).

        Keeps the work directory and port, so :meth:`start` brings the same registrar back
        (with an empty location table). Idempotent.
        """
        proc, self._proc = self._proc, None
        if proc is None:
            return
        await stop_process(proc, self.stop_timeout, group=True)
        # The forked workers share the group: make sure none outlives the main process.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    async def aclose(self) -> None:
        """Stop Kamailio and remove a temporary work directory. Idempotent."""
        try:
            await asyncio.shield(self.stop())
        finally:
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None

    async def restart(self) -> None:
        """Stop, then start again on the same port (the location table starts empty)."""
        await self.stop()
        await self.start()

    # -- inspection ------------------------------------------------------------------------------

    async def contacts(self) -> list[KamailioContact]:
        """The location table, from ``kamcmd ul.dump``.

        Raises KamailioError when kamcmd fails or times out (5 s).
        """
        kamcmd = _which("kamcmd")
        if kamcmd is None:
            raise KamailioError("kamcmd is not installed")
        proc = await asyncio.create_subprocess_exec(
            kamcmd, "-s", f"unix:{self.ctl_socket}", "ul.dump",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            async with asyncio.timeout(5):
                out, err = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise KamailioError("kamcmd ul.dump timed out") from None
        if proc.returncode != 0:
            raise KamailioError(f"kamcmd ul.dump failed: {err.decode(errors='replace')}")
        table: list[KamailioContact] = []
        aor = ""
        for line in out.decode(errors="replace").splitlines():
            key, _, value = line.strip().partition(": ")
            if key == "AoR":
                aor = value
            elif key == "Address" and aor:
                table.append(KamailioContact(aor, value, None))
            elif key == "Expires" and table and table[-1].expires is None:
                expires = int(value) if value.lstrip("-").isdigit() else -1
                table[-1] = KamailioContact(table[-1].aor, table[-1].address, expires)
        return table

    async def binding_count(self, aor: str | None = None) -> int:
        """Contacts registered now (not yet expired), for one AOR user or all."""
        return sum(
            1
            for c in await self.contacts()
            if (aor is None or c.aor == aor) and (c.expires is None or c.expires > 0)
        )

    def registers(self) -> list[tuple[float, str, int]]:
        """``(wall-clock time, Call-ID, CSeq)`` of every REGISTER received, over all starts of
        this instance (from its log, which Kamailio writes as it goes).
        """
        found: list[tuple[float, str, int]] = []
        with contextlib.suppress(OSError):
            for line in self.log_path.read_text(errors="replace").splitlines():
                match = _RX.search(line)
                if match is not None:
                    found.append((float(match.group(1)), match.group(2), int(match.group(3))))
        return found

    def __repr__(self) -> str:
        return f"<Kamailio pid={self.pid} {self.uri} workdir={str(self.workdir)!r}>"


async def options_ok(host: str, port: int, timeout: float = 0.2) -> bool:
    """Send one OPTIONS over UDP; True if a 200 comes back within ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    answered: asyncio.Future[bytes] = loop.create_future()

    class _Probe(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: object) -> None:
            if not answered.done():
                answered.set_result(data)

        def error_received(self, exc: Exception) -> None:
            if not answered.done():
                answered.set_exception(exc)

    transport, _ = await loop.create_datagram_endpoint(
        _Probe, local_addr=(host, 0), family=socket.AF_INET
    )
    try:
        local = transport.get_extra_info("sockname")
        tag = os.urandom(4).hex()
        request = build_request(
            "OPTIONS",
            f"sip:{host}:{port}",
            via=("udp", local[0], local[1]),
            branch=new_branch(),
            from_uri=f"sip:probe@{host}",
            from_tag=tag,
            to_uri=f"sip:{host}:{port}",
            call_id=f"probe-{tag}",
            cseq=1,
        )
        transport.sendto(request, (host, port))
        async with asyncio.timeout(timeout):
            data = await answered
        return parse_message(data).status == 200
    except (TimeoutError, OSError, ValueError):
        return False
    finally:
        transport.close()

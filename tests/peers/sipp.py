"""Run SIPp as a scripted SIP registrar on 127.0.0.1 for a test: free port, PID stop, message log.

::

    async with Sipp("reg503", transport="udp") as sipp:   # every REGISTER gets 503
        registrar = sipp.uri
        ...
    sipp.registers()        # (time, Call-ID, CSeq) of each REGISTER received, from the trace

Built-in scenarios (:data:`SCENARIOS`, from ``shared/reference/sip/``): ``reg200`` (always 200),
``regauth`` (401 challenge, then 200 for password "secret", else 403), ``reg503`` (always 503
with ``Retry-After: 7``), ``regdrop`` (never answers); SIPp's own ``uas`` (answers calls) and
``uac`` (places ``calls`` calls to ``remote``, then exits: see :meth:`Sipp.wait`). Any other
string is taken as scenario XML.

SIPp runs in the foreground in its own process group with ``-trace_msg`` into the work directory;
readiness is a bind probe on its port (nothing is sent to it, so the scenario sees no stray
message); :meth:`Sipp.aclose` stops it by PID (SIGTERM, then SIGKILL to the group).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import tempfile
from datetime import datetime
from pathlib import Path

from tests.peers._process import find_binary, free_sip_port, port_bound, stop_process
from voicepool.testing._service import LocalService

__all__ = ["SCENARIOS", "Sipp", "SippError", "sipp_available", "sipp_binary"]

_REPLY_HEAD = """      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]SIPpTag[call_number]
      [last_Call-ID:]
      [last_CSeq:]"""

SCENARIOS: dict[str, str] = {
    "reg200": f"""<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<!-- Answers every REGISTER (refreshes and Expires: 0 included) with 200; loops per Call-ID. -->
<scenario name="registrar-200">
  <label id="top"/>
  <recv request="REGISTER"/>
  <send next="top">
    <![CDATA[
      SIP/2.0 200 OK
{_REPLY_HEAD}
      [last_Contact:]
      [last_Expires:]
      Content-Length: 0

    ]]>
  </send>
</scenario>
""",
    "regauth": f"""<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<!-- 401 challenge, then verifyauth (password "secret"): 200 or 403. -->
<scenario name="registrar-auth">
  <label id="top"/>
  <recv request="REGISTER"/>
  <send>
    <![CDATA[
      SIP/2.0 401 Unauthorized
{_REPLY_HEAD}
      WWW-Authenticate: Digest realm="sipp", nonce="[pid][call_number]abc", algorithm=MD5
      Content-Length: 0

    ]]>
  </send>
  <recv request="REGISTER">
    <action>
      <ereg regexp="username=\\"([^\\"]+)\\"" search_in="hdr" header="Authorization:"
            assign_to="junk,authuser"/>
      <verifyauth assign_to="authok" username="[$authuser]" password="secret"/>
    </action>
  </recv>
  <nop test="authok" next="ok"/>
  <send next="top">
    <![CDATA[
      SIP/2.0 403 Forbidden
{_REPLY_HEAD}
      Content-Length: 0

    ]]>
  </send>
  <label id="ok"/>
  <send next="top">
    <![CDATA[
      SIP/2.0 200 OK
{_REPLY_HEAD}
      [last_Contact:]
      [last_Expires:]
      Content-Length: 0

    ]]>
  </send>
  <Reference variables="junk"/>
</scenario>
""",
    "reg503": f"""<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<!-- Every REGISTER gets 503 Service Unavailable (Retry-After: 7). -->
<scenario name="registrar-503">
  <label id="top"/>
  <recv request="REGISTER"/>
  <send next="top">
    <![CDATA[
      SIP/2.0 503 Service Unavailable
{_REPLY_HEAD}
      Retry-After: 7
      Content-Length: 0

    ]]>
  </send>
</scenario>
""",
    "regdrop": """<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<!-- Swallows every REGISTER, never answers. -->
<scenario name="registrar-blackhole">
  <label id="top"/>
  <recv request="REGISTER" next="top"/>
</scenario>
""",
}

_STAMP = re.compile(r"^-{20,} (\d{4}-\d\d-\d\d)\s+(\d\d:\d\d:\d\d\.\d+)")


class SippError(RuntimeError):
    """SIPp failed to start; the message carries its error output."""


def sipp_binary() -> str | None:
    """Path of the sipp binary (Debian package ``sip-tester``), or None."""
    return find_binary("sipp", "/usr/bin")


def sipp_available() -> bool:
    return sipp_binary() is not None


class Sipp(LocalService):
    """One SIPp server process running ``scenario`` on ``transport`` ("udp" or "tcp")."""

    def __init__(
        self,
        scenario: str,
        *,
        transport: str = "udp",
        port: int | None = None,
        workdir: str | os.PathLike[str] | None = None,
        remote: str | None = None,
        calls: int | None = None,
        extra_args: tuple[str, ...] = (),
        startup_timeout: float = 5.0,
        stop_timeout: float = 3.0,
    ) -> None:
        if transport not in ("udp", "tcp"):
            raise ValueError(f"transport must be 'udp' or 'tcp', got {transport!r}")
        if remote is not None and not remote.startswith("127."):
            raise ValueError(f"SIPp only talks to 127.0.0.0/8 here, got {remote!r}")
        self.builtin = scenario if scenario in ("uac", "uas") else None
        self.scenario = SCENARIOS.get(scenario, scenario)
        if self.builtin is None and "<scenario" not in self.scenario:
            names = ", ".join([*SCENARIOS, "uac", "uas"])
            raise ValueError(f"unknown scenario {scenario!r}; built in: {names}")
        self.remote = remote
        self.calls = calls
        self.transport = transport
        self.host = "127.0.0.1"
        self.port = port if port is not None else free_sip_port(self.host)
        self.extra_args = extra_args
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self._given_workdir = Path(workdir) if workdir is not None else None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.workdir = self._given_workdir or Path()
        self._proc: asyncio.subprocess.Process | None = None
        self._log_cache = ""

    @property
    def uri(self) -> str:
        return f"sip:{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def message_log(self) -> Path:
        return self.workdir / "messages.log"

    def _error_output(self) -> str:
        out = []
        for name in ("stderr.log", "errors.log"):
            with contextlib.suppress(OSError):
                out.append((self.workdir / name).read_text(errors="replace")[-2000:])
        return "\n".join(out)

    async def start(self) -> Sipp:
        """Start SIPp and wait until its port is bound; return self. Raises SippError (SIPp is
        stopped before the error escapes, also when cancelled).
        """
        if self._proc is not None:
            raise SippError("sipp already running")
        binary = sipp_binary()
        if binary is None:
            raise SippError("sipp is not installed (scripts/install-system-deps.sh)")
        if self._given_workdir is None and self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="voicepool-sipp-")
            self.workdir = Path(self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.builtin is not None:
            scenario_args = ["-sn", self.builtin]
        else:
            scenario_file = self.workdir / "scenario.xml"
            scenario_file.write_text(self.scenario)
            scenario_args = ["-sf", str(scenario_file)]
        if self.calls is not None:
            scenario_args += ["-m", str(self.calls)]
        # SIPp binds a media port (default 6000) even when it sends no RTP: use a free one.
        scenario_args += ["-mp", str(free_sip_port(self.host))]
        if self.remote is not None:
            scenario_args.append(self.remote)
        err_fd = os.open(self.workdir / "stderr.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                binary, *scenario_args,
                "-i", self.host, "-p", str(self.port),
                "-t", "u1" if self.transport == "udp" else "t1",
                "-nostdin",
                "-trace_msg", "-message_file", str(self.message_log),
                "-trace_err", "-error_file", str(self.workdir / "errors.log"),
                *self.extra_args,
                cwd=self.workdir,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=err_fd,
                start_new_session=True,
            )  # fmt: skip
        finally:
            os.close(err_fd)
        kind = socket.SOCK_DGRAM if self.transport == "udp" else socket.SOCK_STREAM
        try:
            async with asyncio.timeout(self.startup_timeout):
                while not port_bound(self.host, self.port, kind):
                    if self._proc.returncode is not None and self.builtin == "uac":
                        break  # a fast uac may be done before we look
                    if self._proc.returncode is not None:
                        raise SippError(
                            f"sipp exited with status {self._proc.returncode}:\n"
                            f"{self._error_output()}"
                        )
                    # SIPp signals nothing when it listens: poll the port, bounded.
                    await asyncio.sleep(0.01)
        except BaseException as exc:
            await asyncio.shield(self.aclose())
            if isinstance(exc, TimeoutError):
                raise SippError(f"sipp did not bind {self.uri} in time") from None
            raise
        return self

    async def wait(self, timeout: float = 10.0) -> int:
        """Wait for SIPp to exit by itself (a ``uac`` with ``calls``); return its status
        (0: every call succeeded). Raises TimeoutError.
        """
        proc = self._proc
        if proc is None:
            raise SippError("sipp is not running")
        async with asyncio.timeout(timeout):
            return await proc.wait()

    async def aclose(self) -> None:
        """Stop SIPp by its PID (SIGTERM, SIGKILL to its group after ``stop_timeout``) and remove a
        temporary work directory once :meth:`registers` was read. Idempotent.
        """
        proc, self._proc = self._proc, None
        if proc is not None:
            await stop_process(proc, self.stop_timeout, group=True)
        self._log_cache = self._read_log()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def _read_log(self) -> str:
        with contextlib.suppress(OSError):
            return self.message_log.read_text(errors="replace")
        return self._log_cache

    def registers(self) -> list[tuple[float, str, int]]:
        """``(wall-clock time, Call-ID, CSeq)`` of each REGISTER SIPp received (retransmissions
        included), from its message trace; also readable after :meth:`aclose`.
        """
        text = self._read_log() if self._proc is not None else self._log_cache
        found: list[tuple[float, str, int]] = []
        stamp = 0.0
        received = False
        call_id = ""
        for line in text.splitlines():
            match = _STAMP.match(line)
            if match is not None:
                when = datetime.fromisoformat(f"{match.group(1)} {match.group(2)}")
                stamp, received, call_id = when.timestamp(), False, ""
            elif "message received" in line:
                received = True
            elif received and line.lower().startswith("call-id:"):
                call_id = line.split(":", 1)[1].strip()
            elif received and line.lower().startswith("cseq:") and "REGISTER" in line:
                found.append((stamp, call_id, int(line.split(":", 1)[1].split()[0])))
        return found

    def __repr__(self) -> str:
        return f"<Sipp pid={self.pid} {self.uri} {self.transport}>"

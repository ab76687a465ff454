"""`FaultProxy`: an asyncio TCP proxy that injects network faults, controlled from the test.

The kernel here has no netem, so round-trip times, slow links and broken peers are emulated in user
space, one proxied connection (a *link*) per accepted client::

    async with FaultProxy("127.0.0.1", server_port, latency=0.010) as proxy:   # 20 ms RTT
        connect_to(proxy.host, proxy.port)
        proxy.black_hole()          # stop forwarding both ways, close nothing (half-open peers)
        await proxy.reset_all()     # RST every current connection

Faults and how they are modelled:

* Latency is one-way, per direction, and *pipelined*: a chunk read at time t is written at
  ``t + latency`` (order preserved), so a stream of chunks is delayed, not serialized. A new
  connection also pays the TCP handshake: nothing crosses before one round trip (up + down) has
  passed since the accept, as a client cannot send before the SYN-ACK arrives.
* Bandwidth is a per-connection, per-direction cap: a chunk occupies the link for
  ``len / bytes_per_s`` seconds (serialization), then travels for the latency.
* A black hole stops reading on both legs and holds queued data, so nothing is lost or closed:
  when it is lifted, data flows again (a healed partition, TCP retransmits). While it is on, pings
  go unanswered and peers see a silent, half-open connection. New connections are held too unless
  ``new_connections=False``.
* ``reset_all`` / ``refuse`` send TCP RSTs (``SO_LINGER`` 0). ``kill_idle`` closes connections with
  no byte in either direction for N seconds, with FINs like a load balancer (or RSTs on request).
* A RST from one peer is propagated to the other after the direction's latency; FIN half-closes
  are propagated in order after the data.

Everything runs on the event loop that started the proxy; the control methods are synchronous
(except :meth:`reset_all` and :meth:`aclose`, which wait for the sockets to be gone) and must be
called from that loop. It listens on 127.0.0.1 and connects only to the target it was given.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Final, cast

from voicepool.testing._service import LocalService

__all__ = ["FaultProxy", "ProxyConnection"]

_EOF: Final = b"<eof>"  # queue markers: identity-compared, never confused with data
_RST: Final = b"<rst>"
_SLACK = 0.0005  # deliver chunks due within this many seconds (timers may fire a bit early)
_HIGH_WATER = 1 << 20  # bytes queued in one direction before the sender is paused
_LOW_WATER = 1 << 18
_UPSTREAM_CONNECT_TIMEOUT = 10.0


def _set_rst_on_close(transport: asyncio.BaseTransport | None) -> None:
    """Make the next close of ``transport`` send a RST (SO_LINGER on, timeout 0)."""
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class _Side(asyncio.Protocol):
    """One TCP leg of a link: the accepted client socket or the socket to the target."""

    def __init__(self, link: _Link, upstream: bool) -> None:
        self.link = link
        self.upstream = upstream
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.write_paused = False  # the kernel buffer toward this peer is full

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports do not subclass asyncio's.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.link.proxy._transports.add(self.transport)
        if not self.upstream:
            self.link.proxy._on_accept(self)

    def data_received(self, data: bytes) -> None:
        self.link.on_data(self, data)

    def eof_received(self) -> bool:
        self.link.on_eof(self)
        return True  # keep the transport open for writing: a half-close, not a close

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.transport is not None:
            self.link.proxy._transports.discard(self.transport)
            self.link.proxy._gone.set()
        self.link.on_lost(self, exc)

    def pause_writing(self) -> None:
        self.write_paused = True
        self.link.update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.link.update_reading()


@dataclass(slots=True)
class _Pipe:
    """One direction of a link: a time-ordered queue of chunks (and EOF/RST markers)."""

    down: bool
    hold_until: float  # nothing is delivered before (the emulated TCP handshake)
    queue: deque[tuple[float, bytes]] = field(default_factory=deque)
    size: int = 0  # bytes queued
    timer: asyncio.TimerHandle | None = None
    link_free: float = 0.0  # when the bandwidth-capped link finishes its last chunk
    last_due: float = 0.0
    eof_done: bool = False


class _Link:
    """One proxied connection: client leg, upstream leg, a pipe each way."""

    def __init__(self, proxy: FaultProxy, ident: int) -> None:
        self.proxy = proxy
        self.id = ident
        self.loop = proxy._loop
        now = self.loop.time()
        rtt = proxy._up_latency + proxy._down_latency
        self.client = _Side(self, upstream=False)
        self.server: _Side | None = None
        self.up = _Pipe(False, now + rtt)  # client -> target
        self.down = _Pipe(True, now + rtt)  # target -> client
        self.black_holed = False
        self.finished = False
        self.last_activity = now
        self.connect_task: asyncio.Task[None] | None = None

    # -- events from the legs ---------------------------------------------------------------------

    def on_data(self, side: _Side, data: bytes) -> None:
        if self.finished:
            return
        self.last_activity = self.loop.time()
        if side is self.client:
            self.proxy.bytes_up += len(data)
            self._push(self.up, data)
        else:
            self.proxy.bytes_down += len(data)
            self._push(self.down, data)

    def on_eof(self, side: _Side) -> None:
        if not self.finished:
            self._push(self.up if side is self.client else self.down, _EOF)

    def on_lost(self, side: _Side, exc: Exception | None) -> None:
        if self.finished:
            return
        if exc is not None:
            # The peer reset (or the socket failed): the other peer sees a RST, one latency later.
            self._push(self.up if side is self.client else self.down, _RST)
        else:
            self.finish(rst=False)

    # -- delivery --------------------------------------------------------------------------------

    def _latency(self, pipe: _Pipe) -> float:
        return self.proxy._down_latency if pipe.down else self.proxy._up_latency

    def _push(self, pipe: _Pipe, item: bytes) -> None:
        now = self.loop.time()
        start = max(now, pipe.hold_until, pipe.link_free)
        bw = self.proxy._down_bw if pipe.down else self.proxy._up_bw
        if bw and item is not _EOF and item is not _RST:
            start += len(item) / bw
            pipe.link_free = start
        # max() with the last due time keeps order when the latency is lowered at run time.
        due = max(start + self._latency(pipe), pipe.last_due)
        pipe.last_due = due
        pipe.queue.append((due, item))
        if item is not _EOF and item is not _RST:
            pipe.size += len(item)
        if pipe.timer is None:
            if due <= now + _SLACK:
                self._flush(pipe)
            else:
                self._schedule(pipe)
        self.update_reading()

    def _dst(self, pipe: _Pipe) -> _Side | None:
        return self.client if pipe.down else self.server

    def _schedule(self, pipe: _Pipe) -> None:
        if pipe.timer is not None or not pipe.queue or self.black_holed or self.finished:
            return
        dst = self._dst(pipe)
        if dst is None or dst.transport is None:
            return  # upstream not connected yet: flushed when it is
        pipe.timer = self.loop.call_at(pipe.queue[0][0], self._flush, pipe)

    def _flush(self, pipe: _Pipe) -> None:
        pipe.timer = None
        if self.black_holed or self.finished:
            return
        dst = self._dst(pipe)
        if dst is None or dst.transport is None:
            return
        now = self.loop.time() + _SLACK
        queue = pipe.queue
        while queue and queue[0][0] <= now:
            _, item = queue.popleft()
            if item is _RST:
                self.finish(rst=True)
                return
            if item is _EOF:
                pipe.eof_done = True
                if dst.transport.can_write_eof() and not dst.transport.is_closing():
                    try:
                        dst.transport.write_eof()
                    except OSError:  # the peer reset while our FIN was queued: it is gone
                        self.finish(rst=True)
                        return
                if self.up.eof_done and self.down.eof_done:
                    self.finish(rst=False)
                    return
                continue
            pipe.size -= len(item)
            if not dst.transport.is_closing():
                dst.transport.write(item)
        self._schedule(pipe)
        self.update_reading()

    def update_reading(self) -> None:
        """Pause a leg's reads while a black hole holds, or its data piles up downstream."""
        if self.finished:
            return
        server = self.server
        client_go = not self.black_holed and self.up.size < _HIGH_WATER
        if server is not None:
            client_go = client_go and not server.write_paused
        else:
            client_go = client_go and self.up.size < _LOW_WATER
        self._set_reading(self.client, client_go)
        if server is not None:
            self._set_reading(
                server,
                not self.black_holed
                and self.down.size < _HIGH_WATER
                and not self.client.write_paused,
            )

    @staticmethod
    def _set_reading(side: _Side, on: bool) -> None:
        tr = side.transport
        if tr is None or tr.is_closing():
            return
        if on and not tr.is_reading():
            tr.resume_reading()
        elif not on and tr.is_reading():
            tr.pause_reading()

    # -- control ----------------------------------------------------------------------------------

    def set_black_hole(self, on: bool) -> None:
        if self.finished or self.black_holed == on:
            return
        self.black_holed = on
        for pipe in (self.up, self.down):
            if on and pipe.timer is not None:
                pipe.timer.cancel()
                pipe.timer = None
        if not on:
            if self.server is None and self.connect_task is None:
                self.proxy._connect_upstream(self)
            for pipe in (self.up, self.down):
                self._schedule(pipe)
        self.update_reading()

    def finish(self, *, rst: bool) -> None:
        """Close both legs now (FIN, or RST with ``rst``) and forget the link. Idempotent."""
        if self.finished:
            return
        self.finished = True
        for pipe in (self.up, self.down):
            if pipe.timer is not None:
                pipe.timer.cancel()
                pipe.timer = None
            pipe.queue.clear()
            pipe.size = 0
        if self.connect_task is not None and not self.connect_task.done():
            self.connect_task.cancel()
        for side in (self.client, self.server):
            if side is None or side.transport is None or side.closed:
                continue
            if rst:
                _set_rst_on_close(side.transport)
                side.transport.abort()
            else:
                side.transport.close()
        self.proxy._forget(self)


class ProxyConnection:
    """A handle on one proxied connection, for faults aimed at it alone."""

    __slots__ = ("_link",)

    def __init__(self, link: _Link) -> None:
        self._link = link

    @property
    def id(self) -> int:
        """Sequence number of the connection in this proxy (1 = first accepted)."""
        return self._link.id

    @property
    def open(self) -> bool:
        return not self._link.finished

    @property
    def idle_for(self) -> float:
        """Seconds since the last byte crossed in either direction (or since the accept)."""
        return self._link.loop.time() - self._link.last_activity

    def black_hole(self, on: bool = True) -> None:
        """Stop (or resume) forwarding on this connection only, without closing it."""
        self._link.set_black_hole(on)

    def reset(self) -> None:
        """Send a RST to both peers now."""
        self._link.finish(rst=True)

    def close(self) -> None:
        """Close both legs politely (FIN) now."""
        self._link.finish(rst=False)

    def __repr__(self) -> str:
        state = "open" if self.open else "closed"
        return f"<ProxyConnection #{self.id} {state} black_holed={self._link.black_holed}>"


class FaultProxy(LocalService):
    """A TCP proxy from ``listen_host:listen_port`` (port 0: any free port) to a target.

    ``latency`` sets both one-way delays; ``up_latency`` (client to target) and ``down_latency``
    override it per direction. ``bandwidth`` caps bytes per second, per connection and direction.
    Use as ``async with FaultProxy(...) as proxy`` or ``await start()`` / ``await aclose()``.
    Counters: ``accepted``, ``active``, ``refused``, ``resets``, ``idle_kills``, ``bytes_up``,
    ``bytes_down``.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        latency: float = 0.0,
        up_latency: float | None = None,
        down_latency: float | None = None,
        bandwidth: float | None = None,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self._listen = (listen_host, listen_port)
        self._up_latency = 0.0
        self._down_latency = 0.0
        self.set_latency(
            latency if up_latency is None else up_latency,
            latency if down_latency is None else down_latency,
        )
        self._up_bw: float | None = None
        self._down_bw: float | None = None
        self.set_bandwidth(bandwidth)
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set by start()
        self._server: asyncio.Server | None = None
        self._links: dict[int, _Link] = {}
        self._transports: set[asyncio.Transport] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._gone = asyncio.Event()
        self._changed = asyncio.Event()
        self._refusing = False
        self._black_hole_new = False
        self._idle_after: float | None = None
        self._idle_rst = False
        self._idle_timer: asyncio.TimerHandle | None = None
        self._port = 0
        self.accepted = 0
        self.refused = 0
        self.resets = 0
        self.idle_kills = 0
        self.bytes_up = 0
        self.bytes_down = 0

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> FaultProxy:
        """Listen. Raises OSError if the address is taken; returns self."""
        if self._server is not None:
            raise RuntimeError("FaultProxy already started")
        self._loop = asyncio.get_running_loop()
        self._gone = asyncio.Event()
        self._changed = asyncio.Event()
        self._server = await self._loop.create_server(
            lambda: _Link(self, 0).client, self._listen[0], self._listen[1]
        )
        self._port = self._server.sockets[0].getsockname()[1]
        return self

    async def aclose(self) -> None:
        """Stop listening, drop every connection (abort) and wait until its sockets are closed.

        Idempotent. Cancellation-safe in effect: the aborts happen before the first await.
        """
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        for link in list(self._links.values()):
            link.finish(rst=False)
        for transport in list(self._transports):
            transport.abort()  # graceful closes stuck behind a full buffer must not linger
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5.0)
        for transport in list(self._transports):
            transport.abort()  # a connect that completed while it was being cancelled
        await server.wait_closed()
        await self._wait_transports_gone(5.0)

    @property
    def host(self) -> str:
        return self._listen[0]

    @property
    def port(self) -> int:
        """The listening port (valid after start)."""
        return self._port

    @property
    def active(self) -> int:
        """Connections currently proxied (accepted and not yet closed)."""
        return len(self._links)

    @property
    def connections(self) -> list[ProxyConnection]:
        """Handles on the current connections, oldest first."""
        return [ProxyConnection(link) for link in self._links.values()]

    async def wait_active(self, count: int = 0, timeout: float = 5.0) -> None:
        """Wait until exactly ``count`` connections are proxied. Raises TimeoutError."""
        async with asyncio.timeout(timeout):
            while len(self._links) != count:
                self._changed.clear()
                await self._changed.wait()

    # -- runtime controls -------------------------------------------------------------------------

    def set_latency(self, up: float, down: float | None = None) -> None:
        """One-way delay in seconds, client->target (``up``) and back (``down``; default: ``up``).

        Applies to chunks read from now on; queued chunks keep their delivery times.
        """
        down = up if down is None else down
        if up < 0 or down < 0:
            raise ValueError("latency must be >= 0")
        self._up_latency, self._down_latency = float(up), float(down)

    def set_bandwidth(self, bytes_per_s: float | None, down: float | None = None) -> None:
        """Cap each connection at ``bytes_per_s`` per direction (``down`` overrides the way back).

        None removes the cap.
        """
        for value in (bytes_per_s, down):
            if value is not None and value <= 0:
                raise ValueError("bandwidth must be > 0 or None")
        self._up_bw = bytes_per_s
        self._down_bw = bytes_per_s if down is None else down

    def black_hole(self, on: bool = True, *, new_connections: bool = True) -> None:
        """Stop (``on``) or resume forwarding on every current connection, closing nothing.

        With ``new_connections`` (default), connections accepted while it is on are held too:
        accepted by the kernel, never connected upstream. Turning it off resumes all of them.
        """
        self._black_hole_new = on and new_connections
        for link in list(self._links.values()):
            link.set_black_hole(on)

    async def reset_all(self) -> int:
        """RST every current connection (both legs); return how many. Waits until closed."""
        links = list(self._links.values())
        for link in links:
            link.finish(rst=True)
        self.resets += len(links)
        await self._wait_transports_gone(5.0, only_links=links)
        return len(links)

    def kill_idle(self, after: float | None, *, rst: bool = False) -> None:
        """Close connections idle (no byte either way) for ``after`` seconds; None turns it off.

        Like a load balancer's idle timeout: FIN to both peers, or RST with ``rst``.
        """
        if after is not None and after <= 0:
            raise ValueError("after must be > 0 or None")
        self._idle_after = after
        self._idle_rst = rst
        self._arm_idle_timer()

    def refuse(self, on: bool = True) -> None:
        """While on, each new connection is reset at once (the client sees ECONNRESET)."""
        self._refusing = on

    # -- internals -------------------------------------------------------------------------------

    def _on_accept(self, client: _Side) -> None:
        link = client.link
        transport = client.transport
        assert transport is not None
        if self._refusing or self._server is None:
            self.refused += 1
            link.finished = True
            _set_rst_on_close(transport)
            transport.abort()
            return
        self.accepted += 1
        link.id = self.accepted
        self._links[link.id] = link
        self._changed.set()
        if self._black_hole_new:
            link.black_holed = True
            link.update_reading()
        else:
            link.update_reading()  # no upstream yet: reads pause once a backlog builds up
            self._connect_upstream(link)
        self._arm_idle_timer()

    def _connect_upstream(self, link: _Link) -> None:
        task = self._loop.create_task(self._run_connect(link))
        link.connect_task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_connect(self, link: _Link) -> None:
        server = _Side(link, upstream=True)
        try:
            async with asyncio.timeout(_UPSTREAM_CONNECT_TIMEOUT):
                await self._loop.create_connection(
                    lambda: server, self.target_host, self.target_port
                )
        except (OSError, TimeoutError):
            link.finish(rst=True)  # the client sees what it would see from a dead target
            return
        except asyncio.CancelledError:
            if server.transport is not None:
                server.transport.abort()
            raise
        if link.finished:
            if server.transport is not None:
                server.transport.abort()
            return
        link.server = server
        for pipe in (link.up, link.down):
            link._schedule(pipe)
        link.update_reading()

    def _forget(self, link: _Link) -> None:
        if self._links.pop(link.id, None) is not None:
            self._changed.set()

    def _arm_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        after = self._idle_after
        if after is None or not self._links or self._server is None:
            return
        oldest = min(link.last_activity for link in self._links.values())
        self._idle_timer = self._loop.call_at(oldest + after, self._kill_idle_now)

    def _kill_idle_now(self) -> None:
        self._idle_timer = None
        after = self._idle_after
        if after is None:
            return
        deadline = self._loop.time() - after + _SLACK
        for link in list(self._links.values()):
            if link.last_activity <= deadline:
                self.idle_kills += 1
                link.finish(rst=self._idle_rst)
        self._arm_idle_timer()

    async def _wait_transports_gone(
        self, timeout: float, only_links: list[_Link] | None = None
    ) -> None:
        def pending() -> bool:
            if only_links is None:
                return bool(self._transports)
            return any(
                side is not None and side.transport is not None and not side.closed
                for link in only_links
                for side in (link.client, link.server)
            )

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while pending():
                    self._gone.clear()
                    await self._gone.wait()

    def __repr__(self) -> str:
        return (
            f"<FaultProxy {self.host}:{self.port} -> {self.target_host}:{self.target_port}"
            f" active={self.active} latency={self._up_latency:g}/{self._down_latency:g}s>"
        )

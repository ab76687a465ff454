"""A UDP relay that adds latency, for SIP over UDP at a realistic round-trip time.

::

    async with UdpDelayRelay(("127.0.0.1", registrar_port), delay=0.010) as relay:
        registrar = f"sip:127.0.0.1:{relay.port}"   # 20 ms RTT: 10 ms each way

Every client address gets its own upstream socket, so answers find their way back. Datagrams are
delayed by ``delay`` seconds in each direction (order kept), optionally dropped (``drop``:
a black hole that still counts them). Listens on 127.0.0.1 and relays to a loopback upstream
only. The TCP counterpart is :class:`voicepool.testing.FaultProxy`.
"""

from __future__ import annotations

import asyncio
import socket
from typing import cast

from voicepool.testing._service import LocalService

__all__ = ["UdpDelayRelay"]

_Addr = tuple[str, int]


class UdpDelayRelay(LocalService):
    """Relay datagrams between clients and ``upstream`` with ``delay`` seconds each way."""

    def __init__(
        self,
        upstream: _Addr,
        *,
        delay: float = 0.010,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if not upstream[0].startswith("127.") or not host.startswith("127."):
            raise ValueError("the relay only listens on and forwards to 127.0.0.0/8")
        if delay < 0:
            raise ValueError(f"delay must be >= 0, got {delay}")
        self.upstream = upstream
        self.delay = delay
        self.drop = False
        self.host = host
        self.port = port
        self.relayed = 0  # datagrams forwarded, both directions
        self.dropped = 0
        self._front: asyncio.DatagramTransport | None = None
        self._backs: dict[_Addr, asyncio.DatagramTransport] = {}
        self._pending: dict[_Addr, list[bytes]] = {}  # upstream socket still opening
        self._timers: set[asyncio.TimerHandle] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> _Addr:
        return (self.host, self.port)

    async def start(self) -> UdpDelayRelay:
        """Bind the client-facing socket; returns self. Raises OSError if the port is taken."""
        loop = asyncio.get_running_loop()
        self._front, _ = await loop.create_datagram_endpoint(
            lambda: _Front(self), local_addr=(self.host, self.port), family=socket.AF_INET
        )
        self.port = self._front.get_extra_info("sockname")[1]
        return self

    async def aclose(self) -> None:
        """Close every socket and drop datagrams still in flight. Idempotent."""
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for back in self._backs.values():
            back.close()
        self._backs.clear()
        self._pending.clear()
        if self._front is not None:
            self._front.close()
            self._front = None
        await asyncio.sleep(0)  # let the transports' close callbacks run

    # -- forwarding ------------------------------------------------------------------------------

    def _later(self, transport: asyncio.DatagramTransport, data: bytes, addr: _Addr) -> None:
        if self.drop:
            self.dropped += 1
            return
        loop = asyncio.get_running_loop()

        def send() -> None:
            self._timers.discard(handle)
            if not transport.is_closing():
                self.relayed += 1
                transport.sendto(data, addr)

        handle = loop.call_later(self.delay, send)
        self._timers.add(handle)

    def _from_client(self, data: bytes, client: _Addr) -> None:
        back = self._backs.get(client)
        if back is not None:
            self._later(back, data, self.upstream)
            return
        pending = self._pending.get(client)
        if pending is None:
            pending = self._pending[client] = []
            task = asyncio.get_running_loop().create_task(self._open_back(client))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        pending.append(data)

    async def _open_back(self, client: _Addr) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Back(self, client), local_addr=(self.host, 0), family=socket.AF_INET
        )
        self._backs[client] = transport
        for data in self._pending.pop(client, ()):
            self._later(transport, data, self.upstream)

    def _from_upstream(self, data: bytes, client: _Addr) -> None:
        if self._front is not None:
            self._later(self._front, data, client)


class _Front(asyncio.DatagramProtocol):
    def __init__(self, relay: UdpDelayRelay) -> None:
        self.relay = relay

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        self.relay._from_client(data, (str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP unreachable from a client that left


class _Back(asyncio.DatagramProtocol):
    def __init__(self, relay: UdpDelayRelay, client: _Addr) -> None:
        self.relay = relay
        self.client = client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        self.relay._from_upstream(data, self.client)

    def error_received(self, exc: Exception) -> None:
        pass  # the upstream is down (ICMP port unreachable): the client will time out

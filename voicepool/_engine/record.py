"""The pool's record of one open connection, and its lifecycle states."""

from __future__ import annotations

import enum
from typing import Generic, TypeVar

C = TypeVar("C")


class ConnState(enum.Enum):
    """Where a connection is. Opening connections have no record yet: they are a counted slot."""

    IDLE = "idle"  # in the idle deque (EXCLUSIVE / SINGLE_USE), lendable
    IN_USE = "in_use"  # held by a lease (or, MULTIPLEXED, the shared connection itself)
    PINGING = "pinging"  # taken out of idle by the health task for a ping
    CLOSED = "closed"  # retired; its close runs in the background


class ConnRecord(Generic[C]):
    """Bookkeeping of one connection. Mutated only on the event loop thread, synchronously."""

    __slots__ = (
        "cap",
        "conn",
        "created",
        "expires",
        "id",
        "last_used",
        "next_ping",
        "ping_period",
        "pinging",
        "proven",
        "seq",
        "started",
        "state",
        "streams",
        "suspect",
    )

    def __init__(
        self,
        conn: C,
        ident: int,
        now: float,
        expires: float,
        ping_period: float,
        cap: int,
        started: float | None = None,
    ) -> None:
        self.conn = conn
        self.id = ident
        self.state = ConnState.IDLE
        self.created = now
        self.started = now if started is None else started  # when its connect attempt began
        self.expires = expires  # jittered max_lifetime deadline (inf when off)
        self.last_used = now
        self.ping_period = ping_period  # jittered per connection so pings do not bunch up
        self.next_ping = now + ping_period
        self.pinging = False  # MULTIPLEXED: a ping is in flight (the connection stays lendable)
        self.streams = 0  # MULTIPLEXED: streams in use
        self.cap = cap  # MULTIPLEXED: streams this connection takes now (0 = draining)
        self.seq = 0  # MULTIPLEXED: last stream id handed out on this connection
        # Proven by min_healthy of life, a lease's clean end, or a routine ping answered a whole
        # ping period after it opened (the ping right after the connect proves nothing): until
        # then its loss counts as a failed connect (a server that accepts and hangs up).
        self.proven = False
        self.suspect = False  # MULTIPLEXED: a lease ended badly; no new streams until a ping

    def __repr__(self) -> str:
        return f"<ConnRecord #{self.id} {self.state.value} streams={self.streams}/{self.cap}>"

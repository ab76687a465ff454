"""The waiters of one pool: a FIFO with O(1) abandonment, and their deadlines in a heap.

Pure data structure (no clock, no loop): :class:`~voicepool._engine.core.PoolCore` decides who
is served or failed; this keeps them in order. A waiter that leaves is only marked (its
``state``), so giving up is O(1); finished entries are dropped as they reach the front, and the
whole queue is compacted once they outnumber the live ones (memory stays bounded).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Iterator
from itertools import pairwise
from typing import Any

from voicepool._engine.record import ConnRecord

__all__ = ["WaitQueue", "Waiter"]

WAITING, GRANTED, DONE = 0, 1, 2


class Waiter:
    """One queued acquire. The driver owns ``future``; the core owns the rest.

    ``state``: 0 waiting, 1 granted (``rec``/``stream_id`` set), 2 finished (failed, gave up, or
    its grant was taken). ``exhausted`` is set when it queued at ``max_size``.
    """

    __slots__ = ("deadline", "exhausted", "future", "rec", "state", "stream_id", "timeout")

    def __init__(self, deadline: float, timeout: float, future: Any = None) -> None:
        self.deadline = deadline
        self.timeout = timeout
        self.future = future
        self.rec: ConnRecord[Any] | None = None
        self.stream_id: int | None = None
        self.state = WAITING
        self.exhausted = False

    def __repr__(self) -> str:
        return f"<Waiter state={self.state} deadline={self.deadline:.3f}>"


class WaitQueue:
    """Live waiters in FIFO order; ``count`` is how many are waiting (read on the fast path)."""

    __slots__ = ("_deadlines", "_fifo", "_last", "_seq", "_sorted", "count")

    def __init__(self) -> None:
        self._fifo: deque[Waiter] = deque()
        # While every waiter was pushed with a deadline no earlier than the one before (one
        # acquire_timeout: the common case), the FIFO is in deadline order and no heap is kept
        # (``_sorted``); the first out-of-order push builds the heap, used until the queue empties.
        self._sorted = True
        self._last = -math.inf  # the deadline of the last push
        self._deadlines: list[tuple[float, int, Waiter]] = []
        self._seq = 0  # ties in the heap: equal deadlines keep their FIFO order
        self.count = 0

    def push(self, waiter: Waiter) -> None:
        self._fifo.append(waiter)
        self.count += 1
        deadline = waiter.deadline
        if self._sorted:
            if deadline >= self._last:
                self._last = deadline
                return
            self._sorted = False
            heap: list[tuple[float, int, Waiter]] = []
            self._deadlines = heap
            for w in self._fifo:
                if w.state == WAITING:
                    self._seq += 1
                    heap.append((w.deadline, self._seq, w))
            heapq.heapify(heap)
            return
        self._seq += 1
        heapq.heappush(self._deadlines, (deadline, self._seq, waiter))

    def pop(self) -> Waiter | None:
        """Take the first live waiter out (the caller changes its state), or None."""
        fifo = self._fifo
        while fifo:
            w = fifo.popleft()
            if w.state == WAITING:
                self.count -= 1
                if not self.count:
                    self._reset()
                return w
        return None

    def _reset(self) -> None:
        """Empty: back to the heap-free mode (the next pushes are in order again)."""
        if not self._sorted or self._deadlines:
            self._deadlines = []
        self._sorted = True
        self._last = -math.inf

    def leave(self, waiter: Waiter, state: int = DONE) -> None:
        """A waiting ``waiter`` leaves the queue now (gave up, failed): O(1), amortised."""
        waiter.state = state
        self.count -= 1
        self._compact()

    def __iter__(self) -> Iterator[Waiter]:
        """The live waiters, FIFO (a snapshot: the caller may make them leave)."""
        return iter([w for w in self._fifo if w.state == WAITING])

    def clear(self) -> list[Waiter]:
        """Remove every live waiter and return them, FIFO (the caller fails them)."""
        live = [w for w in self._fifo if w.state == WAITING]
        self._fifo.clear()
        self.count = 0
        self._reset()
        return live

    def expired(self, now: float) -> list[Waiter]:
        """Remove and return the live waiters whose deadline is ``now`` or earlier."""
        out: list[Waiter] = []
        if self._sorted:
            fifo = self._fifo
            while fifo and (fifo[0].state != WAITING or fifo[0].deadline <= now):
                w = fifo.popleft()
                if w.state == WAITING:
                    w.state = DONE
                    self.count -= 1
                    out.append(w)
            if out:
                self._compact()
            return out
        heap = self._deadlines
        while heap and (heap[0][2].state != WAITING or heap[0][0] <= now):
            w = heapq.heappop(heap)[2]
            if w.state == WAITING:
                w.state = DONE
                self.count -= 1
                out.append(w)
        if out:
            self._compact()
        return out

    def earliest(self) -> float | None:
        """The deadline of the live waiter that expires first (dead heap tops are dropped)."""
        if self._sorted:
            self._compact()
            return self._fifo[0].deadline if self._fifo else None
        heap = self._deadlines
        while heap and heap[0][2].state != WAITING:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def _compact(self) -> None:
        fifo = self._fifo
        while fifo and fifo[0].state != WAITING:
            fifo.popleft()
        if not self.count:
            self._reset()
        if len(fifo) > 2 * self.count + 64:
            self._fifo = deque(w for w in fifo if w.state == WAITING)
        if len(self._deadlines) > 2 * self.count + 64:
            self._deadlines = [e for e in self._deadlines if e[2].state == WAITING]
            heapq.heapify(self._deadlines)

    def check(self) -> None:
        assert self.count == sum(1 for w in self._fifo if w.state == WAITING), "waiter count"
        assert self.count >= 0
        live = [w for w in self._fifo if w.state == WAITING]
        if self._sorted:
            assert all(a.deadline <= b.deadline for a, b in pairwise(live)), "not sorted"
        else:
            assert {id(w) for w in live} <= {id(e[2]) for e in self._deadlines}, "heap lost one"

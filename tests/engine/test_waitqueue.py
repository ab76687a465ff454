"""WaitQueue against a plain list model: FIFO order, deadlines, abandonment, in both of its modes
(heap-free while deadlines come in order, a heap after the first one out of order)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from voicepool._engine.waitqueue import DONE, WAITING, Waiter, WaitQueue

ops = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.sampled_from([0.5, 1.0, 1.0, 5.0])),
        st.tuples(st.just("pop"), st.just(0.0)),
        st.tuples(st.just("leave"), st.integers(0, 20)),
        st.tuples(st.just("expire"), st.sampled_from([0.0, 0.5, 1.0, 3.0])),
        st.tuples(st.just("tick"), st.sampled_from([0.1, 1.0])),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_waitqueue_matches_a_list(steps: list[tuple[str, float]]) -> None:
    q = WaitQueue()
    model: list[Waiter] = []  # live waiters, FIFO
    now = 0.0
    for op, arg in steps:
        if op == "push":
            w = Waiter(now + arg, arg)
            q.push(w)
            model.append(w)
        elif op == "pop":
            got = q.pop()
            assert got is (model.pop(0) if model else None)
            if got is not None:
                got.state = DONE
        elif op == "leave" and model:
            w = model.pop(int(arg) % len(model))
            q.leave(w)
        elif op == "expire":
            gone = q.expired(now + arg)
            want = [w for w in model if w.deadline <= now + arg]
            assert {id(w) for w in gone} == {id(w) for w in want}
            assert all(w.state == DONE for w in gone)
            model = [w for w in model if w.state == WAITING]
        elif op == "tick":
            now += arg
        q.check()
        assert q.count == len(model)
        assert q.earliest() == (min(w.deadline for w in model) if model else None)
        assert list(q) == model

"""The sans-I/O HTTP/2 client protocol, driven with bytes from an ``h2`` server state machine in
memory (no sockets, no event loop): GOAWAY drain and refusal, the slot map, flow-control acks."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import DataFrame

from voicepool.adapters.http2.protocol import (
    ConnectionClosed,
    H2Protocol,
    Origin,
    StreamRefused,
    StreamState,
)

ORIGIN = Origin("https", "llm.test", 443)
HEADERS = [
    (b":method", b"GET"),
    (b":scheme", b"https"),
    (b":authority", b"llm.test"),
    (b":path", b"/"),
]


def _pair() -> tuple[H2Protocol[StreamState], h2.connection.H2Connection]:
    # RFC 9113's initial windows: h2 sends WINDOW_UPDATE once half a window was acknowledged.
    client: H2Protocol[StreamState] = H2Protocol(
        ORIGIN, StreamState, stream_window=65535, connection_window=65535
    )
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    server.initiate_connection()
    client.initiate()
    server.receive_data(client.data_to_send())
    changes = client.receive_data(server.data_to_send())
    assert changes.settings_received
    server.receive_data(client.data_to_send())  # SETTINGS ACK
    return client, server


def _to_server(client: H2Protocol[StreamState], server: h2.connection.H2Connection) -> list[object]:
    return list(server.receive_data(client.data_to_send()))


def test_goaway_refuses_the_streams_above_its_last_id_and_lets_the_others_finish() -> None:
    client, server = _pair()
    first = client.start_request(0, HEADERS, end=True)
    second = client.start_request(1, HEADERS, end=True)
    _to_server(client, server)
    server.send_headers(first.id, [(b":status", b"200")])
    server.close_connection(last_stream_id=first.id)  # processed the first only
    changes = client.receive_data(server.data_to_send())
    assert changes.capacity_changed
    assert client.draining
    assert isinstance(second.error, StreamRefused)  # never processed: safe to re-send
    assert first.error is None
    assert first.status == 200
    with pytest.raises(StreamRefused):
        client.start_request(2, HEADERS, end=True)
    # h2's own server state machine stops after its GOAWAY; a real server may still finish the
    # streams at or below the last id (RFC 9113 6.8): its last DATA frame, by hand.
    last = DataFrame(first.id, data=b"done", flags=["END_STREAM"])
    client.receive_data(last.serialize())
    assert first.remote_closed
    assert first.finished
    assert first.chunks[-1][0] == b"done"
    assert client.ended_by() is None  # a graceful GOAWAY is not an error


def test_unread_data_of_a_released_stream_goes_back_to_the_window() -> None:
    client, server = _pair()
    stream = client.start_request(7, HEADERS, end=True)
    _to_server(client, server)
    server.send_headers(stream.id, [(b":status", b"200")])
    for _ in range(3):
        server.send_data(stream.id, b"x" * 13000)
    client.receive_data(server.data_to_send())
    window = server.local_flow_control_window(stream.id)
    assert window == 65535 - 39000  # the server's view: 39 KB in flight, unacknowledged
    client.release_slot(7)  # barge-in: RST_STREAM and the unread 39 KB acknowledged
    events = _to_server(client, server)
    assert any(isinstance(e, h2.events.StreamReset) for e in events)
    updates = [e for e in events if isinstance(e, h2.events.WindowUpdated) and not e.stream_id]
    assert sum(e.delta or 0 for e in updates) >= 39000
    assert client.slots == {}
    assert client.streams == {}


def test_a_protocol_violation_raises_and_queues_goaway() -> None:
    client, _server = _pair()
    with pytest.raises(ConnectionClosed, match="HTTP/2 protocol error"):
        client.receive_data(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")  # DATA on stream 0
    assert client.violated
    assert client.data_to_send()  # our GOAWAY(PROTOCOL_ERROR)


def test_goaway_with_an_error_code_is_reported() -> None:
    client, server = _pair()
    server.close_connection(error_code=ErrorCodes.ENHANCE_YOUR_CALM, additional_data=b"pings")
    client.receive_data(server.data_to_send())
    assert "sent GOAWAY ENHANCE_YOUR_CALM: pings" in str(client.ended_by())


def test_a_stream_never_written_is_refused_when_the_connection_dies() -> None:
    # The pool may grant a slot in the step that also reads the server's GOAWAY and close: a
    # stream whose HEADERS never left cannot have been processed, so it is retryable; one the
    # server may have read is not (a POST is not idempotent).
    client, server = _pair()
    sent = client.start_request(0, HEADERS, end=True)
    _to_server(client, server)
    queued = client.start_request(1, HEADERS, end=True)  # still in h2's output buffer
    assert client.streams_started == 2
    lost = ConnectionClosed("connection lost")
    assert client.fail(lost)
    assert sent.error is lost
    assert isinstance(queued.error, StreamRefused)
    assert queued.error.__cause__ is lost
    with pytest.raises(StreamRefused, match="closed before the stream was opened") as info:
        client.start_request(2, HEADERS, end=True)
    assert info.value.__cause__ is lost

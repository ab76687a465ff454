"""PoolIndex: pools found by URL, and the counted, logged miss."""

from __future__ import annotations

import logging

import pytest

from voicepool import Pool, PoolSettings
from voicepool.integrations import PoolIndex, pool_url, url_key
from voicepool.integrations._sockets import exact_adapter
from voicepool.testing import FakeAdapter


def test_url_key_ignores_order_default_port_and_trailing_slash() -> None:
    a = url_key("wss://API.example.com:443/v1/listen/?b=2&a=1")
    assert a == url_key("wss://api.example.com/v1/listen?a=1&b=2")
    assert a != url_key("wss://api.example.com/v1/listen?a=1&b=3")
    assert url_key("ws://h/x") != url_key("wss://h/x")
    with pytest.raises(ValueError, match="not an absolute URL"):
        url_key("/v1/listen?token=secret")


def test_find_and_miss_counted_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    url = "wss://127.0.0.1:9/v1/listen?sample_rate=16000&model=nova-3"
    pool = Pool(exact_adapter("deepgram", url, {"Authorization": "Token k"}), name="asr")
    index = PoolIndex([pool])
    assert pool_url(pool) == url
    assert index.find("wss://127.0.0.1:9/v1/listen?model=nova-3&sample_rate=16000") is pool
    other = "wss://127.0.0.1:9/v1/listen?model=nova-3&sample_rate=8000&token=s3cret"
    assert index.find(other) is None
    with caplog.at_level(logging.WARNING, "voicepool.integrations"):
        index.miss(other, "pipecat")
        index.miss(other, "pipecat")
    assert index.misses["pipecat"] == 2
    [record] = caplog.records  # logged once per URL, counted every time
    assert "voicepool.pool.miss" in record.message
    assert "asr" in record.message
    assert "s3cret" not in record.message
    assert "8000" not in record.message


def test_two_pools_for_one_url_rejected() -> None:
    index = PoolIndex()
    index.add(Pool(FakeAdapter(), PoolSettings(min_size=0), name="a"), url="wss://h/x")
    with pytest.raises(ValueError, match="serve the same URL"):
        index.add(Pool(FakeAdapter(), PoolSettings(min_size=0), name="b"), url="wss://h/x/")


def test_find_by_the_same_string_again_and_after_a_pool_is_added() -> None:
    """find() remembers the exact strings it answered (a framework opens the same URLs at every
    call start); a pool added later is found by a URL that found none before."""
    index = PoolIndex()
    asr = index.add(Pool(FakeAdapter(), PoolSettings(min_size=0), name="asr"), url="wss://h/a")
    assert index.find("wss://h/a") is asr
    assert index.find("wss://h/a") is asr  # the remembered answer
    assert index.find("wss://h:443/a/") is asr  # another spelling: parsed, then remembered
    assert index.find("wss://h/b") is None
    tts = index.add(Pool(FakeAdapter(), PoolSettings(min_size=0), name="tts"), url="wss://h/b")
    assert index.find("wss://h/b") is tts
    assert index.find("wss://h/a") is asr
    assert index.find("/a") is None  # relative: never raises

"""The adapter registry (decorator and entry points) and PoolSettings (validation, sizing rule)."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError

import voicepool
from voicepool import (
    Adapter,
    AdapterNotFound,
    ConnectError,
    LeaseMode,
    PoolSettings,
    get_adapter,
    register_adapter,
    registered_adapters,
)
from voicepool.adapter import ENTRY_POINT_GROUP
from voicepool.testing import FakeAdapter
from voicepool.testing import FakeMuxAdapter as MuxAdapter
from voicepool.testing import FakeSingleUseAdapter as SingleUseAdapter
from voicepool.testing.fake import FakeConn


def test_register_and_get_by_name() -> None:
    @register_adapter("test-echo")
    class Echo(Adapter[str]):
        async def connect(self) -> str:
            return "echo"

    assert get_adapter("test-echo") is Echo
    assert "test-echo" in registered_adapters()
    # Re-registering the same class (a module reload) is fine; another class is not.
    register_adapter("test-echo")(Echo)

    class Other(Adapter[str]):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_adapter("test-echo")(Other)


def test_register_rejects_non_adapters() -> None:
    with pytest.raises(TypeError, match="Adapter subclass"):
        register_adapter("nope")(int)  # type: ignore[type-var]


def test_unknown_adapter_lists_the_registered_ones() -> None:
    with pytest.raises(AdapterNotFound) as info:
        get_adapter("no-such-adapter")
    message = str(info.value)
    assert "no-such-adapter" in message
    for name in ("websocket", "deepgram", "http2", "rest", "sip"):
        assert name in message
    assert isinstance(info.value, LookupError)


def test_builtin_adapters_come_from_entry_points() -> None:
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert {"websocket", "deepgram", "elevenlabs", "cartesia", "http2", "rest", "sip"} <= names
    for name in ("websocket", "deepgram", "elevenlabs", "cartesia", "http2", "rest"):
        cls = get_adapter(name)
        assert issubclass(cls, Adapter)
        assert cls.Options is not None  # every built-in declares its options model


def test_from_options() -> None:
    class Opts(BaseModel):
        url: str

    class WithOptions(Adapter[str]):
        Options = Opts

        def __init__(self, options: Opts) -> None:
            self.options = options

    built = WithOptions.from_options(Opts(url="wss://127.0.0.1"))
    assert isinstance(built, WithOptions)
    assert built.options.url == "wss://127.0.0.1"
    assert isinstance(FakeAdapter.from_options(None), FakeAdapter)


def test_adapter_defaults() -> None:
    adapter = FakeAdapter()
    assert Adapter.is_fatal(adapter, ConnectError("x", fatal=True))
    assert not Adapter.is_fatal(adapter, ConnectError("x"))
    assert not Adapter.is_fatal(adapter, OSError("x"))
    assert adapter.describe() == "fake://test"
    assert Adapter.describe(adapter) == "FakeAdapter"
    seen: list[FakeConn] = []
    first, second = FakeConn(1), FakeConn(2)
    adapter.watch(seen.append)
    adapter.connection_changed(first)
    adapter.unwatch(seen.append)
    adapter.unwatch(seen.append)  # unknown: ignored
    adapter.connection_changed(second)
    assert seen == [first]


def test_error_tree() -> None:
    assert issubclass(voicepool.PoolExhausted, TimeoutError)
    assert issubclass(voicepool.PoolExhausted, voicepool.PoolError)
    assert issubclass(voicepool.ConnectError, ConnectionError)
    assert issubclass(voicepool.ConfigError, ValueError)
    for name in (
        "PoolExhausted",
        "PoolUnavailable",
        "PoolClosed",
        "ConnectError",
        "AdapterNotFound",
        "LeaseReleased",
        "ConfigError",
    ):
        assert issubclass(getattr(voicepool, name), voicepool.VoicepoolError)


# -- PoolSettings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("concurrency", 0),
        ("per_call", 0),
        ("headroom", -0.1),
        ("headroom", 5),
        ("min_size", -1),
        ("max_size", 0),
        ("acquire_timeout", 0),
        ("connect_timeout", -1),
        ("connect_concurrency", 0),
        ("ping_interval", 0),
        ("failure_threshold", 0),
        ("backoff_initial", 0),
        ("leak_threshold", 0),
        ("alarm_wait_p95_ms", 0),
        ("not_a_field", 1),
    ],
)
def test_bad_values_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        PoolSettings.model_validate({field: value})
    assert field in str(info.value)


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"min_size": 5, "max_size": 2}, "max_size"),
        ({"backoff_initial": 5, "backoff_max": 1}, "backoff_max"),
        ({"ping_interval": 1, "ping_timeout": 2}, "ping_timeout"),
    ],
)
def test_cross_field_rules_name_the_field(values: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        PoolSettings.model_validate(values)
    assert field in str(info.value)


def test_sizing_rule_exclusive() -> None:
    sizing = PoolSettings(concurrency=20).resolve(FakeAdapter())
    assert sizing.lease_mode is LeaseMode.EXCLUSIVE
    assert sizing.max_size == 25  # ceil(20 * 1 * 1.25)
    assert sizing.min_size == 25  # warm floor


def test_sizing_rule_per_call_and_headroom() -> None:
    sizing = PoolSettings(concurrency=10, per_call=2, headroom=0.5).resolve(FakeAdapter())
    assert sizing.max_size == 30


def test_sizing_rule_multiplexed_divides_by_streams() -> None:
    sizing = PoolSettings(concurrency=20).resolve(MuxAdapter())
    assert sizing.max_streams == 3
    assert sizing.max_size == 9  # ceil(25 / 3)
    assert PoolSettings(concurrency=20, max_streams=5).resolve(MuxAdapter()).max_size == 5


def test_sizing_rule_single_use_keeps_few_spares() -> None:
    sizing = PoolSettings(concurrency=20).resolve(SingleUseAdapter())
    assert sizing.max_size == 25
    assert sizing.min_size == 5  # ceil(20 * 0.25): a provider billing open sockets pays for few


def test_explicit_sizes_and_mode_override() -> None:
    s = PoolSettings(concurrency=4, min_size=2, max_size=3, lease_mode=LeaseMode.SINGLE_USE)
    sizing = s.resolve(FakeAdapter())
    assert (sizing.lease_mode, sizing.min_size, sizing.max_size) == (LeaseMode.SINGLE_USE, 2, 3)
    assert PoolSettings(concurrency=1, min_size=8).resolve(FakeAdapter()).max_size == 8


def test_settings_are_frozen() -> None:
    s = PoolSettings()
    with pytest.raises(ValidationError):
        s.concurrency = 5  # type: ignore[misc]

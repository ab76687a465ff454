"""Options models of the http2 and rest adapters: validation, construction, secret hygiene."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from voicepool import LeaseMode, PoolSettings, get_adapter
from voicepool.adapters.http2 import Http2Adapter, Http2Options, Options
from voicepool.adapters.rest import RestAdapter, RestOptions

SECRET = "sk-live-abcdef0123456789"


def test_entry_points_resolve_to_the_adapters() -> None:
    assert get_adapter("http2") is Http2Adapter
    assert get_adapter("rest") is RestAdapter
    assert Http2Adapter.Options is Http2Options is Options
    assert RestAdapter.Options is RestOptions
    assert Http2Adapter.lease_mode is LeaseMode.MULTIPLEXED
    assert RestAdapter.lease_mode is LeaseMode.EXCLUSIVE


def test_keywords_or_options_build_the_same_adapter() -> None:
    a = Http2Adapter(base_url="https://llm.example/v1", api_key=SECRET, max_streams=50)
    b = Http2Adapter.from_options(Http2Options(base_url="https://llm.example/v1", max_streams=50))
    assert isinstance(b, Http2Adapter)
    assert a.origin == b.origin
    assert a.origin.authority == "llm.example"
    assert a.path_prefix == "/v1"
    assert a.max_streams == 50  # per instance: the pool sizes with it
    assert PoolSettings(concurrency=100).resolve(a).max_streams == 50
    with pytest.raises(TypeError):
        Http2Adapter(Http2Options(base_url="https://x"), max_streams=3)


def test_warmup_path_is_relative_to_the_base_path() -> None:
    relative = Http2Adapter(base_url="https://llm.example/v1/", warmup_path="models")
    absolute = Http2Adapter(base_url="https://llm.example/v1", warmup_path="/v1/models")
    assert relative.warmup_target() == absolute.warmup_target() == "/v1/models"


@pytest.mark.parametrize(
    "url",
    [
        "llm.example",
        "ftp://llm.example",
        "https://user:pw@llm.example",
        "https://llm.example/v1?key=1",
        "https://llm.example:99999",
    ],
)
def test_bad_base_urls_are_rejected(url: str) -> None:
    with pytest.raises(ValidationError):
        Http2Options(base_url=url)
    with pytest.raises(ValidationError):
        RestOptions(base_url=url)


def test_bad_headers_and_unknown_options_are_rejected() -> None:
    with pytest.raises(ValidationError):
        Http2Options(base_url="https://x", headers={"x-a": "b\r\nevil: 1"})
    with pytest.raises(ValidationError):
        Http2Options(base_url="https://x", max_stream=5)


def test_credentials_stay_out_of_descriptions_and_reprs() -> None:
    h2 = Http2Adapter(base_url="https://llm.example:8443/v1", api_key=SECRET)
    rest = RestAdapter(base_url="https://crm.example", api_key=SECRET, api_key_header="X-Api-Key")
    for text in (
        h2.describe(),
        repr(h2.options),
        str(h2.options),
        rest.describe(),
        repr(rest.options),
    ):
        assert SECRET not in text
    assert h2.describe() == "http2 https://llm.example:8443/v1"
    assert (b"authorization", f"Bearer {SECRET}".encode()) in h2.default_headers
    assert rest.default_headers["x-api-key"] == SECRET  # a non-Authorization header: the key


def test_options_validate_from_settings_tables() -> None:
    from voicepool.settings import VoicePoolSettings

    cfg = VoicePoolSettings(
        pools={
            "llm": {
                "adapter": "http2",
                "max_streams": 50,
                "options": {"base_url": "https://llm.example/v1", "api_key": SECRET},
            },
            "crm": {"adapter": "rest", "options": {"base_url": "https://crm.example"}},
        }
    )
    assert SECRET not in repr(cfg)
    llm = cfg.pools["llm"]
    adapter = llm.adapter_class.from_options(llm.options)
    assert isinstance(adapter, Http2Adapter)
    assert adapter.options.api_key is not None
    assert adapter.options.api_key.get_secret_value() == SECRET

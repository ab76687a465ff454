"""Values that used to crash or pass silently (inf, nan, absurdly large) are a ConfigError naming
the field, from each of the four entry points: code, a dict, the environment, a TOML file."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from voicepool import ConfigError, Pool, PoolSettings, VoicePoolSettings
from voicepool.adapters.rest import RestAdapter

INF, NAN = math.inf, math.nan
# (field, value as Python, value as TOML / environment text)
CASES = [
    ("per_call", INF, "inf"),
    ("per_call", NAN, "nan"),
    ("acquire_timeout", INF, "inf"),
    ("connect_timeout", NAN, "nan"),
    ("ping_interval", INF, "inf"),
    ("ping_timeout", NAN, "nan"),
    ("backoff_max", INF, "inf"),
    ("backoff_initial", NAN, "nan"),
    ("drain_timeout", INF, "inf"),
    ("max_lifetime", INF, "inf"),
    ("headroom", NAN, "nan"),
    ("concurrency", 1e12, "1e12"),
    ("concurrency", 10**12, "1000000000000"),
    ("max_size", 10**9, "1000000000"),
    ("connect_timeout", 1e300, "1e300"),
]
IDS = [f"{f}={t}" for f, _, t in CASES]
POOL = {"adapter": "rest", "options": {"base_url": "http://127.0.0.1:9"}}


def _check(exc: ConfigError, path: str) -> None:
    text = str(exc)
    assert path in text, text
    assert "Traceback" not in text


@pytest.mark.parametrize(("field", "value", "text"), CASES, ids=IDS)
def test_code(field: str, value: object, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        PoolSettings(**{field: value})
    _check(info.value, f"{field}:")


@pytest.mark.parametrize(("field", "value", "text"), CASES, ids=IDS)
def test_dict(field: str, value: object, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        VoicePoolSettings(pools={"crm": {**POOL, field: value}})
    _check(info.value, f"pools.crm.{field}:")
    with pytest.raises(ConfigError) as info:
        VoicePoolSettings(defaults={field: value})
    _check(info.value, f"defaults.{field}:")


@pytest.mark.parametrize(("field", "value", "text"), CASES, ids=IDS)
def test_environment(field: str, value: object, text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOICEPOOL_POOLS__CRM__ADAPTER", "rest")
    monkeypatch.setenv("VOICEPOOL_POOLS__CRM__OPTIONS__BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv(f"VOICEPOOL_POOLS__CRM__{field.upper()}", text)
    with pytest.raises(ConfigError) as info:
        VoicePoolSettings()
    _check(info.value, f"pools.crm.{field}:")


@pytest.mark.parametrize(("field", "value", "text"), CASES, ids=IDS)
def test_toml(field: str, value: object, text: str, tmp_path: Path) -> None:
    path = tmp_path / "voicepool.toml"
    path.write_text(
        f'[pools.crm]\nadapter = "rest"\n{field} = {text}\n'
        '[pools.crm.options]\nbase_url = "http://127.0.0.1:9"\n'
    )
    with pytest.raises(ConfigError) as info:
        VoicePoolSettings(config=path)
    _check(info.value, f"pools.crm.{field}:")
    assert str(path) in str(info.value)


def test_sizing_rule_beyond_the_limit_names_max_size() -> None:
    # Each value is allowed alone; together they ask for 125 million connections.
    settings = PoolSettings(concurrency=100_000, per_call=1000)
    adapter = RestAdapter(base_url="http://127.0.0.1:9")
    with pytest.raises(ConfigError, match=r"^max_size from the sizing rule would be 125000000"):
        Pool(adapter, settings, name="crm")
    with pytest.raises(ConfigError, match=r"pools\.crm\.max_size: max_size from the sizing rule"):
        VoicePoolSettings(pools={"crm": {**POOL, "concurrency": 100_000, "per_call": 1000}})


@pytest.mark.parametrize(
    ("field", "value"), [("failback_after", INF), ("failback_after", NAN), ("standby_min", 10**9)]
)
def test_group_values(field: str, value: object) -> None:
    pools = {"a": POOL, "b": POOL}
    with pytest.raises(ConfigError) as info:
        VoicePoolSettings(pools=pools, groups={"crm": {"members": ["a", "b"], field: value}})
    _check(info.value, f"groups.crm.{field}:")

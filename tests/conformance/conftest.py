"""The conformance suite: each provider's official SDK against voicepool's emulator, over TLS on
127.0.0.1 (base URL overridden; the trustme CA through the SDK's HTTP client, SSL context or
``SSL_CERT_FILE``). What the SDK parses is validated against the SDK's own pydantic types."""

from __future__ import annotations

from typing import Any, TypeVar

import pydantic
import pytest

from voicepool.testing import test_certificates

KEY = "conformance-key"
BAD_KEY = "not-the-key"

ModelT = TypeVar("ModelT", bound=pydantic.BaseModel)


@pytest.fixture
def ca_env(monkeypatch: pytest.MonkeyPatch) -> str:
    """Point the default SSL context at the test CA (for SDKs that take no ssl option)."""
    path = str(test_certificates().ca_path)
    monkeypatch.setenv("SSL_CERT_FILE", path)
    return path


def strict(model: type[ModelT], data: dict[str, Any]) -> ModelT:
    """Validate ``data`` as ``model`` (strict types) and check it has no field the type lacks:
    a field the SDK does not know would pass its lenient parsing unseen."""
    parsed = model.model_validate(data, strict=True)
    _no_extras(parsed)
    return parsed


def _no_extras(value: object) -> None:
    if isinstance(value, pydantic.BaseModel):
        extra = value.model_extra or {}
        assert not extra, f"{type(value).__name__} has fields its SDK type lacks: {sorted(extra)}"
        for name in type(value).model_fields:
            _no_extras(getattr(value, name))
    elif isinstance(value, list | tuple):
        for item in value:
            _no_extras(item)
    elif isinstance(value, dict):
        for item in value.values():
            _no_extras(item)

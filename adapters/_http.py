"""Option checks shared by the HTTP adapters (``http2`` and ``rest``)."""

from __future__ import annotations

from urllib.parse import urlsplit


def check_base_url(value: str) -> str:
    """An absolute http(s) URL with a host, no credentials, no query or fragment.

    Raises ValueError with the reason (pydantic reports it under the field's path).
    """
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError("must be an absolute https:// (or http://) URL with a host")
    if parts.username or parts.password:
        raise ValueError("must not carry credentials; use api_key")
    if parts.query or parts.fragment:
        raise ValueError("must not have a query or fragment")
    parts.port  # noqa: B018 - raises ValueError on a bad port
    return value


def header_name(value: str) -> str:
    """A header name as HTTP/2 and aiohttp compare it: stripped, lower case."""
    return value.strip().lower()

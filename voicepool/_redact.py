"""Credential masking: the one place that decides what a secret looks like and hides it.

Every path by which voicepool reports something passes through here: error messages and reasons
(:func:`scrub`, :func:`describe_error`), log records of every ``voicepool.*`` logger
(:func:`get_logger` attaches :class:`RedactingFilter`), exception events on spans
(:func:`record_exception`), reprs of options (:func:`redact`), health and stats fields.

Two nets, because an adapter that forgets ``SecretStr`` must not leak either:

1. Known values. Credentials are remembered (:func:`remember`) where they enter: the settings
   layer (every pool's options), :class:`~voicepool.Pool` and :class:`~voicepool.PoolManager`
   (the adapter's attributes). :func:`scrub` replaces each remembered value, longest first.
2. Shapes. Text that looks like a credential is masked even when its value was never seen: the
   value after an ``Authorization``/``X-Api-Key``/``token=``-like name (quoted, ``key: value`` or
   ``key=value``), and ``Bearer``/``Basic``/``Token`` credentials.

Values shorter than 4 characters are never remembered (masking them would mangle ordinary text).
Nothing here raises on odd input: a redactor that fails would lose the report it guards.
"""

from __future__ import annotations

import logging
import re
import threading
import traceback
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, SecretBytes, SecretStr

__all__ = [
    "MASK",
    "SECRET_KEY",
    "RedactingFilter",
    "describe_error",
    "get_logger",
    "install_root_handler",
    "redact",
    "remember",
    "remember_from",
    "scrub",
    "secret_values",
    "silence_header_dumps",
]

MASK = "**********"

SECRET_KEY = re.compile(
    r"(key|token|secret|passw|auth|credential|cookie|signature)(?!\w*_(header|scheme|name|method))",
    re.I,
)
"""Names whose string values are credentials even without ``SecretStr`` (a plain headers dict);
``auth_header``, ``auth_scheme``, ``api_key_header`` name where a credential goes, not one."""

_MIN_LEN = 4
# `name: value`, `name=value`, `'name': 'value'` where the name looks like a credential. The value
# ends at a quote, a comma, whitespace, `&` (query strings) or a closing bracket. The optional
# scheme word (Bearer, Basic, Token) is kept so the message still says what kind of credential.
_NAMED_VALUE = re.compile(
    r"""(?P<name>[\w-]*(?:authorization|api[-_]?key|token|secret|password|passwd|cookie|signature)"""
    r"""[\w-]*)(?P<sep>['"]?\s*[:=]\s*(?:b?['"])?)(?P<scheme>(?:Bearer|Basic|Token|Digest)\s+)?"""
    r"""(?!\d+\b)(?P<value>[^'"\s,&;)}\[\]]{4,})""",
    re.I,
)
_SCHEME_VALUE = re.compile(r"(?P<scheme>\b(?:Bearer|Basic|Token)\s+)(?P<value>[\w.~+/=-]{4,})")

_known: set[str] = set()
_known_sorted: list[str] = []
_lock = threading.Lock()


# -- what a secret is ------------------------------------------------------------------------------


def remember(values: Iterable[str]) -> None:
    """Add credentials to the process-wide set that :func:`scrub` masks. Thread-safe."""
    fresh = {v for v in values if isinstance(v, str) and len(v) >= _MIN_LEN} - _known
    if not fresh:
        return
    global _known_sorted
    with _lock:
        _known.update(fresh)
        # Longest first, so a secret containing another is masked whole.
        _known_sorted = sorted(_known, key=len, reverse=True)


def remember_from(obj: Any) -> set[str]:
    """:func:`remember` every credential reachable from ``obj`` (an adapter, an options model);
    returns them. An adapter's private watch list and slotted objects are skipped."""
    try:
        attrs = vars(obj)
    except TypeError:
        attrs = obj
    if isinstance(attrs, dict):
        attrs = {k: v for k, v in attrs.items() if not str(k).startswith("_watch")}
    found = secret_values(attrs)
    remember(found)
    return found


def secret_values(obj: Any, _depth: int = 0) -> set[str]:
    """Every credential reachable from ``obj``: SecretStr / SecretBytes values, and plain strings
    under credential-looking keys, in models, mappings and sequences (depth-limited).

    Values shorter than 4 characters are ignored (scrubbing them would mangle ordinary text).
    """
    found: set[str] = set()
    if _depth > 6:
        return found
    if isinstance(obj, SecretStr):
        found.add(obj.get_secret_value())
    elif isinstance(obj, SecretBytes):
        found.add(obj.get_secret_value().decode("utf-8", "replace"))
    elif isinstance(obj, BaseModel):
        for key in type(obj).model_fields:
            value = getattr(obj, key, None)
            if isinstance(value, str) and SECRET_KEY.search(key):
                found.add(value)
            found |= secret_values(value, _depth + 1)
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            if isinstance(value, str) and SECRET_KEY.search(str(key)):
                found.add(value)
                # "Bearer <key>" header values: the key alone is a secret too.
                scheme, _, rest = value.partition(" ")
                if rest and scheme.lower() in {"bearer", "basic", "token"}:
                    found.add(rest)
            found |= secret_values(value, _depth + 1)
    elif isinstance(obj, list | tuple | set | frozenset):
        for value in obj:
            found |= secret_values(value, _depth + 1)
    return {s for s in found if len(s) >= _MIN_LEN}


# -- masking ---------------------------------------------------------------------------------------


def scrub(text: str, extra: Iterable[str] = ()) -> str:
    """``text`` with every remembered credential (and ``extra``) masked, and credential-shaped
    values (``Authorization: Bearer ...``, ``api_key=...``) masked too."""
    if not text:
        return text
    secrets = _known_sorted
    more = [s for s in extra if s and len(s) >= _MIN_LEN]
    if more:
        secrets = sorted({*secrets, *more}, key=len, reverse=True)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    text = _NAMED_VALUE.sub(_mask_named, text)
    return _SCHEME_VALUE.sub(_mask_scheme, text)


def _mask_named(match: re.Match[str]) -> str:
    if match["value"] == MASK or match["value"].startswith("*"):
        return match[0]
    return f"{match['name']}{match['sep']}{match['scheme'] or ''}{MASK}"


def _mask_scheme(match: re.Match[str]) -> str:
    return match[0] if match["value"].startswith("*") else f"{match['scheme']}{MASK}"


def describe_error(exc: BaseException, *, cause: bool = False) -> str:
    """``Type: message`` of ``exc``, scrubbed (and its ``__cause__`` when ``cause``): what an
    adapter puts in its own error instead of a vendor exception's repr, which may carry the
    request headers."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    inner = exc.__cause__
    if cause and inner is not None and str(inner) and str(inner) not in text:
        text += f" (cause: {type(inner).__name__}: {inner})"
    return scrub(text)


def redact(key: str, value: Any) -> Any:
    """``value`` for display under ``key``: credential-looking plain strings become the mask,
    mappings are redacted key by key (children of a credential-looking key inherit it), models
    get a masking repr; SecretStr stays (it masks itself)."""
    if isinstance(value, SecretStr | SecretBytes):
        return value
    if isinstance(value, str) and SECRET_KEY.search(key):
        return MASK
    if isinstance(value, Mapping):
        inherit = bool(SECRET_KEY.search(key))
        return {k: redact(key if inherit else str(k), v) for k, v in value.items()}
    if isinstance(value, BaseModel):
        return Redacted(value)
    return value


class Redacted:
    """Repr of an options model with credential-looking plain strings masked."""

    def __init__(self, model: BaseModel) -> None:
        self.model = model

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{key}={redact(key, getattr(self.model, key))!r}"
            for key in type(self.model).model_fields
        )
        return f"{type(self.model).__name__}({fields})"


# -- logs and spans ------------------------------------------------------------------------------


class RedactingFilter(logging.Filter):
    """Scrubs a record's formatted message (and its exception text) before any handler sees it.

    Attached to every ``voicepool.*`` logger by :func:`get_logger` (a logger's filters do not
    apply to its children's records, so each named logger carries one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: logging reports it itself later
            return True
        clean = scrub(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            text = "".join(traceback.format_exception(*record.exc_info))
            clean_exc = scrub(text)
            if clean_exc != text:
                record.exc_info, record.exc_text = None, clean_exc.rstrip("\n")
        return True


_FILTER = RedactingFilter()


class _DropDebug(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.DEBUG


def silence_header_dumps(name: str) -> None:
    """Drop the DEBUG records of a third-party logger that dumps raw headers (``hpack`` logs
    every header block it encodes or decodes, Authorization included, and Huffman-coded bytes
    cannot be scrubbed); its other records pass. Idempotent."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, _DropDebug) for f in logger.filters):
        logger.addFilter(_DropDebug())


class _ScrubbingNullHandler(logging.NullHandler):
    """Emits nothing; runs its filters (``NullHandler.handle`` would skip them)."""

    def handle(self, record: logging.LogRecord) -> Any:
        return self.filter(record)


def install_root_handler() -> logging.Handler:
    """Give the ``voicepool`` logger its library ``NullHandler`` (no "no handlers" fallback
    output; the application configures logging), carrying the redacting filter: a handler's
    filter sees every record propagated from a ``voicepool.*`` child before the application's
    root handlers do, so a logger made without :func:`get_logger` is scrubbed too. Idempotent."""
    logger = logging.getLogger("voicepool")
    for handler in logger.handlers:
        if isinstance(handler, _ScrubbingNullHandler):
            return handler
    handler = _ScrubbingNullHandler()
    handler.addFilter(_FILTER)
    logger.addHandler(handler)
    return handler


def get_logger(name: str) -> logging.Logger:
    """``logging.getLogger(name)`` with the redacting filter attached (once)."""
    logger = logging.getLogger(name)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    return logger


def record_exception(span: Any, error: BaseException) -> None:
    """Record ``error`` on an OpenTelemetry span as the standard ``exception`` event, with the
    message and stack trace scrubbed (the SDK's ``record_exception`` would format them raw)."""
    stack = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    span.add_event(
        "exception",
        {
            "exception.type": type(error).__qualname__,
            "exception.message": scrub(str(error)),
            "exception.stacktrace": scrub(stack),
            "exception.escaped": "False",
        },
    )

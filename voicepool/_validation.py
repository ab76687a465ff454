"""How a pydantic ValidationError becomes a ConfigError message: one line per problem, naming the
field's path, echoing an input only where it cannot be a secret. Shared by PoolSettings and the
settings layer; imports nothing of voicepool, so any layer may use it."""

from __future__ import annotations

import re
from typing import Any

from pydantic import ValidationError

__all__ = ["format_errors", "plain_message"]

_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def plain_message(message: str) -> str:
    """pydantic's message without the prefix of a validator's ValueError (the path says enough)."""
    return message.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def format_errors(
    exc: ValidationError,
    config: Any,
    *,
    echo: frozenset[str],
    head: str = "invalid voicepool settings",
) -> str:
    """One line per problem, ``path: reason``; the input is shown only for the fields in
    ``echo`` (numeric pool settings), never under ``options`` (where secrets live)."""
    lines = []
    for err in exc.errors(include_url=False):
        path = ".".join(str(part) for part in err["loc"]) or "settings"
        line = f"{path}: {plain_message(err['msg'])}"
        value = err.get("input")
        loc = err["loc"]
        # Pool settings are numbers, booleans and enums: safe to echo. Strings (from the
        # environment) only when they look like a number, to never echo a misplaced secret.
        safe = isinstance(value, int | float) or (
            isinstance(value, str) and _NUMBER.fullmatch(value.strip()) is not None
        )
        if (
            safe
            and loc
            and loc[-1] in echo
            and "options" not in loc
            and err["type"] not in {"extra_forbidden", "process_limit"}
        ):
            line += f" (got {value!r})"
        lines.append("  " + line)
    source = f" (config file {str(config)!r})" if config else ""
    count = len(lines)
    title = f"{head}{source}: {count} problem{'s' if count != 1 else ''}"
    return "\n".join([title, *lines])

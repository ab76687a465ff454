"""Reference sections of README.md and docs/, generated from the code so they cannot drift.

    python -m tools.docgen            # rewrite the generated blocks in place
    python -m tools.docgen --check    # exit 1 if a block differs (the tests run this)

A block sits between ``<!-- generated:NAME -->`` and ``<!-- end:NAME -->`` in a Markdown file;
everything outside the markers is hand-written. Blocks:

* ``pool-settings``: every :class:`~voicepool.PoolSettings` field (type, default, description);
* ``quota-settings``: every :class:`~voicepool.pool_settings.QuotaSettings` field (docs/fleet.md);
* ``pool-entry``: the keys of a ``[pools.<name>]`` table besides the pool settings;
* ``group-entry``: the keys of a ``[groups.<name>]`` table (``GroupConfig``);
* ``adapter-options``: each built-in adapter's ``Options`` model (docs/configuration.md);
* ``telemetry``: every name in :mod:`voicepool.telemetry.names`, with its comment.
"""

from __future__ import annotations

import argparse
import enum
import inspect
import re
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

__all__ = ["BLOCKS", "BUILTIN_ADAPTERS", "check", "render", "sync"]

BUILTIN_ADAPTERS = (
    "deepgram",
    "elevenlabs",
    "cartesia",
    "http2",
    "rest",
    "sip",
    "websocket",
    "aiohttp_websocket",
)
_BLOCK = re.compile(r"(<!-- generated:([\w-]+)[^>]*-->\n)(.*?)(<!-- end:\2 -->)", re.S)
_ROOT = Path(__file__).resolve().parents[1]
FILES = ("README.md", "docs/configuration.md", "docs/fleet.md")


# -- types and defaults as a reader wants them ----------------------------------------------------


def _type(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        parts = [_type(a) for a in args if a is not type(None)]
        text = " \\| ".join(parts)
        return text + (" \\| none" if type(None) in args else "")
    if origin is typing.Literal:
        return " \\| ".join(_literal(a) for a in args)
    if origin is typing.Annotated:
        return _type(args[0])
    if origin in (dict, typing.Mapping) or annotation is dict:
        return "table"
    if origin in (list, tuple, set, frozenset):
        return f"list of {_type(args[0])}" if args else "list"
    if isinstance(annotation, type):
        if issubclass(annotation, enum.Enum):
            return " \\| ".join(f'"{m.value}"' for m in annotation)
        if issubclass(annotation, SecretStr):
            return "secret"
        if issubclass(annotation, BaseModel):
            return "table"
        names = {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}
        names.update({"Path": "path", "PosixPath": "path"})
        return names.get(annotation.__name__, annotation.__name__)
    return str(annotation).replace("typing.", "")


def _literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return f'"{value}"' if isinstance(value, str) else str(value)


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        value = info.default_factory()  # type: ignore[call-arg]
    elif info.default is PydanticUndefined:
        return "**required**"
    else:
        value = info.default
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return f'"{value.value}"'
    if isinstance(value, str):
        return f'"{value}"' if value else '""'
    if isinstance(value, dict | list | tuple) and not value:
        return "empty"
    return f"`{value!r}`" if isinstance(value, dict | list | tuple) else str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip()


def _model_table(model: type[BaseModel]) -> list[str]:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for name, info in model.model_fields.items():
        lines.append(
            f"| `{name}` | {_type(info.annotation)} | {_default(info)} |"
            f" {_cell(info.description or '')} |"
        )
    return lines


# -- blocks ---------------------------------------------------------------------------------------


def pool_settings() -> str:
    from voicepool.pool_settings import PoolSettings

    return "\n".join(_model_table(PoolSettings))


def quota_settings() -> str:
    from voicepool.pool_settings import QuotaSettings

    return "\n".join(_model_table(QuotaSettings))


def pool_entry() -> str:
    from voicepool.settings import PoolConfig

    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for name, info in PoolConfig.model_fields.items():
        if name == "settings":
            continue
        kind = "table" if name == "options" else _type(info.annotation)
        meaning = _cell(info.description or "")
        if name == "options":
            meaning = (
                "The adapter's own options (`[pools.<name>.options]`), validated by its `Options`"
                " model: see [docs/configuration.md](docs/configuration.md)."
            )
        lines.append(f"| `{name}` | {kind} | {_default(info)} | {meaning} |")
    lines.append(
        "| *any pool setting* | | from `[defaults]` | Flat in the pool's table: `max_size = 8`. |"
    )
    return "\n".join(lines)


def group_entry() -> str:
    from voicepool.settings import GroupConfig

    return "\n".join(_model_table(GroupConfig))


def adapter_options() -> str:
    from voicepool.adapter import get_adapter

    out: list[str] = []
    for name in BUILTIN_ADAPTERS:
        cls = get_adapter(name)
        module_doc = inspect.getdoc(sys.modules[cls.__module__]) or ""
        summary = module_doc.split("\n\n")[0].replace("``", "`")
        out.append(f"### `{name}`: `{cls.__module__}.{cls.__name__}`")
        out.append("")
        out.append(_cell(summary))
        out.append("")
        mode = cls.lease_mode.value
        streams = f", {cls.max_streams} streams a connection" if mode == "multiplexed" else ""
        idle = f", provider idle close {cls.max_idle:g} s" if cls.max_idle else ""
        limit = cls.max_connections_per_process
        per_process = f", at most {limit} connections per process" if limit else ""
        out.append(f"Lease mode `{mode}`{streams}{idle}{per_process}.")
        out.append("")
        if cls.Options is not None:
            out.extend(_model_table(cls.Options))
        else:
            out.append("No options.")
        out.append("")
    return "\n".join(out).rstrip()


_NAME_LINE = re.compile(r'^([A-Z0-9_]+): Final = "([^"]+)"(?:\s*#\s*(.*))?$')
_NAME_TUPLE = re.compile(r"^([A-Z0-9_]+): Final = \(")
_SECTION = re.compile(r"^# -- (.+?) -*$")


def telemetry() -> str:
    from voicepool.telemetry import names

    source = inspect.getsource(names)
    sections: list[tuple[str, list[tuple[str, str]]]] = []
    for line in source.splitlines():
        heading = _SECTION.match(line.strip())
        if heading:
            sections.append((heading.group(1), []))
            continue
        found = _NAME_LINE.match(line.strip())
        if found and sections:
            sections[-1][1].append((found.group(2), found.group(3) or ""))
    lines: list[str] = []
    for title, entries in sections:
        if title.startswith("instrumentation scope"):
            scope = entries[0][0] if entries else names.SCOPE
            lines.append(f"Instrumentation scope: `{scope}`.")
            lines.append("")
            continue
        lines.append(f"**{title[0].upper()}{title[1:]}**")
        lines.append("")
        lines.append("| name | notes |")
        lines.append("|---|---|")
        for name, note in entries:
            lines.append(f"| `{name}` | {_cell(note)} |")
        lines.append("")
    states = ", ".join(names.CONNECTION_STATES)
    lines.append(f"Connection states (attribute `state` of `{names.CONNECTION_COUNT}`): {states}.")
    return "\n".join(lines)


BLOCKS: dict[str, Callable[[], str]] = {
    "pool-settings": pool_settings,
    "quota-settings": quota_settings,
    "pool-entry": pool_entry,
    "group-entry": group_entry,
    "adapter-options": adapter_options,
    "telemetry": telemetry,
}


def render(name: str) -> str:
    """The generated content of block ``name`` (KeyError for an unknown block)."""
    return BLOCKS[name]()


def sync(text: str) -> tuple[str, list[str]]:
    """``text`` with every generated block re-rendered, and the names of blocks that changed.

    Raises KeyError for a block name that has no generator.
    """
    changed: list[str] = []

    def replace(match: re.Match[str]) -> str:
        name = match.group(2)
        fresh = render(name) + "\n"
        if match.group(3) != fresh:
            changed.append(name)
        return match.group(1) + fresh + match.group(4)

    return _BLOCK.sub(replace, text), changed


def check(root: Path = _ROOT) -> dict[str, list[str]]:
    """Per file, the blocks that differ from the code (empty: all current)."""
    stale: dict[str, list[str]] = {}
    for rel in FILES:
        path = root / rel
        _, changed = sync(path.read_text(encoding="utf-8"))
        if changed:
            stale[rel] = changed
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="exit 1 if a block is stale")
    parser.add_argument("--root", type=Path, default=_ROOT, help="the repository")
    args = parser.parse_args(argv)
    if args.check:
        stale = check(args.root)
        for rel, blocks in stale.items():
            print(f"{rel}: stale generated blocks: {', '.join(blocks)}")
        return 1 if stale else 0
    for rel in FILES:
        path = args.root / rel
        text, changed = sync(path.read_text(encoding="utf-8"))
        if changed:
            path.write_text(text, encoding="utf-8")
            print(f"{rel}: rewrote {', '.join(changed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

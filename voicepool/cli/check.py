"""``voicepool check [CONFIG]``: validate the settings and the environment, connect each pool once.

For a deployment pipeline or a readiness gate before a worker takes traffic::

    $ voicepool check voicepool.toml
    settings: ok (config file 'voicepool.toml', 3 pools; environment: VOICEPOOL_POOLS__ASR__...)
    asr   deepgram    ok        connect  182 ms   deepgram wss://api.deepgram.com/v1/listen
    tts   elevenlabs  FAILING   connect  121 ms   ConnectError: ... HTTP 401: the API key was ...
    1 of 2 pools failing

1. The settings are built like a worker builds them (:class:`~voicepool.VoicePoolSettings`: the
   TOML file, ``VOICEPOOL_*`` variables, ``.env``); invalid settings print every problem with its
   path (``pools.asr.max_size: ...``) and exit 2.
2. Each pool's adapter is built from its options and opens ONE connection (all pools at once),
   under the pool's ``connect_timeout`` (or ``--timeout``), which is then closed politely. Pools
   are not started: nothing is warmed, nothing keeps running.

Exit status: 0 every pool connected; 1 a pool failed (with ``--required-only``: a required one);
2 invalid settings or usage. Reasons never contain a credential.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from voicepool._redact import describe_error, remember_from, scrub
from voicepool.errors import ConfigError
from voicepool.settings import CONFIG_ENV, PoolConfig, VoicePoolSettings

__all__ = ["PoolCheck", "check_pool", "run"]

_CLOSE_TIMEOUT = 5.0


@dataclass
class PoolCheck:
    """The outcome for one pool."""

    name: str
    adapter: str
    required: bool
    ok: bool
    connect_ms: float | None = None
    endpoint: str = ""
    reason: str | None = None
    hint: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter,
            "required": self.required,
            "ok": self.ok,
            "connect_ms": self.connect_ms,
            "endpoint": self.endpoint,
            "reason": self.reason,
            "hint": self.hint,
        }


def run(args: argparse.Namespace) -> int:
    """Check ``args.config`` (or VOICEPOOL_CONFIG); print the report; return the exit status."""
    env = sorted(k for k in os.environ if k.upper().startswith("VOICEPOOL_"))
    source = _source(args.config)
    try:
        settings = VoicePoolSettings(config=args.config) if args.config else VoicePoolSettings()
    except ConfigError as exc:
        return _invalid(args, source, env, str(exc))
    if not settings.pools:
        return _invalid(
            args,
            source,
            env,
            "no pools configured: name a TOML file (voicepool check voicepool.toml, or"
            f" {CONFIG_ENV}) or set VOICEPOOL_POOLS__<NAME>__ADAPTER=...",
        )
    try:
        checks = asyncio.run(_check_all(settings, args.timeout))
    except KeyboardInterrupt:
        return 130
    failing = [c for c in checks if not c.ok and (c.required or not args.required_only)]
    if args.json:
        report = {
            "ok": not failing,
            "settings": {"ok": True, "source": source, "environment": env, "errors": []},
            "pools": {c.name: c.as_dict() for c in checks},
        }
        print(json.dumps(report, indent=2))
    else:
        plural = "s" if len(checks) != 1 else ""
        print(f"settings: ok ({source}, {len(checks)} pool{plural}{_env_text(env)})")
        for line in _render(checks):
            print(line)
        bad = [c for c in checks if not c.ok]
        if bad:
            print(f"{len(bad)} of {len(checks)} pools failing: {', '.join(c.name for c in bad)}")
        else:
            print(f"all {len(checks)} pools connect")
    return 1 if failing else 0


def _source(config: Path | None) -> str:
    if config is not None:
        return f"config file {str(config)!r}"
    named = os.environ.get(CONFIG_ENV)
    if named:
        return f"config file {named!r} (from {CONFIG_ENV})"
    return "environment and .env only (no config file)"


def _env_text(env: list[str]) -> str:
    names = [n for n in env if n.upper() != CONFIG_ENV]
    if not names:
        return ""
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return f"; environment: {shown}"


def _invalid(args: argparse.Namespace, source: str, env: list[str], message: str) -> int:
    if args.json:
        report = {
            "ok": False,
            "settings": {
                "ok": False,
                "source": source,
                "environment": env,
                "errors": message.splitlines(),
            },
            "pools": {},
        }
        print(json.dumps(report, indent=2))
    else:
        print(f"settings: INVALID ({source})")
        for line in message.splitlines():
            print(f"  {line.strip()}")
    return 2


async def _check_all(settings: VoicePoolSettings, timeout: float | None) -> list[PoolCheck]:
    names = list(settings.pools)
    return list(await asyncio.gather(*(check_pool(n, settings.pools[n], timeout) for n in names)))


async def check_pool(name: str, cfg: PoolConfig, timeout: float | None = None) -> PoolCheck:
    """Build the pool's adapter and open (then close) one connection. Never raises for a
    failing pool: the outcome says why. Cancellation-safe: a cancelled connect leaves nothing
    open (the adapters' contract)."""
    remember_from(cfg.options)
    result = PoolCheck(name, cfg.adapter, cfg.required, ok=False)
    try:
        adapter = cfg.adapter_class.from_options(cfg.options)
    except Exception as exc:
        result.reason = "options rejected: " + describe_error(exc)
        return result
    remember_from(adapter)
    result.endpoint = scrub(adapter.describe())
    limit = timeout if timeout is not None else cfg.settings.connect_timeout
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(limit):
            conn = await adapter.connect()
    except TimeoutError:
        result.reason = f"no connection within {limit:g} s (connect_timeout)"
    except Exception as exc:
        result.reason = describe_error(exc, cause=True)[:400]
    else:
        result.ok = True
        result.connect_ms = round((time.perf_counter() - t0) * 1e3, 1)
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                await asyncio.shield(adapter.close(conn))
        except Exception:  # a slow or failing polite close does not make the pool failing
            pass
    if result.connect_ms is None and result.reason and "no connection" not in result.reason:
        result.connect_ms = round((time.perf_counter() - t0) * 1e3, 1)
    if not result.ok:
        result.hint = _unset_secrets(name, cfg)
    return result


def _unset_secrets(name: str, cfg: PoolConfig) -> str | None:
    """A hint naming credential options that are not set (and their environment variable)."""
    options = cfg.options
    if options is None:
        return None
    unset = [
        field
        for field, info in type(options).model_fields.items()
        if "Secret" in repr(info.annotation) and getattr(options, field, None) is None
    ]
    if not unset:
        return None
    return "; ".join(
        f"pools.{name}.options.{f} is not set (VOICEPOOL_POOLS__{name.upper()}__OPTIONS__"
        f"{f.upper()})"
        for f in unset
    )


def _render(checks: list[PoolCheck]) -> list[str]:
    width = max((len(c.name) for c in checks), default=4)
    awidth = max((len(c.adapter) for c in checks), default=7)
    lines = []
    for c in checks:
        status = "ok" if c.ok else ("FAILING" if c.required else "failing (optional)")
        took = f"connect {c.connect_ms:>6.0f} ms" if c.connect_ms is not None else " " * 17
        detail = c.endpoint if c.ok else (c.reason or "")
        lines.append(f"{c.name:<{width}}  {c.adapter:<{awidth}}  {status:<18} {took}   {detail}")
        if c.hint:
            lines.append(f"{'':<{width}}  hint: {c.hint}")
    return lines

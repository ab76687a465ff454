"""``voicepool demo``: per-call connections vs warm pools, on local emulators, in one run.

1. Start the emulators (Deepgram-like ASR, ElevenLabs-like TTS, an OpenAI-compatible LLM over
   HTTP/2, a CRM REST API, a SIP registrar) in a child process on 127.0.0.1, behind latency relays
   at ``--rtt`` (FaultProxy for TCP, the UDP delay relay for SIP).
2. Boot a :class:`~voicepool.PoolManager` from the bundled ``voicepool/demo/demo.toml`` (the
   emulators' endpoints and keys passed as settings arguments).
3. Run ``--calls`` simulated calls at once, ``--turns`` turns each, twice: connecting per call,
   then pooled (:mod:`voicepool.demo.calls`), with a live progress line.
4. Print the table per service (:mod:`voicepool.demo.report`), draw the PNG chart when matplotlib
   is installed, or print ``--json``.

``--exhaust`` shrinks the TTS pool to one socket so calls queue for it: the exhaustion events and
the acquire-wait p95 alarm are printed as OpenTelemetry span events by a console exporter.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import textwrap
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from voicepool import PoolManager, VoicePoolSettings, __version__
from voicepool.adapter import Adapter
from voicepool.cli._output import Console, ConsoleLogHandler
from voicepool.demo.calls import SERVICES, CallSimulation, Mode, RunResult, SimulationOptions
from voicepool.demo.report import CHART_HINT, build_report, chart_available, render_table
from voicepool.demo.services import Endpoints, raise_fd_limit, spawn_services
from voicepool.errors import VoicepoolError

__all__ = ["EXHAUSTED_POOL", "bundled_config", "demo_settings", "run"]

EXHAUSTED_POOL = "tts"
_EXHAUST_WINDOW = 0.5  # seconds: the alarm window of the shrunk pool (default 60 s)
_SIP_ACCOUNTS = 4  # calls that register per call; the pool holds 1 more (pjsua2: 8 a process)


def _check(args: argparse.Namespace) -> str | None:
    if not 1 <= args.calls <= 200:
        return "--calls must be between 1 and 200"
    if not 1 <= args.turns <= 20:
        return "--turns must be between 1 and 20"
    if not 0 <= args.rtt <= 1000:
        return "--rtt must be between 0 and 1000 ms"
    return None


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns the exit status (0: every call completed)."""
    problem = _check(args)
    if problem:
        print(f"voicepool demo: {problem}", file=sys.stderr)
        return 2
    console = Console(sys.stderr if args.json else sys.stdout)
    raise_fd_limit()
    with _logging(console, verbose=args.verbose):
        try:
            report = asyncio.run(_demo(args, console))
        except KeyboardInterrupt:
            console.clear_status()
            console.line("interrupted")
            return 130
        except BrokenPipeError:
            raise
        except (VoicepoolError, RuntimeError, OSError) as exc:
            console.clear_status()
            console.line(f"voicepool demo failed: {type(exc).__name__}: {exc}")
            return 1
    if args.json:
        print(json.dumps(report, indent=2))
    failed = report["runs"]["per_call"]["failed"] + report["runs"]["pooled"]["failed"]
    return 1 if failed else 0


@contextlib.contextmanager
def _logging(console: Console, *, verbose: bool) -> Iterator[None]:
    """voicepool's warnings (the p95 alarm, circuit changes) as console lines while we run."""
    handler = ConsoleLogHandler(console, logging.INFO if verbose else logging.WARNING)
    logger = logging.getLogger("voicepool")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    # The emulators run in a child process; the websockets/asyncio noise of closes is not news.
    quiet = [logging.getLogger(n) for n in ("websockets", "asyncio")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        for q, level in zip(quiet, levels, strict=True):
            q.setLevel(level)


# -- settings -------------------------------------------------------------------------------------


def bundled_config() -> Path:
    """Path of the demo's bundled TOML (package data ``voicepool/demo/demo.toml``)."""
    return Path(str(resources.files("voicepool.demo") / "demo.toml"))


def demo_settings(
    endpoints: Endpoints, *, calls: int, exhaust: bool, sip: bool = True
) -> VoicePoolSettings:
    """The bundled config with the emulators' endpoints, CA and keys as settings arguments.

    Raises ConfigError if the result is invalid, or if it would make the demo contact anything
    but the emulators (a pool added, or an endpoint changed, through VOICEPOOL_* variables).
    """
    key = endpoints.api_key
    ca = endpoints.ca_file
    pools: dict[str, Any] = {
        "asr": {"options": {"url": endpoints.asr_url, "api_key": key, "ca_file": ca}},
        "crm": {"options": {"base_url": endpoints.crm_url, "api_key": key, "ca_file": ca}},
        "llm": {"options": {"base_url": endpoints.llm_url, "api_key": key, "ca_file": ca}},
        "tts": {"options": {"url": endpoints.tts_url, "api_key": key, "ca_file": ca}},
        "sip": {
            "options": {
                "aor": endpoints.sip_aor,
                "registrar": endpoints.sip_registrar,
                "password": endpoints.sip_password,
            }
        },
    }
    if exhaust:
        # One socket and a quarter of the calls' contexts: calls queue for the voice. A short
        # alarm window so the p95 alarm is evaluated within the run.
        pools[EXHAUSTED_POOL].update(
            min_size=1, max_size=1, max_streams=max(1, calls // 4), alarm_window=_EXHAUST_WINDOW
        )
    settings = VoicePoolSettings(
        config=bundled_config(), _env_file=None, defaults={"concurrency": calls}, pools=pools
    )
    if not sip:
        settings = settings.model_copy(
            update={"pools": {n: p for n, p in settings.pools.items() if n != "sip"}}
        )
    _only_local(settings)
    return settings


def _only_local(settings: VoicePoolSettings) -> None:
    from voicepool.errors import ConfigError

    extra = sorted(set(settings.pools) - set(SERVICES))
    if extra:
        raise ConfigError(
            f"the demo runs its bundled pools only, but the environment adds {extra}:"
            " unset those VOICEPOOL_POOLS__* variables"
        )
    for name, cfg in settings.pools.items():
        opts = cfg.options
        for field in ("url", "base_url", "registrar"):
            value = getattr(opts, field, None)
            if isinstance(value, str):
                host = urlsplit(value).hostname or value.partition(":")[2].partition(":")[0]
                if host != "127.0.0.1":
                    raise ConfigError(
                        f"pools.{name}.options.{field}: the demo talks to its local emulators"
                        f" only (got host {host!r}); unset the VOICEPOOL_* variable that sets it"
                    )


def _sip_problem(settings: VoicePoolSettings) -> str | None:
    """Why the SIP pool cannot be built here (pjsua2 missing or broken), or None."""
    cfg = settings.pools.get("sip")
    if cfg is None:
        return "not configured"
    try:
        cfg.adapter_class.from_options(cfg.options)
    except Exception as exc:
        return str(exc) or type(exc).__name__
    return None


def _per_call_adapters(
    settings: VoicePoolSettings,
) -> tuple[dict[str, Adapter[Any]], frozenset[str]]:
    """Adapters for the per-call run: same options; REST opens its socket in the first request."""
    adapters: dict[str, Adapter[Any]] = {}
    lazy: set[str] = set()
    for name, cfg in settings.pools.items():
        options = cfg.options
        if cfg.adapter == "rest" and options is not None:
            # A fresh client per call has no warm-up request: it connects inside its first one.
            options = options.model_copy(update={"warmup_path": None})
            lazy.add(name)
        adapters[name] = cfg.adapter_class.from_options(options)
    return adapters, frozenset(lazy)


# -- the run --------------------------------------------------------------------------------------


async def _demo(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    t_start = time.perf_counter()
    rtt = args.rtt / 1000
    console.line(
        f"voicepool {__version__} demo: {args.calls} calls at once,"
        f" {_plural(args.turns, 'turn')} each, {args.rtt:g} ms round trip to every service"
    )
    _wrapped(
        console,
        "services: local emulators of Deepgram (ASR), ElevenLabs (TTS), an OpenAI-compatible LLM"
        " (HTTP/2), a CRM (REST API) and a SIP registrar, on 127.0.0.1 behind a latency proxy:"
        " no account, no key, no internet",
        indent="  ",
    )
    skipped: dict[str, str] = {}
    async with spawn_services(rtt) as endpoints:
        t_up = time.perf_counter()
        console.line(f"emulators up in {t_up - t_start:.1f} s (a child process: the network side)")
        settings = demo_settings(endpoints, calls=args.calls, exhaust=args.exhaust)
        problem = _sip_problem(settings)
        if problem is not None:
            skipped["sip"] = f"pjsua2 unavailable: {problem}"
            settings = demo_settings(endpoints, calls=args.calls, exhaust=args.exhaust, sip=False)
        with _telemetry(args.exhaust, console) as printer:
            manager = PoolManager.from_settings(settings)
            t_boot = time.perf_counter()
            async with manager:
                boot = time.perf_counter() - t_boot
                for name, pool in manager.health()["pools"].items():
                    if pool["status"] == "unavailable":
                        skipped[name] = f"pool unavailable: {pool['reason']}"
                pools = _pool_info(manager, settings)
                _wrapped(
                    console,
                    f"pools warm in {boot * 1e3:.0f} ms, before the first call:"
                    f" {_describe(pools, skipped)}",
                )
                services = tuple(s for s in SERVICES if s in manager and s not in skipped)
                adapters, lazy = _per_call_adapters(settings)
                options = SimulationOptions(
                    calls=args.calls, turns=args.turns, sip_calls=min(args.calls, _SIP_ACCOUNTS)
                )
                sim = CallSimulation(manager, services, adapters, options, lazy=lazy)
                per_call = await _with_progress(sim, Mode.PER_CALL, console)
                pooled = await _with_progress(sim, Mode.POOLED, console)
                if args.exhaust:
                    # The p95 alarm is judged when its window closes: let the last one close
                    # before the pools do, so the run's waits are judged too.
                    await asyncio.sleep(_EXHAUST_WINDOW + 0.1)
            telemetry = _telemetry_summary(printer)
    extra: dict[str, Any] = {
        "version": __version__,
        "timing_s": {
            "emulators_start": round(t_up - t_start, 3),
            "pools_boot": round(boot, 3),
            "total": round(time.perf_counter() - t_start, 3),
        },
        "sip_calls": options.sip_calls if "sip" in services else 0,
        "exhaust": _exhaust_info(args, pools) if args.exhaust else None,
        "telemetry": telemetry,
    }
    report = build_report(
        settings={
            "calls": args.calls,
            "turns": args.turns,
            "rtt_ms": args.rtt,
            "exhaust": args.exhaust,
        },
        pools=pools,
        skipped=skipped,
        per_call=per_call,
        pooled=pooled,
        extra=extra,
    )
    _print_results(report, args, console, printer)
    report["chart"] = _chart(report, args, console)
    report["timing_s"]["total"] = round(time.perf_counter() - t_start, 3)
    console.line(f"done in {report['timing_s']['total']:.1f} s")
    return report


def _pool_info(manager: PoolManager, settings: VoicePoolSettings) -> dict[str, dict[str, Any]]:
    info: dict[str, dict[str, Any]] = {}
    for name in SERVICES:
        if name not in manager:
            continue
        pool = manager[name]
        info[name] = {
            "adapter": settings.pools[name].adapter,
            "lease_mode": pool.lease_mode.value,
            "min_size": pool.min_size,
            "max_size": pool.max_size,
            "max_streams": pool.max_streams,
        }
    return info


_UNITS = {
    "sip": ("registration", "call"),
    "asr": ("stream", ""),
    "crm": ("connection", ""),
    "llm": ("connection", "stream"),
    "tts": ("socket", "context"),
}


def _describe(pools: dict[str, dict[str, Any]], skipped: dict[str, str]) -> str:
    parts = []
    for name, p in pools.items():
        if name in skipped:
            parts.append(f"{name} skipped")
            continue
        unit, inner = _UNITS.get(name, ("connection", "stream"))
        count = p["min_size"]
        spare = "spare " if p["lease_mode"] == "single_use" else ""
        text = f"{name} {_plural(count, spare + unit)}"
        if p["lease_mode"] == "multiplexed":
            text += f" x {_plural(p['max_streams'], inner)}"
        parts.append(text)
    return ", ".join(parts)


async def _with_progress(sim: CallSimulation, mode: Mode, console: Console) -> RunResult:
    label = {"per_call": "connecting per call", "pooled": "pooled"}[mode.value]
    o = sim.options
    task = asyncio.create_task(sim.run(mode))
    width = 24
    shown = ""
    while not task.done():
        result = sim.result
        if result is not None and result.mode is mode:
            done = result.completed + result.failed
            filled = round(width * result.turns_done / max(1, o.calls * o.turns))
            text = (
                f"{label:<20} [{'#' * filled}{'.' * (width - filled)}] {done}/{o.calls} calls,"
                f" {result.turns_done}/{o.calls * o.turns} turns, {result.failed} failed"
            )
            if text != shown:
                console.status(text)
                shown = text
        await asyncio.wait({task}, timeout=0.1)
    result = task.result()
    console.clear_status()
    failed = f", {result.failed} FAILED" if result.failed else ""
    console.line(
        f"{label:<20} {result.completed}/{o.calls} calls, {result.turns_done} turns in"
        f" {result.duration:.1f} s{failed}"
    )
    for error, count in result.errors.most_common(3):
        console.line(f"  {count} x {error}")
    return result


# -- telemetry (--exhaust) ------------------------------------------------------------------------


@contextlib.contextmanager
def _telemetry(enabled: bool, console: Console) -> Iterator[Any]:
    """With ``enabled``: the OpenTelemetry SDK with a span-event console printer (or None when
    the otel extra is missing: the demo runs on, and says so)."""
    if not enabled:
        yield None
        return
    try:
        from voicepool.demo.otel import SpanEventPrinter
        from voicepool.telemetry.sdk import install_sdk
    except ImportError:
        console.line("span events need the otel extra: pip install 'voicepool[otel]'")
        yield None
        return
    printer = SpanEventPrinter(console.line)
    otel = install_sdk(span_exporter=printer, batch=False, service_name="voicepool-demo")
    try:
        yield printer
    finally:
        otel.shutdown()


def _telemetry_summary(printer: Any) -> dict[str, Any] | None:
    if printer is None:
        return None
    return {"span_events": dict(printer.counts)}


def _exhaust_info(args: argparse.Namespace, pools: dict[str, dict[str, Any]]) -> dict[str, Any]:
    p = pools.get(EXHAUSTED_POOL, {})
    return {
        "pool": EXHAUSTED_POOL,
        "max_size": p.get("max_size"),
        "max_streams": p.get("max_streams"),
        "calls": args.calls,
    }


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _wrapped(console: Console, text: str, *, indent: str = "") -> None:
    for line in textwrap.wrap(text, width=99, initial_indent=indent, subsequent_indent="  "):
        console.line(line)


# -- output ---------------------------------------------------------------------------------------


def _print_results(
    report: dict[str, Any], args: argparse.Namespace, console: Console, printer: Any
) -> None:
    console.line()
    for line in render_table(report):
        console.line(line)
    if report.get("sip_calls"):
        _wrapped(
            console,
            f"sip: the first {report['sip_calls']} calls take a registration (pjsua2 allows 8 SIP"
            " accounts per process, so connecting per call stays small); sip has no later turns",
        )
    if args.exhaust:
        ex = report["exhaust"]
        svc = report["services"].get(EXHAUSTED_POOL, {})
        exhausted = svc.get("pooled", {}).get("exhausted", 0)
        _wrapped(
            console,
            f"--exhaust: the {EXHAUSTED_POOL} pool shrunk to {_plural(ex['max_size'], 'socket')} x"
            f" {_plural(ex['max_streams'], 'context')} for {ex['calls']} calls: {exhausted}"
            " acquires waited"
            " at max_size (the voicepool.connection.exhausted counter)",
        )
        if printer is not None:
            events = ", ".join(f"{n} x{c}" for n, c in sorted(printer.counts.items()))
            more = f" ({printer.suppressed} not printed)" if printer.suppressed else ""
            _wrapped(console, f"span events: {events or 'none'}{more}", indent="  ")


def _chart(report: dict[str, Any], args: argparse.Namespace, console: Console) -> str | None:
    if args.no_chart:
        return None
    if not chart_available():
        console.line(f"chart: {CHART_HINT}")
        return None
    from voicepool.demo.report import write_chart

    try:
        path = write_chart(report, args.chart)
    except OSError as exc:
        console.line(f"chart: cannot write {args.chart}: {exc}")
        return None
    console.line(f"chart: {path}")
    return str(path)

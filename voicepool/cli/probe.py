"""``voicepool probe URL...``: a cold connection's cost, step by step, and a warm round trip.

For each URL, ``--count`` fresh connections (one after another, so they do not compete), each timed
step by step (:mod:`voicepool.cli._probes`), then the medians::

    wss://api.example.com/v1/listen   websocket, TLSv1.3, 5 runs, medians in ms
      dns             1.2
      tcp            21.0
      tls            22.4
      upgrade        21.3   HTTP 101
      cold           65.9   (the steps above, per run)
      warm           20.8   WebSocket ping -> pong
      first exchange: cold 86.7 ms, warm 20.8 ms (4.2x): a pooled connection saves 65.9 ms

These are the numbers to size pools with (``ping_interval`` well under the provider's idle close)
and to justify them. Exit status: 0 when every URL was probed, 1 when one failed, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
from typing import Any

from voicepool.cli._probes import ProbeError, ProbeOptions, Sample, Target, parse_target, probe_once

__all__ = ["probe", "run"]

_PASSWORD_ENV = "VOICEPOOL_PROBE_SIP_PASSWORD"


def run(args: argparse.Namespace) -> int:
    """Probe ``args.urls``; print the results (or JSON); return the exit status."""
    if not 1 <= args.count <= 1000:
        print("voicepool probe: --count must be between 1 and 1000", file=sys.stderr)
        return 2
    targets: list[Target] = []
    for url in args.urls:
        try:
            targets.append(parse_target(url))
        except ValueError as exc:
            print(f"voicepool probe: {exc}", file=sys.stderr)
            return 2
    headers: list[tuple[str, str]] = []
    for header in args.header:
        name, sep, value = header.partition(":")
        if not sep or not name.strip():
            print(f"voicepool probe: -H wants NAME:VALUE, got {header!r}", file=sys.stderr)
            return 2
        headers.append((name.strip(), value.strip()))
    options = ProbeOptions(
        ca_file=args.ca_file,
        insecure=args.insecure,
        headers=headers,
        timeout=args.timeout,
        sip_user=args.sip_user,
        sip_password=args.sip_password or os.environ.get(_PASSWORD_ENV),
    )
    try:
        results = asyncio.run(_probe_all(targets, options, args.count, quiet=args.json))
    except KeyboardInterrupt:
        return 130
    if args.json:
        print(json.dumps(results, indent=2))
    return 1 if any(r["error"] for r in results) else 0


async def _probe_all(
    targets: list[Target], options: ProbeOptions, count: int, *, quiet: bool
) -> list[dict[str, Any]]:
    results = []
    for target in targets:
        result = await probe(target, options, count)
        results.append(result)
        if not quiet:
            for line in render(result):
                print(line, flush=True)
    return results


async def probe(target: Target, options: ProbeOptions, count: int) -> dict[str, Any]:
    """``count`` cold connections to ``target``; the JSON-ready result with medians (ms).

    Stops at the first failing run and reports its error (``error``: the failing step and why).
    Never raises for network errors.
    """
    samples: list[Sample] = []
    error: str | None = None
    for _ in range(count):
        try:
            samples.append(await probe_once(target, options))
        except ProbeError as exc:
            error = str(exc)
            break
    return summarize(target, samples, error)


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def summarize(target: Target, samples: list[Sample], error: str | None) -> dict[str, Any]:
    """Medians over the samples, in milliseconds, with every sample's steps kept too."""
    steps: dict[str, float] = {}
    for name in samples[0].steps if samples else ():
        values = [s.steps[name] for s in samples if name in s.steps]
        steps[name] = _ms(statistics.median(values))
    warm_values = [s.warm for s in samples if s.warm is not None]
    warm = _ms(statistics.median(warm_values)) if warm_values else None
    cold = _ms(statistics.median([s.cold for s in samples])) if samples else None
    notes = dict(samples[-1].notes) if samples else {}
    return {
        "url": target.url,
        "kind": target.kind if target.kind != "https" else f"https ({notes.get('alpn', '-')})",
        "runs": len(samples),
        "steps_ms": steps,
        "cold_ms": cold,
        "warm_ms": warm,
        "warm": samples[-1].warm_what if samples else "",
        "first_exchange_ms": {
            "cold": None if cold is None or warm is None else round(cold + warm, 3),
            "warm": warm,
        },
        "notes": notes,
        "samples_ms": [
            {
                "steps": {k: _ms(v) for k, v in s.steps.items()},
                "warm": None if s.warm is None else _ms(s.warm),
            }
            for s in samples
        ],
        "error": error,
    }


_STEP_NOTES = {
    "dns": "dns",
    "tls": "alpn",
    "upgrade": "status",
    "http1": "status",
    "http2": "http2",
}


def render(result: dict[str, Any]) -> list[str]:
    """Human lines for one probe result."""
    notes = result["notes"]
    head = [result["kind"]]
    if "tls" in notes:
        head.append(notes["tls"])
    head.append(f"{result['runs']} run{'s' if result['runs'] != 1 else ''}, medians in ms")
    lines = [f"{result['url']}   {', '.join(head)}"]
    for name, value in result["steps_ms"].items():
        extra = notes.get(_STEP_NOTES.get(name, name), "")
        if name == "tls" and extra:
            extra = f"ALPN {extra}"
        if name.startswith("register"):
            extra = f"answered {notes.get(name, '?')}"
        lines.append(f"  {name:<14}{value:>9.1f}   {extra}".rstrip())
    if result["cold_ms"] is not None:
        lines.append(f"  {'cold':<14}{result['cold_ms']:>9.1f}   (the steps above, per run)")
    if result["warm_ms"] is not None:
        lines.append(f"  {'warm':<14}{result['warm_ms']:>9.1f}   {result['warm']}")
        first = result["first_exchange_ms"]
        if first["cold"] is not None and first["warm"]:
            lines.append(
                f"  first exchange: cold {first['cold']:.1f} ms, warm {first['warm']:.1f} ms"
                f" ({first['cold'] / first['warm']:.1f}x): a pooled connection saves"
                f" {result['cold_ms']:.1f} ms"
            )
    for key in ("warm", "auth"):
        if key in notes:
            lines.append(f"  note: {notes[key]}")
    if result["error"]:
        lines.append(f"  FAILED: {result['error']}")
    return lines

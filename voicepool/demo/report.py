"""The demo's results: a JSON-ready report, the per-service table, and the optional PNG chart.

:func:`build_report` turns the two runs (per call, pooled) into one plain dict (milliseconds, every
percentile nearest-rank); :func:`render_table` prints it for humans; :func:`write_chart` draws it
with matplotlib when the optional ``chart`` extra is installed.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from voicepool.demo.calls import SERVICES, RunResult, ServiceSamples

__all__ = [
    "CHART_HINT",
    "build_report",
    "chart_available",
    "percentile",
    "render_table",
    "summary",
    "write_chart",
]

CHART_HINT = "pip install 'voicepool[chart]' (matplotlib) and run it again for a PNG chart"


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-quantile (0 < q <= 1) by nearest rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


def summary(seconds: Sequence[float], *, p99: bool = False) -> dict[str, Any]:
    """``{"n", "p50", "p95", ["p99",] "max"}`` in milliseconds (None without samples)."""
    out: dict[str, Any] = {"n": len(seconds)}
    quantiles = [("p50", 0.50), ("p95", 0.95)] + ([("p99", 0.99)] if p99 else [])
    for name, q in [*quantiles, ("max", 1.0)]:
        value = percentile(seconds, q)
        out[name] = None if value is None else round(value * 1e3, 3)
    return out


def _p50(summary_: Mapping[str, Any]) -> float | None:
    value = summary_.get("p50")
    return None if value is None else float(value)


def _service(
    name: str,
    per_call: ServiceSamples,
    pooled: ServiceSamples,
    pooled_run: RunResult,
    pool: Mapping[str, Any],
) -> dict[str, Any]:
    first_pc = summary(per_call.first)
    later_pc = summary(per_call.later)
    first_po = summary(pooled.first)
    handshake = summary(per_call.connect)
    derived = False
    if handshake["n"] == 0:
        # The connection opened lazily inside the first request (aiohttp): its cost is what the
        # first exchange took beyond a later one on the same connection.
        a, b = _p50(first_pc), _p50(later_pc)
        handshake = {"n": first_pc["n"], "p50": None if a is None or b is None else round(a - b, 3)}
        derived = True
    handshake["derived"] = derived
    stats = pooled_run.pool_stats.get(name)
    counts = {"exhausted": 0, "timeouts": 0, "unavailable": 0}
    if stats is not None:
        before, after = stats
        counts = {
            "exhausted": after.exhausted - before.exhausted,
            "timeouts": after.timeouts - before.timeouts,
            "unavailable": after.unavailable - before.unavailable,
        }
    a, b = _p50(first_pc), _p50(first_po)
    return {
        "status": "ok",
        "reason": None,
        **pool,
        "handshake_ms": handshake,
        "per_call": {"first_turn_ms": first_pc, "later_turn_ms": later_pc},
        "pooled": {
            "first_turn_ms": first_po,
            "later_turn_ms": summary(pooled.later),
            "acquire_wait_ms": summary(pooled.acquire, p99=True),
            **counts,
        },
        "first_turn_saved_ms": None if a is None or b is None else round(a - b, 3),
    }


def _run(run: RunResult) -> dict[str, Any]:
    return {
        "completed": run.completed,
        "failed": run.failed,
        "errors": dict(run.errors),
        "turns": run.turns_done,
        "duration_s": round(run.duration, 3),
        "response_ms": {
            "first_turn": summary(run.response_first),
            "later_turns": summary(run.response_later),
        },
    }


def build_report(
    *,
    settings: Mapping[str, Any],
    pools: Mapping[str, Mapping[str, Any]],
    skipped: Mapping[str, str],
    per_call: RunResult,
    pooled: RunResult,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The machine-readable result (``voicepool demo --json``). Milliseconds throughout.

    ``pools``: per service, what the table shows about its pool (adapter, lease mode, sizes);
    ``skipped``: services not run, with the reason.
    """
    services: dict[str, Any] = {}
    for name in SERVICES:
        if name in skipped:
            services[name] = {"status": "skipped", "reason": skipped[name], **pools.get(name, {})}
        elif name in per_call.services and name in pooled.services:
            services[name] = _service(
                name,
                per_call.services[name],
                pooled.services[name],
                pooled,
                pools.get(name, {}),
            )
    return {
        "settings": dict(settings),
        "services": services,
        "runs": {"per_call": _run(per_call), "pooled": _run(pooled)},
        **(extra or {}),
    }


# -- the table ------------------------------------------------------------------------------------


def _ms(value: Any, *, approx: bool = False) -> str:
    if value is None:
        return "-"
    v = float(value)
    if abs(v) < 1:
        text = f"{v:.3f}"
    elif abs(v) < 100:
        text = f"{v:.1f}"
    else:
        text = f"{v:.0f}"
    return ("~" if approx else "") + text


def render_table(report: Mapping[str, Any]) -> list[str]:
    """The per-service table and the turn summary, as lines of at most 100 characters."""
    head = (
        f"{'':<8}{'':>9} | {'first turn, p50 (ms)':^24} | {'later turns, p50':^16} |"
        f" {'acquire wait (ms)':^20} |"
    )
    sub = (
        f"{'service':<8}{'handshake':>9} | {'per call':>8} {'pooled':>7} {'saved':>7} |"
        f" {'per call':>8} {'pooled':>7} | {'p50':>6} {'p95':>6} {'p99':>6} | exhausted"
    )
    rule = "-" * len(sub)
    lines = [head, sub, rule]
    notes: list[str] = []
    for name, svc in report["services"].items():
        if svc["status"] != "ok":
            reason = textwrap.wrap(str(svc["reason"]), width=len(sub) - 20)
            for i, part in enumerate(reason or [""]):
                lines.append(
                    f"{name if i == 0 else '':<8}{'skipped' if i == 0 else '':>9} | {part}"
                )
            continue
        hs = svc["handshake_ms"]
        pc, po = svc["per_call"], svc["pooled"]
        wait = po["acquire_wait_ms"]
        lines.append(
            f"{name:<8}{_ms(hs['p50'], approx=hs['derived']):>9} |"
            f" {_ms(pc['first_turn_ms']['p50']):>8} {_ms(po['first_turn_ms']['p50']):>7}"
            f" {_ms(svc['first_turn_saved_ms']):>7} |"
            f" {_ms(pc['later_turn_ms']['p50']):>8} {_ms(po['later_turn_ms']['p50']):>7} |"
            f" {_ms(wait['p50']):>6} {_ms(wait['p95']):>6} {_ms(wait['p99']):>6} |"
            f" {po['exhausted']:>9}"
        )
        if hs["derived"]:
            notes.append(
                f"~ {name}: its socket opens inside the first request: handshake = first - later"
            )
    lines.append(rule)
    lines.append(
        "handshake: opening a connection, paid inside the call when connecting per call;"
        " first turn:"
    )
    lines.append(
        "latency to the first byte of the service's first answer in a call, setup included; acquire"
    )
    lines.append("wait: time in pool.acquire(); exhausted: acquires that waited at max_size.")
    lines.extend(notes)
    runs = report["runs"]
    first_pc = runs["per_call"]["response_ms"]["first_turn"]["p50"]
    first_po = runs["pooled"]["response_ms"]["first_turn"]["p50"]
    later_pc = runs["per_call"]["response_ms"]["later_turns"]["p50"]
    later_po = runs["pooled"]["response_ms"]["later_turns"]["p50"]
    lines.append("")
    lines.append("turn response, caller stops speaking -> first byte of audio back (p50):")
    if first_pc is not None and first_po is not None:
        ratio = f", {first_pc / first_po:.1f}x" if first_po > 0 else ""
        lines.append(
            f"  first turn   connecting per call {_ms(first_pc):>6} ms   pooled {_ms(first_po):>6}"
            f" ms   ({_ms(first_pc - first_po)} ms faster{ratio})"
        )
    if later_pc is not None and later_po is not None:
        lines.append(
            f"  later turns  connecting per call {_ms(later_pc):>6} ms   pooled {_ms(later_po):>6}"
            " ms   (both on open connections)"
        )
    return lines


# -- the chart ------------------------------------------------------------------------------------


def chart_available() -> bool:
    """Whether matplotlib can be imported (the ``chart`` extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_chart(report: Mapping[str, Any], path: Path) -> Path:
    """Draw first-turn and later-turn p50 latency per service, per call vs pooled, into ``path``.

    Raises ImportError without matplotlib, OSError when the file cannot be written.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: never open a window
    import matplotlib.pyplot as plt

    ran = {n: s for n, s in report["services"].items() if s["status"] == "ok"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    width = 0.38
    for ax, key, title in (
        (axes[0], "first_turn_ms", "first turn of a call"),
        (axes[1], "later_turn_ms", "later turns"),
    ):
        names = [n for n, s in ran.items() if s["pooled"][key]["n"]]  # sip has no later turns
        xs = list(range(len(names)))
        per_call = [report["services"][n]["per_call"][key]["p50"] or 0.0 for n in names]
        pooled = [report["services"][n]["pooled"][key]["p50"] or 0.0 for n in names]
        ax.bar(
            [x - width / 2 for x in xs], per_call, width, label="connect per call", color="#c0504d"
        )
        ax.bar(
            [x + width / 2 for x in xs], pooled, width, label="voicepool (pooled)", color="#4f81bd"
        )
        ax.set_xticks(xs, names)
        ax.set_title(f"{title}: latency to first byte, p50")
        ax.set_ylabel("ms")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    s = report["settings"]
    fig.suptitle(
        f"voicepool demo: {s['calls']} calls x {s['turns']} turns at {s['rtt_ms']:g} ms RTT"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path

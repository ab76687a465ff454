"""The ``voicepool`` command: ``demo``, ``probe``, ``check`` and ``emulate``.

::

    voicepool demo [--calls 20] [--turns 3] [--rtt 40] [--exhaust] [--json]
    voicepool probe URL... [-n 5] [--json]      wss://, https://, sip: endpoints
    voicepool check [CONFIG] [--json]          validate settings, connect each pool once
    voicepool emulate SERVICE... [--rtt 40] [--tls] [--json]   local provider emulators

A subcommand's module is imported only when it runs, so ``voicepool probe`` does not pay for the
demo's imports. :func:`main` returns the exit status; the console script exits with it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    from voicepool import __version__

    parser = argparse.ArgumentParser(
        prog="voicepool",
        description="Warm, health-checked connection pools for voice-agent workers.",
    )
    parser.add_argument("--version", action="version", version=f"voicepool {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="per-call connections vs warm pools, on local emulators (no account, no network)",
        description="Run simulated voice calls against local emulators of ASR, TTS, LLM, REST and"
        " SIP services at a realistic round-trip time, connecting per call and then from warm"
        " pools, and compare latency to first byte per service.",
    )
    demo.add_argument("--calls", type=int, default=20, help="concurrent calls (default 20)")
    demo.add_argument("--turns", type=int, default=3, help="turns per call (default 3)")
    demo.add_argument(
        "--rtt", type=float, default=40.0, help="round trip to every service, ms (default 40)"
    )
    demo.add_argument(
        "--exhaust",
        action="store_true",
        help="shrink the TTS pool to one socket: exhaustion span events and the p95 alarm",
    )
    demo.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    demo.add_argument(
        "--chart",
        type=Path,
        default=Path("voicepool-demo.png"),
        help="PNG chart file (default voicepool-demo.png; needs the chart extra)",
    )
    demo.add_argument("--no-chart", action="store_true", help="do not draw the chart")
    demo.add_argument("-v", "--verbose", action="store_true", help="log voicepool at INFO")

    probe = sub.add_parser(
        "probe",
        help="cold-connection breakdown and warm round trip of endpoints",
        description="Measure what a cold connection to each endpoint costs (DNS, TCP, TLS, then"
        " the WebSocket upgrade, the first HTTP/2 frame or the REGISTER round trips) and what a"
        " warm round trip costs, N times, and print the medians.",
    )
    probe.add_argument("urls", nargs="+", metavar="URL", help="wss://, ws://, https://, sip:")
    probe.add_argument("-n", "--count", type=int, default=5, help="repetitions (default 5)")
    probe.add_argument("--timeout", type=float, default=10.0, help="per step, seconds")
    probe.add_argument("--ca-file", help="PEM CA bundle to trust instead of the system's")
    probe.add_argument(
        "--insecure", action="store_true", help="do not verify TLS certificates (local tests)"
    )
    probe.add_argument(
        "-H",
        "--header",
        action="append",
        default=[],
        metavar="NAME:VALUE",
        help="extra header for WebSocket and HTTP requests (repeatable; e.g. an API key)",
    )
    probe.add_argument("--sip-user", help="digest user for the REGISTER (default: none)")
    probe.add_argument("--sip-password", help="digest password (or VOICEPOOL_PROBE_SIP_PASSWORD)")
    probe.add_argument("--json", action="store_true", help="print the results as JSON")

    check = sub.add_parser(
        "check",
        help="validate a settings file and the environment, connect each pool once",
        description="Validate the settings (TOML file, VOICEPOOL_* environment, .env), then"
        " open one connection per pool and report each pool ok or failing with the reason."
        " Exit status 0 when every pool connects, 1 when one fails, 2 when the settings are"
        " invalid.",
    )
    check.add_argument(
        "config", nargs="?", type=Path, help="TOML file (default: VOICEPOOL_CONFIG, else none)"
    )
    check.add_argument("--timeout", type=float, default=None, help="per connect (default: pool's)")
    check.add_argument(
        "--required-only",
        action="store_true",
        help="only failing required pools fail the check (optional ones are reported)",
    )
    check.add_argument("--json", action="store_true", help="print the results as JSON")

    from voicepool.cli import emulate

    emulate.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``voicepool`` with ``argv`` (default: the process arguments); return the exit status."""
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (``voicepool demo | head``): stop quietly, like other CLI tools,
        # and keep the interpreter's final flush from raising again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141


def _main(argv: Sequence[str] | None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(list(argv) if argv is not None else sys.argv[1:])
    if extra:
        # argparse stops collecting probe URLs at the first option (probe URL -H ... URL):
        # URLs after options land here.
        if args.command != "probe" or any(item.startswith("-") for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.urls.extend(extra)
    if args.command == "demo":
        try:
            from voicepool.cli import demo
        except ModuleNotFoundError as exc:
            return _missing_extra(exc)
        return demo.run(args)
    if args.command == "probe":
        from voicepool.cli import probe

        return probe.run(args)
    if args.command == "emulate":
        from voicepool.cli import emulate

        try:
            import voicepool.testing  # noqa: F401  (the emulators need the testing extra)
        except ModuleNotFoundError as exc:
            return _missing_extra(exc)
        return emulate.run(args)
    if args.command == "check":
        from voicepool.cli import check

        return check.run(args)
    parser.print_help()
    return 2


# The packages an optional extra brings, and the extra to name in the hint.
_EXTRA_OF = {"trustme": "testing", "cryptography": "testing"}


def _missing_extra(exc: ModuleNotFoundError) -> int:
    """Exit status 2 with an install hint when a subcommand's optional extra is not installed."""
    extra = _EXTRA_OF.get((exc.name or "").partition(".")[0])
    if extra is None:
        raise exc
    print(
        f"voicepool: this command needs the `{extra}` extra ({exc.name} is not installed): "
        f"pip install 'voicepool[{extra}]'",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())

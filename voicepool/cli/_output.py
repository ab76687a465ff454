"""Terminal output for the CLI: lines, one live status line (on a terminal), and a log handler.

On a terminal the status line is redrawn in place (``\\r`` + erase); lines printed meanwhile (log
records, span events) are written above it. Elsewhere (a pipe, a CI log, ``--json`` with stderr
redirected) status updates are dropped and callers print milestones as plain lines instead.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import TextIO

__all__ = ["Console", "ConsoleLogHandler"]

_ERASE = "\r\033[K"


class Console:
    """Writes lines to ``stream`` without tearing a live status line. Thread-safe."""

    def __init__(self, stream: TextIO | None = None, *, live: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        if live is None:
            isatty = getattr(self.stream, "isatty", None)
            live = bool(isatty and isatty())
        self.live = live
        self._status = ""
        self._lock = threading.Lock()

    def line(self, text: str = "") -> None:
        """Print one line (above the status line, which is redrawn)."""
        with self._lock:
            if self._status:
                self.stream.write(_ERASE)
            self.stream.write(text + "\n")
            if self._status:
                self.stream.write(self._status)
            self.stream.flush()

    def status(self, text: str) -> None:
        """Replace the live status line (ignored when not live)."""
        if not self.live:
            return
        with self._lock:
            self._status = text
            self.stream.write(_ERASE + text)
            self.stream.flush()

    def clear_status(self) -> None:
        with self._lock:
            if self._status:
                self.stream.write(_ERASE)
                self.stream.flush()
            self._status = ""


class ConsoleLogHandler(logging.Handler):
    """Log records as ``level logger: message`` lines on a :class:`Console`."""

    def __init__(self, console: Console, level: int = logging.WARNING) -> None:
        super().__init__(level)
        self.console = console
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            self.console.line(f"{record.levelname.lower()} {record.name}: {text}")
        except Exception:
            self.handleError(record)

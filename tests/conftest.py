"""Shared test configuration. Every server a test starts listens on 127.0.0.1 only."""

from __future__ import annotations

import pytest

_rerun_reports: list[pytest.TestReport] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Keep the first failure of a test that passed on its rerun (``make test`` runs with
    ``--reruns 1``): the rerun summary names the test, and this says which line failed."""
    if str(report.outcome) == "rerun":  # (pytest-rerunfailures' outcome: not in pytest's type)
        _rerun_reports.append(report)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for report in _rerun_reports:
        terminalreporter.write_sep("-", f"failed before its rerun: {report.nodeid}")
        terminalreporter.write_line(report.longreprtext)

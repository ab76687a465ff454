"""Shared test configuration. Every server a test starts listens on 127.0.0.1 only."""

from __future__ import annotations

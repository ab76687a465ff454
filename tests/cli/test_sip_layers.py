"""SIP message code is written once (voicepool._sip); the probe modules import one way."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "voicepool"


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, at any level (imports under TYPE_CHECKING included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_the_sip_probe_does_not_import_the_probes_back() -> None:
    assert "voicepool.cli._sipprobe" in imports_of(ROOT / "cli" / "_probes.py")
    assert "voicepool.cli._probes" not in imports_of(ROOT / "cli" / "_sipprobe.py")


def test_sip_messages_and_digest_live_in_one_sans_io_module() -> None:
    shared = imports_of(ROOT / "_sip.py")
    assert not {m for m in shared if m.startswith(("voicepool", "asyncio", "socket"))}, shared
    for user in (ROOT / "cli" / "_sipprobe.py", ROOT / "testing" / "sip_registrar.py"):
        assert "voicepool._sip" in imports_of(user)
        source = user.read_text()
        assert "hashlib" not in source, f"{user.name} computes a digest of its own"
        assert "def parse_digest" not in source
        assert "def digest_response" not in source

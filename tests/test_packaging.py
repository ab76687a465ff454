"""The wheel carries every package, including the repo folder adapters/ as voicepool.adapters."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import voicepool

ROOT = Path(__file__).resolve().parent.parent


def _source_packages() -> set[str]:
    found = set()
    for base, dotted in (("voicepool", "voicepool"), ("adapters", "voicepool.adapters")):
        for init in (ROOT / base).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / base)
            found.add(".".join([dotted, *rel.parts]) if rel.parts else dotted)
    return found


def test_every_package_is_listed_in_pyproject() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    assert _source_packages() == listed


@pytest.mark.timeout(180)
def test_wheel_contains_every_package(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
    )
    wheel = next(tmp_path.glob("voicepool-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for package in _source_packages():
        assert package.replace(".", "/") + "/__init__.py" in names, package
    assert "voicepool/py.typed" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[voicepool.adapters]" in text


def test_public_exports_match_design() -> None:
    expected = {
        "Adapter",
        "LeaseMode",
        "get_adapter",
        "register_adapter",
        "registered_adapters",
        "Lease",
        "Pool",
        "PoolSettings",
        "PoolState",
        "PoolStats",
        "GroupPolicy",
        "PoolGroup",
        "AdapterNotFound",
        "ConfigError",
        "ConnectError",
        "LeaseReleased",
        "PoolClosed",
        "PoolError",
        "PoolExhausted",
        "PoolUnavailable",
        "VoicepoolError",
    }
    assert expected <= set(voicepool.__all__)
    for name in voicepool.__all__:
        assert hasattr(voicepool, name), name


def test_core_never_imports_adapters() -> None:
    """Layers point downward: the core reaches adapters through entry points only.

    The top layer (the CLI and the demo, like examples/) embeds concrete adapters and may, and so
    may voicepool.integrations (above the manager: DESIGN.md, layers).
    """
    top = {
        ROOT / "voicepool" / "cli",
        ROOT / "voicepool" / "demo",
        ROOT / "voicepool" / "cli.py",
        ROOT / "voicepool" / "integrations",
    }
    for path in (ROOT / "voicepool").rglob("*.py"):
        if any(path == t or t in path.parents for t in top):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module]
            elif isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            else:
                continue
            for module in modules:
                assert not module.startswith(("voicepool.adapters", "adapters")), (path, module)


def test_frameworks_are_imported_by_voicepool_integrations_only() -> None:
    """Pipecat and LiveKit are extras: no library module outside voicepool.integrations (and no
    adapter) imports them."""
    frameworks = ("pipecat", "livekit")
    for base in (ROOT / "voicepool", ROOT / "adapters"):
        for path in base.rglob("*.py"):
            if ROOT / "voicepool" / "integrations" in path.parents:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    modules = [node.module]
                elif isinstance(node, ast.Import):
                    modules = [a.name for a in node.names]
                else:
                    continue
                for module in modules:
                    assert module.split(".")[0] not in frameworks, (path, module)


def test_version_is_the_projects() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert voicepool.__version__ == config["project"]["version"]

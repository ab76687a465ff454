"""The README and docs/ against the code: generated reference blocks are current, every telemetry
name is documented (and nothing documented is invented), the quickstart is two commands, and the
Python examples at least parse."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tools import docgen
from voicepool.cli import main
from voicepool.pool_settings import PoolSettings
from voicepool.telemetry import names

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _names() -> set[str]:
    return {
        value
        for key, value in vars(names).items()
        if key.isupper() and isinstance(value, str) and key != "SCOPE"
    }


def _section(title: str) -> str:
    found = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.M | re.S)
    assert found is not None, title
    return found.group(1)


def test_generated_blocks_match_the_code() -> None:
    assert docgen.check(ROOT) == {}, "run: python -m tools.docgen"


def test_every_generated_block_is_present() -> None:
    texts = README + "".join(
        (ROOT / name).read_text(encoding="utf-8") for name in docgen.FILES if name != "README.md"
    )
    for block in docgen.BLOCKS:
        assert f"<!-- generated:{block}" in texts, block
        assert f"<!-- end:{block} -->" in texts, block


def test_readme_documents_every_pool_setting() -> None:
    reference = _section("Configuration")
    for field in PoolSettings.model_fields:
        assert f"| `{field}` |" in reference, field


def test_readme_documents_every_telemetry_name_and_no_other() -> None:
    telemetry = _section("Telemetry")
    documented = set(re.findall(r"`((?:voicepool|error)\.[a-z0-9_.]+|state|reason)`", telemetry))
    emitted = _names()
    assert emitted <= documented, sorted(emitted - documented)
    loggers = {"voicepool.pool"}  # the prose names the alarm's logger too
    invented = documented - emitted - loggers - {names.SCOPE}
    assert not invented, sorted(invented)


def test_quickstart_is_exactly_two_commands() -> None:
    quickstart = _section("Quickstart")
    block = re.search(r"```sh\n(.*?)```", quickstart, re.S)
    assert block is not None
    assert block.group(1).splitlines() == ["make demo", "make test"]


def test_python_examples_parse() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert len(blocks) >= 2
    for code in blocks:
        ast.parse(code)


def test_embedding_example_is_about_twenty_lines() -> None:
    example = re.findall(r"```python\n(.*?)```", _section("Embedding voicepool in a worker"), re.S)
    assert len(example) == 1
    lines = [line for line in example[0].splitlines() if line.strip()]
    assert 15 <= len(lines) <= 24, len(lines)


def test_docgen_check_command_reports_stale_blocks(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    stale = "<!-- generated:pool-settings -->\nold\n<!-- end:pool-settings -->\n"
    (tmp_path / "README.md").write_text(stale)
    for name in docgen.FILES[1:]:
        (tmp_path / name).write_text("no blocks\n")
    assert docgen.check(tmp_path) == {"README.md": ["pool-settings"]}
    assert docgen.main(["--root", str(tmp_path)]) == 0  # rewrites
    assert docgen.check(tmp_path) == {}
    assert "| `concurrency` |" in (tmp_path / "README.md").read_text()


@pytest.mark.parametrize("command", ["demo", "probe", "check"])
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    assert f"usage: voicepool {command}" in capsys.readouterr().out


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out

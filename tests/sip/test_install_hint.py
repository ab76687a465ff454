"""`voicepool[sip]` where PyPI has no pjsua2 wheel: the first use says so, and what to do."""

from __future__ import annotations

from voicepool.adapters.sip._binding import install_hint


def test_where_a_wheel_exists_the_hint_is_the_extra() -> None:
    hint = install_hint((3, 12), "x86_64", "Linux")
    assert "pip install 'voicepool[sip]'" in hint


def test_where_no_wheel_exists_the_hint_says_so() -> None:
    for version, machine, system in [
        ((3, 13), "x86_64", "Linux"),
        ((3, 12), "aarch64", "Linux"),
        ((3, 11), "arm64", "Darwin"),
    ]:
        hint = install_hint(version, machine, system)
        assert "no wheel" in hint
        assert f"{version[0]}.{version[1]}" in hint
        assert machine in hint
        assert "installs nothing here" in hint
        assert "3.10-3.12 on x86_64 Linux" in hint

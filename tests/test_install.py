"""The built wheel in a fresh virtual environment, no extras: what a user gets from ``pip install``.

``import voicepool`` works, a pool over a user's own adapter lends connections, and the commands
that need the ``testing`` extra (``voicepool demo``) say which extra to install instead of a
traceback. Slow (a venv and an install from the package index or pip's cache): one test.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

USER_PROGRAM = textwrap.dedent(
    """
    import asyncio
    import importlib.util

    import voicepool
    from voicepool import Adapter, LeaseMode, Pool, PoolSettings

    assert importlib.util.find_spec("trustme") is None, "trustme must be an extra"


    class Counter:
        def __init__(self) -> None:
            self.open = True


    class CounterAdapter(Adapter[Counter]):
        lease_mode = LeaseMode.EXCLUSIVE

        async def connect(self) -> Counter:
            return Counter()

        async def ping(self, conn: Counter) -> None:
            pass

        def is_open(self, conn: Counter) -> bool:
            return conn.open

        async def close(self, conn: Counter) -> None:
            conn.open = False


    async def main() -> None:
        settings = PoolSettings(min_size=2, max_size=2)
        async with Pool(CounterAdapter(), settings, name="user") as pool:
            async with pool.acquire() as lease:
                assert lease.conn.open
            assert pool.stats().size == 2
        print("ok", voicepool.__version__)


    asyncio.run(main())
    """
)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_wheel_without_extras_in_a_fresh_venv(tmp_path: Path) -> None:
    wheel_dir = tmp_path / "dist"
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
            str(wheel_dir),
            str(ROOT),
        ],
        check=True,
    )
    wheel = next(wheel_dir.glob("voicepool-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", str(wheel)], check=True)

    program = tmp_path / "user.py"
    program.write_text(USER_PROGRAM)
    done = subprocess.run(
        [str(python), str(program)], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok ")

    for command in (["demo"], ["emulate", "llm"]):
        run = subprocess.run(
            [str(venv / "bin" / "voicepool"), *command],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=60,
        )
        assert run.returncode == 2, (command, run.stdout, run.stderr)
        assert "pip install 'voicepool[testing]'" in run.stderr
        assert "Traceback" not in run.stderr

"""The whole tree is ruff-clean under the configuration in pyproject.toml ([tool.ruff]; ruff pinned in the test
extra): a finding fails the suite like a failing test."""

from __future__ import annotations

import subprocess
import sys

from multiproc import HANG_GUARD_S, REPO


def test_ruff_finds_nothing():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=REPO, capture_output=True,
                          text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, f"ruff check . found:\n{proc.stdout}{proc.stderr}"

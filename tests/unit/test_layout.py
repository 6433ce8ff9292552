"""The test tiers: every test file lives in a tier folder, the default command runs only the default tiers,
and `-m "builds or full"` (CI's second call) selects tests that really run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import DEFAULT_TIERS, TIERS

TESTS = Path(__file__).resolve().parents[1]


def test_every_test_file_is_in_a_tier_folder():
    outside = sorted(p.relative_to(TESTS).as_posix() for p in TESTS.rglob("test_*.py") if p.relative_to(TESTS).parts[0] not in TIERS)
    assert outside == [], f"move these into tests/{'|'.join(TIERS)}/ (see tests/conftest.py): {outside}"
    for tier in TIERS:
        assert list((TESTS / tier).glob("test_*.py")), tier


def collected(*args: str) -> dict[str, set[str]]:
    """tier -> node ids that `pytest --collect-only` selects with these arguments, from the repository root."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                          capture_output=True, text=True, cwd=TESTS.parent, env={**os.environ, "CI": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    tiers: dict[str, set[str]] = {}
    for line in proc.stdout.splitlines():
        if "::" in line:
            parts = Path(line.split("::")[0]).parts
            tiers.setdefault(parts[1] if len(parts) > 2 else "unit", set()).add(line)
    return tiers


def test_the_default_command_selects_the_default_tiers_and_ci_selects_the_others():
    default = collected()
    assert set(default) == set(DEFAULT_TIERS)
    slower = collected("-m", "builds or full")
    assert set(slower) <= set(TIERS) and slower.get("builds") and slower.get("full")
    # tests in a fast folder that ask for a slower tier (a variant sweep, say) run there, not by default
    moved = set().union(*(slower.get(tier, set()) for tier in DEFAULT_TIERS))
    assert moved and not moved & set().union(*default.values())

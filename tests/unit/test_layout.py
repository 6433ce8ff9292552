"""The test tiers: every test file lives in a tier folder, the default command runs only the default tiers,
and `-m "builds or full"` (CI's second call) selects tests that really run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import TIERS, tier_of

TESTS = Path(__file__).resolve().parents[1]


def test_every_test_file_is_in_a_tier_folder():
    outside = sorted(p.relative_to(TESTS).as_posix() for p in TESTS.rglob("test_*.py") if p.relative_to(TESTS).parts[0] not in TIERS)
    assert outside == [], f"move these into tests/{'|'.join(TIERS)}/ (see tests/conftest.py): {outside}"
    for tier in TIERS:
        assert list((TESTS / tier).glob("test_*.py")), tier



class FakeItem:
    def __init__(self, folder: str, fixtures=(), marks=()):
        self.path, self.nodeid = TESTS / folder / "test_x.py", f"tests/{folder}/test_x.py::test_x"
        self.fixturenames, self.marks = list(fixtures), [SimpleNamespace(name=name) for name in marks]

    def iter_markers(self):
        return iter(self.marks)


def test_the_tier_is_the_folders_unless_a_marker_asks_for_a_slower_one():
    assert tier_of(FakeItem("unit")) == "unit" and tier_of(FakeItem("builds", ["l0_export"])) == "builds"
    assert tier_of(FakeItem("export", ["l0_export"], ["full", "heavy"])) == "full"
    assert tier_of(FakeItem("unit", ["copy_export"], ["export"])) == "export"
    with pytest.raises(pytest.UsageError, match="a unit test uses l0_export; move it to tests/export"):
        tier_of(FakeItem("unit", ["l0_export"]))
    with pytest.raises(pytest.UsageError, match="marked unit but lives in tests/builds"):
        tier_of(FakeItem("builds", marks=["unit"]))

# One file per tier, one test in an export-tier file that asks for the builds tier, and a unit file with a heavy
# test (tier full): small to import, so collecting them is quick. The default selection is what pytest does
# with no path (here: these files).
SAMPLE = {"unit": "tests/unit/test_readme.py", "export": "tests/export/test_graph_passes.py",
          "builds": "tests/builds/test_export_memory.py", "full": "tests/full/test_app_profile_xl0.py"}
MOVED_UP = "tests/export/test_graph_passes.py::test_export_without_graph_passes_keeps_the_resize"
WITH_HEAVY = "tests/unit/test_realistic.py"


def collected(*args: str) -> set[str]:
    """Node ids that `pytest --collect-only` selects from SAMPLE with these arguments, as CI would run it."""
    paths = " ".join([*SAMPLE.values(), WITH_HEAVY])
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "-o", f"testpaths={paths}", *args],
                          capture_output=True, text=True, cwd=TESTS.parent, env={**os.environ, "CI": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return {line for line in proc.stdout.splitlines() if "::" in line}


def test_the_default_command_selects_the_default_tiers_and_ci_selects_the_others():
    files = lambda nodes: {node.split("::")[0] for node in nodes}  # noqa: E731
    default, slower = collected(), collected("-m", "builds or full")
    assert files(default) == {SAMPLE["unit"], SAMPLE["export"], WITH_HEAVY}
    assert files(slower) == {SAMPLE["builds"], SAMPLE["full"], SAMPLE["export"], WITH_HEAVY}
    assert MOVED_UP in slower and MOVED_UP not in default  # a marker moves a test up a tier
    assert not default & slower
    # naming a path runs every tier under it, without -m
    assert collected(SAMPLE["builds"]) == {node for node in slower if node.startswith(SAMPLE["builds"])}
    # --run-heavy adds the heavy tests (and only them) to the default tiers
    heavy = collected("--run-heavy") - default
    assert heavy and files(heavy) == {WITH_HEAVY} and heavy <= slower

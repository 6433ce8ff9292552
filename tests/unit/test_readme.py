"""The README's two set-up commands are what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    setup = ROOT.joinpath("README.md").read_text().split("## Set up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", setup, flags=re.S)


def test_readme_has_exactly_two_setup_commands_and_ci_runs_them():
    commands = readme_commands()
    assert len(commands) == 2, commands
    install, tests = commands
    ci = ROOT.joinpath(".ci", "run").read_text()
    ci_lines = [line.strip().removesuffix("\\").strip() for line in ci.splitlines()]
    assert install.strip() in ci_lines and tests.strip() in ci_lines
    assert "pytest" in tests and "torch==2.13.0" in install and ".[dev]" in install
    assert '-eq 5' in ci  # pytest's "no tests collected" fails CI


def test_slower_tiers_lint_and_wheel_check_are_wired():
    """CI runs the slower test tiers after the README's command, each call failing on pytest's exit 5;
    it lints and runs the wheel."""
    import tomllib

    pyproject = tomllib.loads(ROOT.joinpath("pyproject.toml").read_text())
    markers = pyproject["tool"]["pytest"]["ini_options"]["markers"]
    assert {marker.split(":")[0] for marker in markers} >= {"unit", "export", "builds", "full", "heavy"}
    assert any(dep.startswith("ruff") for dep in pyproject["project"]["optional-dependencies"]["dev"])
    ci = ROOT.joinpath(".ci", "run").read_text()
    assert 'python -m pytest -q -m "builds or full"' in ci.splitlines()
    assert ci.count("pytest_status ") == 2  # one exit check per pytest call
    assert "ruff check ." in ci and "pip wheel" in ci and "--system-site-packages" not in ci
    for command in ("run cpu-ort-fp32", "validate X", "predict X"):
        assert f'"$bin/evsam-export" {command}' in ci, command

"""The README's two set-up commands are what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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

"""Fixtures shared by the test modules: one synthetic-weight l0 export per session, quick parity suites."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from evsam_export import api
from evsam_export.parity.suites import validators_dir
from evsam_export.progress import Reporter


def pytest_addoption(parser):
    parser.addoption("--run-heavy", action="store_true", help="also run the heavy tests: whole recipes, checkpoint training")


def pytest_collection_modifyitems(config, items):
    """Heavy tests would take CI past an hour on 2 cores; they run on request and their numbers are in docs."""
    if config.getoption("--run-heavy"):
        return
    skip = pytest.mark.skip(reason="heavy (a whole recipe run or checkpoint training): run with --run-heavy")
    for item in items:
        if "heavy" in item.keywords:
            item.add_marker(skip)


def quick_suite_text(name: str, kinds: tuple[str, ...]) -> str:
    """A one-image suite with the shipped default.toml tolerances (tests must not loosen them)."""
    default = (validators_dir() / "default.toml").read_text()
    header = f"""
[suite]
name = "{name}"
description = "one synthetic scene, {', '.join(kinds)} prompts, the shipped default tolerances"

[[suite.images]]
synthetic = 0
size = [240, 320]

[suite.prompts]
kinds = {list(kinds)!r}
seed = 0

""".replace("'", '"')
    return header + default[default.index("[tolerances.fp32]"):]


@pytest.fixture(scope="session")
def quick_suite(tmp_path_factory) -> Path:
    """point, box and 16-box prompts on one scene."""
    path = tmp_path_factory.mktemp("suite") / "quick.toml"
    path.write_text(quick_suite_text("quick", ("point", "box", "boxes16")))
    return path


@pytest.fixture(scope="session")
def gate_suite(tmp_path_factory) -> Path:
    """point and box prompts on one scene: the cheapest suite a build-time gate can run."""
    path = tmp_path_factory.mktemp("suite") / "gate-quick.toml"
    path.write_text(quick_suite_text("gate-quick", ("point", "box")))
    return path


@pytest.fixture(scope="session")
def l0_export(tmp_path_factory) -> Path:
    """`evsam-export export` of synthetic-weight l0 (defaults), once per session. Read-only: tests that
    add artifacts or edit files take `copy_export`."""
    folder = tmp_path_factory.mktemp("export") / "l0"
    api.export("l0", folder, reporter=Reporter(quiet=True))
    return folder


@pytest.fixture(scope="session")
def copy_export(l0_export, tmp_path_factory):
    """copy_export(name) -> a private copy of the session's l0 export."""

    def make(name: str = "l0") -> Path:
        folder = tmp_path_factory.mktemp(name) / "l0"
        shutil.copytree(l0_export, folder)
        return folder

    return make



@pytest.fixture(scope="module")
def module_cache_dir(tmp_path_factory):
    """$EVSAM_CACHE_DIR for one test module (calibration ranges, quantized models): never the user's cache."""
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("evsam-cache")
        patch.setenv("EVSAM_CACHE_DIR", str(folder))
        yield folder

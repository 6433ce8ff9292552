"""Test tiers and the fixtures the test modules share.

Tiers, one folder each, slowest last (the marker of a test is its folder's, set here):

- `unit`: no exported folder; at most an in-memory model or a few small graphs built on the spot.
- `export`: reads or copies the session's one l0 export (`l0_export`, `copy_export`) or the shared folders
  built from it.
- `builds`: real precision and target builds (INT8 calibration, OpenVINO IR, the browser runtime), exports
  with other options.
- `full`: every variant, whole recipe runs, upstream sweeps, whole command runs over data sets (evaluate on a
  COCO set, validate on annotations or an image folder, task gating on ground truth).

`python -m pytest -q` runs the default tiers (unit, export); naming paths runs every tier under them, and
`-m` selects tiers by marker (CI: `-m "builds or full"`). A test in a fast folder that needs more says so with
the slower tier's marker (`@pytest.mark.full`, also on a parameter); a marker may only move a test to a slower
tier. `heavy` tests (whole recipes on the user's data, checkpoint training) are skipped on top unless
`--run-heavy`, which without a path or -m also adds them to the default tiers' run.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from evsam_export import api
from evsam_export.parity.suites import validators_dir
from evsam_export.progress import Reporter

TESTS = Path(__file__).resolve().parent
TIERS = ("unit", "export", "builds", "full")
DEFAULT_TIERS = ("unit", "export")
# Fixtures that export: a unit test may not use them.
EXPORT_FIXTURES = {"l0_export", "copy_export", "seeded_step_cache", "variant_export"}


def pytest_addoption(parser):
    parser.addoption("--run-heavy", action="store_true", help="also run the heavy tests: whole recipes, checkpoint training")


def tier_of(item) -> str:
    """The folder's tier, or the slower tier a marker on the test asks for. A test file outside the tier
    folders counts as `unit` here (so it runs by default) and fails tests/unit/test_layout.py."""
    parts = Path(item.path).resolve().relative_to(TESTS).parts
    folder = parts[0] if len(parts) > 1 and parts[0] in TIERS else "unit"
    asked = [mark.name for mark in item.iter_markers() if mark.name in TIERS]
    for name in asked:
        if TIERS.index(name) < TIERS.index(folder):
            raise pytest.UsageError(f"{item.nodeid}: marked {name} but lives in tests/{folder}; move it to tests/{name}")
    tier = max([folder, *asked], key=TIERS.index)
    exports = sorted(EXPORT_FIXTURES & set(getattr(item, "fixturenames", ())))
    if tier == "unit" and exports:
        raise pytest.UsageError(f"{item.nodeid}: a unit test uses {', '.join(exports)}; move it to tests/export (or mark it export)")
    return tier


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m selection, which reads the tier markers
def pytest_collection_modifyitems(config, items):
    """Mark every test with its tier, keep the default tiers when no path and no -m was given, and skip the
    heavy tests unless --run-heavy (they would take CI past an hour on 2 cores; their numbers are in docs)."""
    for item in items:
        tier = tier_of(item)
        if item.get_closest_marker(tier) is None:
            item.add_marker(tier)
        item.user_properties.append(("tier", tier))
    chose_paths = config.args_source == pytest.Config.ArgsSource.ARGS
    run_heavy = config.getoption("--run-heavy")
    if not chose_paths and not config.option.markexpr:  # the default tiers, and the heavy tests if asked
        kept = [item for item in items
                if dict(item.user_properties)["tier"] in DEFAULT_TIERS or (run_heavy and "heavy" in item.keywords)]
        if len(kept) < len(items):
            config.hook.pytest_deselected(items=[item for item in items if item not in kept])
            items[:] = kept
    if not run_heavy:
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

@pytest.fixture(scope="session")
def variant_export(tmp_path_factory):
    """variant_export(name) -> that variant's export of its synthetic:5 weights, loaded from a checkpoint saved
    in the upstream release layout; exported once per session for every test of the variant sweeps."""
    folders: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in folders:
            import torch

            from evsam_export.model.checkpoint import load_model
            from evsam_export.model.variants import VARIANTS

            folder = tmp_path_factory.mktemp(f"variant-{name}")
            checkpoint = folder / f"efficientvit_sam_{name}.pt"
            ours, _ = load_model(VARIANTS[name], "synthetic:5")
            torch.save({"state_dict": ours.state_dict()}, checkpoint)  # the upstream release layout
            del ours
            api.export(name, folder / "out", checkpoint=str(checkpoint), reporter=Reporter(quiet=True))
            checkpoint.unlink()
            folders[name] = folder / "out"
        return folders[name]

    return get


# A cpu-ort-fp32 recipe without the split decoder and without validation: export, ORT encoder, ORT decoder.
# The step-cache tests are about the cache; the split halves through the ORT step are
# tests/export/test_split_lowering.py's, the release gate tests/export/test_validate.py's.
UNVALIDATED_ORT_FP32 = 'extends = "cpu-ort-fp32"\n[recipe]\nname = "r"\n[export]\nsplit_decoder = false\n[validate]\nenabled = false\n'


@dataclass
class SeededCache:
    """One real run of UNVALIDATED_ORT_FP32 on l0 into an empty step cache: `first` is its result (every
    step built), `output` its folder, `root` the cache it filled. Tests take private copies (`copy`) to run
    against, store into or damage."""

    recipe_file: Path
    first: object  # pipeline.runner.RunResult
    output: Path
    root: Path

    def copy(self, folder: Path):
        from evsam_export.pipeline.cache import StepCache

        shutil.copytree(self.root, Path(folder) / "steps")
        return StepCache(Path(folder) / "steps")


@pytest.fixture(scope="session")
def seeded_step_cache(tmp_path_factory) -> SeededCache:
    """The recipe tests' one export: later runs of the same recipe reuse its steps from a copy of this cache."""
    from evsam_export.pipeline.recipe import load_recipe
    from evsam_export.pipeline.runner import StepCache, run_recipe

    base = tmp_path_factory.mktemp("seeded")
    recipe_file = base / "r.toml"
    recipe_file.write_text(UNVALIDATED_ORT_FP32)
    cache = StepCache(base / "cache" / "steps")
    first = run_recipe(load_recipe(recipe_file), "l0", base / "out", cache=cache, reporter=Reporter(quiet=True))
    return SeededCache(recipe_file, first, base / "out", cache.root)

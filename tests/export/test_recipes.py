"""Recipes: validated data, extends, --set, refusals with the field path; the cached runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import UNVALIDATED_ORT_FP32

from evsam_export.errors import RecipeError
from evsam_export.pipeline.auto import is_auto_recipe
from evsam_export.pipeline.recipe import load_recipe, recipes_dir
from evsam_export.pipeline.runner import StepCache, run_recipe


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_every_shipped_recipe_loads():
    names = sorted(p.stem for p in recipes_dir().glob("*.toml"))
    assert "cpu-ort-fp32" in names
    for name in names:
        if is_auto_recipe(name):  # several candidates: tests/export/test_auto.py
            continue
        recipe = load_recipe(name)
        assert recipe.name == name and recipe.target in ("ort", "openvino", "tensorrt", "web")


@pytest.mark.parametrize(
    "body, message",
    [
        ('[recipe]\nname = "x"\n[target]\nmethd = 1\n', "[target] methd: unknown key"),
        ('[recipe]\nname = "x"\n[export]\nopset = "seventeen"\n', "[export] opset: expected int"),
        ('[recipe]\nname = "x"\ntarget = "coreml"\n', "unknown target 'coreml'"),
        ('[recipe]\nname = "x"\n[precison]\nencoder = "int8"\n', "[precison]: unknown section"),
        ('[recipe]\nname = "x"\n[precision]\nencoder = "int4"\n', "[precision] encoder: 'int4' not one of"),
        ('[recipe]\nname = "x"\ntarget = "tensorrt"\n[export]\ndecoder_profile = "sam"\n', "needs 'tensorrt'"),
        ('[recipe\nname = "x"\n', "not valid TOML"),
        ('[recipe]\ndescription = "no name"\n', "[recipe] name: missing"),
    ],
)
def test_bad_recipes_are_refused_with_the_field_path(tmp_path, body, message):
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path / "bad.toml", body))
    assert message in info.value.one_line()
    assert "\n" not in info.value.one_line()


def test_extends_and_set_overrides(tmp_path):
    child = write(tmp_path / "child.toml",
                  'extends = "cpu-ort-fp32"\n[recipe]\nname = "child"\n[target]\noptimization = "basic"\n')
    recipe = load_recipe(child)
    assert recipe.name == "child" and recipe.target_settings["optimization"] == "basic"
    assert recipe.export["decoder_profile"] == "sam"  # inherited
    recipe = load_recipe(child, ["target.optimization=extended", "export.single_mask=true"])
    assert recipe.target_settings["optimization"] == "extended" and recipe.export["single_mask"] is True
    with pytest.raises(RecipeError, match="expected section.key=value"):
        load_recipe(child, ["nokey"])
    loop = write(tmp_path / "loop.toml", 'extends = "loop.toml"\n[recipe]\nname = "loop"\n')
    with pytest.raises(RecipeError, match="loops back"):
        load_recipe(loop)


def test_missing_recipe_via_cli_is_one_line(tmp_path):
    env = {**os.environ, "CI": "1"}
    proc = subprocess.run([sys.executable, "-m", "evsam_export.cli", "run", str(tmp_path / "nope.toml")],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 5 and "recipe not found" in proc.stderr and "Traceback" not in proc.stderr
    bad = write(tmp_path / "bad.toml", '[recipe]\nname = "x"\n[quantize]\nmethd = 1\n')
    proc = subprocess.run([sys.executable, "-m", "evsam_export.cli", "run", str(bad)], capture_output=True, text=True, env=env)
    assert proc.returncode == 5 and "[quantize]: unknown section" in proc.stderr and "Traceback" not in proc.stderr


# recipe, --set override, the field path the one-line refusal names
BAD_STEP_VALUES = [
    ("cpu-ort-fp32", "target.optimization=all", "[target] optimization:"),
    ("cpu-ort-fp32", 'target.providers=["CUDAExecutionProviderr"]', "[target] providers:"),
    ("cpu-ort-fp32", "target.providers=[]", "[target] providers:"),
    ("cpu-ort-fp32", 'target.providers=["CPUExecutionProvider", "CPUExecutionProvider"]', "[target] providers:"),
    ("cpu-ort-fp32", 'target.graph_passes=["no-such-pass"]', "[target] graph_passes:"),
    ("a100-trt-fp16", "target.encoder_batch=[4, 2, 8]", "[target] encoder_batch:"),
    ("a100-trt-fp16", "target.decoder_prompts=[0, 16, 64]", "[target] decoder_prompts:"),
    ("a100-trt-fp16", "target.decoder_points=[1, 2]", "[target] decoder_points:"),
    ("a100-trt-fp16", "target.mask_batch=[1, 1, 128]", "[target] mask_batch:"),
    ("a100-trt-fp16", "target.workspace_gib=0", "[target] workspace_gib:"),
    ("a100-trt-fp16", "target.builder_optimization_level=6", "[target] builder_optimization_level:"),
    ("a100-trt-fp16", "target.hardware_compatibility=turing", "[target] hardware_compatibility:"),
    ("a100-trt-fp16", 'target.timing_cache=""', "[target] timing_cache:"),
    ("orin-trt-fp16", 'target.device_name=" "', "[target] device_name:"),
    ("cpu-openvino-int8", "precision.int8.preset=bogus", "[precision.int8] preset:"),
    ("cpu-ort-int8", "precision.int8.calibrate_method=bogus", "[precision.int8] calibrate_method:"),
    ("cpu-ort-int8", "precision.int8.reduce_range=sometimes", "[precision.int8] reduce_range:"),
    ("cpu-openvino-int8", "precision.int8.min_speedup=-1", "[precision.int8] min_speedup:"),
    ("web-wasm", "target.execution_provider=webgl", "[target] execution_provider:"),
    ("web-wasm", "target.fp16_min_elements=0", "[target] fp16_min_elements:"),
]
# Settings fields of the targets above whose every value of the right type is usable (booleans).
NO_VALUE_CHECK = {"ort": set(), "tensorrt": {"tf32", "version_compatible"}, "web": {"require_webgpu", "precision"}}


@pytest.mark.parametrize("recipe, override, field_path", BAD_STEP_VALUES, ids=[case[1].split("=")[0] for case in BAD_STEP_VALUES])
def test_dry_run_refuses_a_bad_step_value_before_anything_is_exported(tmp_path, monkeypatch, recipe, override, field_path):
    from typer.testing import CliRunner

    from evsam_export.cli import _register, app

    _register()
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["run", recipe, "--dry-run", "-o", "out", "--set", override])
    message = result.stderr if hasattr(result, "stderr") else result.output
    assert result.exit_code == 5, result.output
    assert f"error: {recipe}.toml: {field_path}" in message and "\n" not in message.strip()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("target", sorted(NO_VALUE_CHECK))
def test_every_target_setting_with_a_value_check_has_a_bad_value_case(target):
    import dataclasses
    import importlib

    settings_cls = importlib.import_module(f"evsam_export.targets.{target}").Settings
    covered = {path.split("] ")[1].rstrip(":") for recipe, _, path in BAD_STEP_VALUES
               if path.startswith("[target]") and load_recipe(recipe).target == target}
    fields = {item.name for item in dataclasses.fields(settings_cls)}
    assert fields - NO_VALUE_CHECK[target] == covered


def test_extends_finds_a_shipped_recipe_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for parent in ("cpu-ort-fp32.toml", "cpu-ort-fp32"):
        child = write(tmp_path / "mine.toml", f'extends = "{parent}"\n[recipe]\nname = "mine"\n')
        assert load_recipe(child).target_settings == {"optimization": "extended"}
    write(tmp_path / "cpu-ort-fp32.toml", '[recipe]\nname = "local"\ntarget = "ort"\n[target]\noptimization = "basic"\n')
    assert load_recipe(child).target_settings == {"optimization": "basic"}  # a file beside it comes first
    orphan = write(tmp_path / "orphan.toml", 'extends = "no-such.toml"\n[recipe]\nname = "o"\n')
    with pytest.raises(RecipeError, match="extends: no-such.toml is neither beside it nor a shipped recipe"):
        load_recipe(orphan)


def test_shipped_recipes_and_suites_are_package_data_behind_the_top_level_folders():
    """One copy: the top-level recipes/ and validators/ folders people edit are the package's own files."""
    from evsam_export.parity.suites import validators_dir

    root = Path(__file__).resolve().parents[2]
    assert recipes_dir() == (root / "evsam_export" / "recipes").resolve() == (root / "recipes").resolve()
    assert validators_dir() == (root / "evsam_export" / "validators").resolve() == (root / "validators").resolve()


@pytest.mark.full  # whole recipe runs on the seeded step cache
def test_second_run_reuses_every_step_and_dry_run_writes_nothing(tmp_path, seeded_step_cache):
    recipe = load_recipe(write(tmp_path / "r.toml", UNVALIDATED_ORT_FP32))
    empty = StepCache(tmp_path / "empty")
    plan = run_recipe(recipe, "l0", tmp_path / "dry", dry_run=True, cache=empty)
    assert [s.status for s in plan.steps] == ["run", "run", "run"]
    assert not (tmp_path / "dry").exists() and not (tmp_path / "empty").exists()

    first = seeded_step_cache.first  # the same recipe's run into an empty cache
    assert [s.status for s in first.steps] == ["built", "built", "built"]
    cache = seeded_step_cache.copy(tmp_path / "cache")
    second = run_recipe(recipe, "l0", tmp_path / "b", cache=cache)
    assert [s.status for s in second.steps] == ["reused", "reused", "reused"]
    assert {a.sha256 for a in second.manifest.artifacts} == {a.sha256 for a in first.manifest.artifacts}

    plan = run_recipe(recipe, "l0", tmp_path / "c", dry_run=True, cache=cache)
    assert [s.status for s in plan.steps] == ["reuse", "reuse", "reuse"]
    changed = load_recipe(tmp_path / "r.toml", ["target.optimization=basic"])
    third = run_recipe(changed, "l0", tmp_path / "c", cache=cache)
    assert [s.status for s in third.steps] == ["reused", "built", "built"]  # only what depends on the change


@pytest.mark.full  # a whole recipe run on the seeded step cache
def test_summary_line_warns_when_an_artifacts_build_gate_never_passed(tmp_path, seeded_step_cache):
    """The manifest's gate facts reach the summary line (here through a cached step whose artifact failed
    its build gate in every fallback round): status WARN and the reason, not OK."""
    import json

    from evsam_export.progress import Reporter

    recipe = load_recipe(seeded_step_cache.recipe_file)
    cache = seeded_step_cache.copy(tmp_path / "cache")
    step = next(s for s in seeded_step_cache.first.steps if s.outputs == ["encoder.ort.fp32"])
    entry_file = cache.root / step.key / "entry.json"
    entry = json.loads(entry_file.read_text())
    (artifact,) = entry["artifacts"]
    artifact["facts"].update(gate_passed=False, fallback=[
        {"round": 0, "kept_fp32_groups": [], "worst_gate": "end_to_end points_neg mask_iou.mean 0.9689 < 0.97"},
        {"round": 1, "kept_fp32_groups": ["encoder-neck"], "worst_gate": "end_to_end points_neg mask_iou.mean 0.9691 < 0.97"}])
    entry_file.chmod(0o644)  # cache files are read-only
    entry_file.write_text(json.dumps(entry))
    reporter = Reporter(quiet=True)
    run_recipe(recipe, "l0", tmp_path / "b", cache=cache, reporter=reporter)
    lines = {Path(line.path).name: line for line in reporter.summary}
    warned = lines["encoder.ort.fp32.onnx"]
    assert warned.status == "warn" and "BUILD GATE FAILED in all 2 round(s)" in warned.note and "0.9691" in warned.note
    assert warned.render().startswith("WARN")
    assert lines["decoder.ort.fp32.onnx"].status == "reused" and lines["decoder.ort.fp32.onnx"].note == "decoder.ort.fp32"


def test_cache_stores_a_step_without_files(tmp_path):
    cache = StepCache(tmp_path / "cache")
    cache.store("k" * 64, tmp_path, [], {"step": "ort:encoder", "artifacts": []})
    assert cache.lookup("k" * 64)["artifacts"] == []


@pytest.mark.full  # whole recipe runs on the seeded step cache
def test_a_truncated_cache_file_is_rebuilt_and_harms_no_output(tmp_path, seeded_step_cache):
    """Run into r1, truncate the largest file of a step's cache entry, run into r2. The step is rebuilt (and
    says so), r2 matches its manifest, r1 is untouched, and the rebuilt entry replaced the bad one. r1 is
    restored from the cache; the seeding run's folder stands for an output the cache was stored from. The
    damaged step is the ORT encoder's: every entry is checked and replaced by the same code, and rebuilding
    the export step would cost an export."""
    import io

    from evsam_export.files import sha256_file
    from evsam_export.manifest import read_manifest
    from evsam_export.pipeline.cache import verify_entry
    from evsam_export.progress import Reporter

    def files_match_their_manifest(folder: Path) -> bool:
        manifest = read_manifest(folder)
        return all(sha256_file(folder / a.path) == a.sha256 and (folder / a.path).stat().st_size == a.size_bytes
                   for a in manifest.artifacts)

    def independent_files(folder: Path) -> dict[Path, bytes]:
        files = [p for p in folder.rglob("*") if p.is_file()]
        assert files and all(not p.is_symlink() and os.stat(p).st_nlink == 1 for p in files)
        return {p: p.read_bytes() for p in files}

    first = seeded_step_cache.first
    assert [s.status for s in first.steps] == ["built", "built", "built"]
    independent_files(seeded_step_cache.output)  # built and stored: no file shared with the cache
    recipe = load_recipe(seeded_step_cache.recipe_file)
    cache = seeded_step_cache.copy(tmp_path / "cache")
    restored = run_recipe(recipe, "l0", tmp_path / "r1", cache=cache, reporter=Reporter(quiet=True))
    assert [s.status for s in restored.steps] == ["reused", "reused", "reused"]
    r1_bytes = independent_files(tmp_path / "r1")
    step = next(s for s in first.steps if s.outputs == ["encoder.ort.fp32"])
    largest = max((p for p in (cache.root / step.key).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    os.truncate(largest, largest.stat().st_size // 2)
    damaged_key = largest.relative_to(cache.root).parts[0]

    lines = io.StringIO()
    reporter = Reporter(interactive=False, stream=lines)
    second = run_recipe(recipe, "l0", tmp_path / "r2", cache=cache, reporter=reporter)
    rebuilt = next(s for s in second.steps if s.key == damaged_key)
    assert rebuilt.status == "built" and largest.name in rebuilt.cache_problem
    assert f"cache entry {damaged_key[:16]} refused: {largest.name} is" in lines.getvalue()
    rebuilt_paths = {str(tmp_path / "r2" / second.manifest.artifact(a).path) for a in rebuilt.outputs}
    assert rebuilt_paths and all("rebuilt: its cache entry was bad" in line.note for line in reporter.summary if line.path in rebuilt_paths)
    assert files_match_their_manifest(tmp_path / "r2") and files_match_their_manifest(tmp_path / "r1")
    assert {p: p.read_bytes() for p in (tmp_path / "r1").rglob("*") if p.is_file()} == r1_bytes
    assert verify_entry(cache.root / damaged_key)[1] is None  # the rebuild replaced the bad entry


def test_the_validate_key_covers_the_bytes_of_the_files_it_checks(copy_export):
    """A file changed after its manifest was written changes the key, so a cached pass cannot be replayed."""
    from evsam_export.manifest import read_manifest
    from evsam_export.pipeline.runner import validate_key

    folder = copy_export("validate-key")
    manifest = read_manifest(folder)
    key = validate_key(folder, manifest, "suite", {})
    assert validate_key(folder, manifest, "suite", {}) == key
    target = folder / manifest.artifacts[0].path
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    assert validate_key(folder, read_manifest(folder), "suite", {}) != key


def test_step_code_hash_covers_the_helpers_a_step_imports():
    """A change in the model code or a graph pass must invalidate a cached export, not only a change in
    the step module itself (evsam_export.pipeline.export)."""
    from evsam_export.cache import module_code_files, module_code_hash

    files = module_code_files("evsam_export.pipeline.export")
    for helper in ("evsam_export.export.graph_passes", "evsam_export.model.layers", "evsam_export.export.simplify"):
        assert helper in files, helper
    assert "evsam_export.precision.ort_int8" in module_code_files("evsam_export.precision.ort_int8")
    assert "evsam_export.data.calibration" in module_code_files("evsam_export.precision.ort_int8")
    assert module_code_hash("evsam_export.pipeline.export") != module_code_hash("evsam_export.targets.ort")
    assert len(module_code_hash("not_our.module")) == 64

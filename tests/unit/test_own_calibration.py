"""INT8 calibration on the user's folder (`precision.int8.calibration_data`): checked when the recipe loads,
fed through the shared preprocessing, recorded in the manifest (count, sha256 of the sorted file list),
part of the step cache key; and the ORT and OpenVINO INT8 recipes still pass on it (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evsam_export.data import calibration as data
from evsam_export.data.images import files_sha256, read_image_file
from evsam_export.data.scenes import synthetic_scene
from evsam_export.errors import RecipeError
from evsam_export.model import processing
from evsam_export.pipeline.recipe import load_recipe
from evsam_export.pipeline.runner import plan_steps, step_payload
from evsam_export.precision import nncf_int8, ort_int8
from evsam_export.steps.settings import SettingValueError


def calibration_folder(root: Path, count: int = 5) -> Path:
    """`count` photos-to-be of mixed formats and sizes (one grayscale, one RGBA) plus a truncated PNG."""
    root.mkdir(parents=True)
    for index in range(count):
        rgb = synthetic_scene(500 + index, 96 + 16 * index, 128).rgb
        alpha = np.full(rgb.shape[:2], 200, np.uint8)
        array = rgb[..., 0] if index == 1 else np.dstack([rgb, alpha]) if index == 2 else rgb
        Image.fromarray(array).save(root / f"img{index}.{'jpg' if index == 3 else 'png'}")
    data_bytes = (root / "img0.png").read_bytes()
    (root / "zz-broken.png").write_bytes(data_bytes[: len(data_bytes) // 3])
    return root


@pytest.fixture()
def folder(tmp_path) -> Path:
    return calibration_folder(tmp_path / "calib")


@pytest.mark.parametrize("settings_cls", [ort_int8.Settings, nncf_int8.Settings])
def test_calibration_data_must_be_a_folder_of_images(settings_cls, folder, tmp_path):
    assert settings_cls(calibration_data=str(folder)).calibration_data == str(folder)
    assert settings_cls().calibration_data is None  # default: the built-in synthetic set
    with pytest.raises(SettingValueError, match="calibration_data: image folder not found"):
        settings_cls(calibration_data=str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SettingValueError, match="calibration_data: no images in"):
        settings_cls(calibration_data=str(tmp_path / "empty"))


@pytest.mark.parametrize("recipe", ["cpu-ort-int8", "cpu-openvino-int8"])
def test_a_recipe_takes_calibration_data_from_set_and_refuses_a_bad_one_when_it_loads(recipe, folder, tmp_path):
    loaded = load_recipe(recipe, [f"precision.int8.calibration_data={folder}"])
    assert loaded.int8["calibration_data"] == str(folder)
    assert any(step.settings.get("calibration_data") == str(folder) for step in plan_steps(loaded))
    with pytest.raises(RecipeError, match=r"\[precision.int8\] calibration_data: image folder not found"):
        load_recipe(recipe, [f"precision.int8.calibration_data={tmp_path / 'absent'}"])
    with pytest.raises(RecipeError, match="calibration_data"):
        load_recipe(recipe, ["precision.int8.calibration_data=3"])


def test_run_dry_run_with_a_missing_calibration_folder_is_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.run([sys.executable, "-m", "evsam_export.cli", "run", "cpu-ort-int8", "--variant", "l0", "-o",
                           str(tmp_path / "out"), "--dry-run", "--set", f"precision.int8.calibration_data={tmp_path / 'nope'}"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 5, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "calibration_data" in proc.stderr and "Traceback" not in proc.stderr


def test_the_feeds_are_the_folder_images_through_the_shared_preprocessing(folder):
    feeds = data.encoder_calibration_feeds("l0", 3, seed=0, folder=folder)
    names = data.describe_calibration(3, 0, folder=folder)["images"]
    assert len(feeds) == len(names) <= 3
    for feed, name in zip(feeds, names):
        expected, _ = processing.preprocess_image(read_image_file(folder / name), 512)
        np.testing.assert_array_equal(feed["input_image"], expected)
    seen = []
    decoder = data.decoder_calibration_feeds(lambda image: seen.append(image) or np.zeros((1, 256, 64, 64), np.float32),
                                             "l0", 3, seed=0, folder=folder)
    assert len(seen) == len(names) and len(decoder) == 2 * len(names)  # a point and a box per image
    assert data.calibration_fingerprint(feeds) != data.calibration_fingerprint(data.encoder_calibration_feeds("l0", 3, seed=0))


def test_the_manifest_description_names_the_files_their_hash_and_the_skipped_one(folder):
    described = data.describe_calibration(16, 0, folder=folder)
    assert described["source"] == "folder" and described["count"] == 5
    assert described["images"] == [f"img{i}.{'jpg' if i == 3 else 'png'}" for i in range(5)]
    assert described["files_sha256"] == files_sha256(folder, described["images"])
    assert [item["file"] for item in described["skipped"]] == ["zz-broken.png"]
    sample = data.describe_calibration(2, 7, folder=folder)
    assert sample == data.describe_calibration(2, 7, folder=folder) and sample["count"] + len(sample["skipped"]) == 2
    assert data.describe_calibration(3, 0)["source"] == "built-in"


def test_the_step_cache_key_follows_the_folder_contents(folder):
    recipe = load_recipe("cpu-ort-int8", [f"precision.int8.calibration_data={folder}"])
    step = next(s for s in plan_steps(recipe) if s.name == "int8:encoder")

    def payload():
        return step_payload(step, "parent-sha", {}, "suite", "l0", "weights")

    before = payload()
    assert before["calibration_data"] and payload() == before
    Image.fromarray(synthetic_scene(900, 64, 64).rgb).save(folder / "added.png")
    added = payload()
    assert added["calibration_data"] != before["calibration_data"]
    target = folder / "img4.png"
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert payload()["calibration_data"] != added["calibration_data"]
    plain = next(s for s in plan_steps(load_recipe("cpu-ort-int8")) if s.name == "int8:encoder")
    assert "calibration_data" not in step_payload(plain, "parent-sha", {}, "suite", "l0", "weights")


@pytest.mark.full
@pytest.mark.heavy
@pytest.mark.parametrize("recipe, component_id", [("cpu-ort-int8", "encoder.ort.int8"), ("cpu-openvino-int8", "encoder.openvino.int8")])
def test_int8_recipes_calibrate_on_a_folder_and_still_pass(recipe, component_id, tmp_path, monkeypatch):
    folder = calibration_folder(tmp_path / "calib", count=8)
    monkeypatch.setenv("EVSAM_CACHE_DIR", str(tmp_path / "cache"))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "evsam_export.cli", "run", recipe, "--variant", "l0", "-o", str(out),
                           "--set", f"precision.int8.calibration_data={folder}"],
                          capture_output=True, text=True, env=env, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "zz-broken.png" in proc.stderr  # the unreadable file is named, not silently dropped
    manifest = json.loads((out / "manifest.json").read_text())
    artifact = next(a for a in manifest["artifacts"] if a["id"] == component_id)
    calibration = artifact["facts"]["calibration"]
    assert calibration["source"] == "folder" and calibration["folder"] == str(folder) and calibration["count"] == 8
    assert calibration["files_sha256"] == files_sha256(folder, calibration["images"])
    assert json.loads((out / "parity.json").read_text())["passed"] is True
    assert "8 files of" in (out / "report.html").read_text()

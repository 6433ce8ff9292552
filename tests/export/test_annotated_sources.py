"""COCO-format annotations as a data source beyond `evaluate`: a parity suite's `[[suite.annotations]]` (box and
point prompts from the ground truth, the other kinds generated on the GT masks; in the suite's cache
fingerprint) and `precision.int8.calibration_data` naming an annotation file (manifest record, cache key)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from coco_scenes import write_coco_set
from conftest import quick_suite_text

from evsam_export.data import calibration as data
from evsam_export.data.coco import load_coco, point_prompt
from evsam_export.data.images import files_sha256
from evsam_export.errors import RecipeError, UsageError
from evsam_export.files import sha256_file
from evsam_export.parity.reference import build_cases
from evsam_export.parity.suites import load_suite
from evsam_export.pipeline.recipe import load_recipe
from evsam_export.pipeline.runner import plan_steps, step_payload
from evsam_export.precision import nncf_int8, ort_int8
from evsam_export.steps.settings import SettingValueError

KINDS = ("point", "box", "points_neg")


@pytest.fixture()
def coco_set(tmp_path) -> Path:
    return write_coco_set(tmp_path / "coco")


def annotation_suite(folder: Path, entry: str, kinds=KINDS) -> Path:
    """A suite file in `folder` whose only image source is one [[suite.annotations]] entry."""
    path = folder / "mine.toml"
    text = quick_suite_text("mine", kinds).replace("[[suite.images]]\nsynthetic = 0\nsize = [240, 320]", f"[[suite.annotations]]\n{entry}")
    path.write_text(text)
    return path


def test_a_suite_takes_box_and_point_prompts_from_the_ground_truth(coco_set, tmp_path):
    suite = load_suite(annotation_suite(tmp_path, 'file = "coco/instances.json"\nimages = "coco/images"\nlimit = 3\nseed = 1'))
    dataset = load_coco(coco_set, coco_set.parent / "images", limit=3, seed=1)
    cases = build_cases(suite, 512)
    assert [image.name for image in cases.images] == [f"instances/{image.path.name}" for image in dataset.images]
    assert [case.key for case in cases.cases] == [f"{i.name}/{k}" for i in cases.images for k in KINDS]
    for case in cases.cases:
        annotated = next(image for image in dataset.images if image.path.name == Path(case.image.name).name)
        gt_boxes = np.asarray([instance.box for instance in annotated.instances])
        height, width = case.image.rgb.shape[:2]
        if case.kind == "box":  # the GT box of one instance (inside the image, as every parity prompt)
            clipped = np.clip(gt_boxes, 0, [width - 1, height - 1, width - 1, height - 1])
            assert any(np.allclose(case.prompts.boxes[0], box) for box in clipped), (case.prompts.boxes, clipped)
        elif case.kind == "point":  # the farthest-from-background pixel of one instance's mask
            points = [point_prompt(mask) for mask in case.image.masks]
            assert any(np.array_equal(case.prompts.points[0], p) for p in points)
        else:  # the other kinds are generated on the GT masks: a background click among them
            assert case.prompts.labels.tolist() == [1, 1, 0]


def test_bad_annotation_entries_are_one_line_when_the_suite_loads(coco_set, tmp_path):
    for entry, error, match in [
        ('file = "coco/absent.json"', UsageError, "absent.json does not exist"),
        ('file = "coco/instances.json"\nimages = "coco/nowhere"', UsageError, "image folder .*nowhere does not exist"),
        ('file = "coco/instances.json"\nimages = "coco/images"\nlimit = 0', RecipeError, "outside 1"),
        ('file = "coco/instances.json"\nfolder = "x"', RecipeError, r"\[suite.annotations #1\] folder: unknown key"),
        ('images = "coco/images"', RecipeError, "file: missing required key"),
    ]:
        with pytest.raises(error, match=match):
            load_suite(annotation_suite(tmp_path, entry))
    (tmp_path / "coco" / "images" / "not-coco.json").write_text(json.dumps({"images": 3}))
    with pytest.raises(UsageError, match="is not COCO-format instances JSON"):
        load_suite(annotation_suite(tmp_path, 'file = "coco/images/not-coco.json"'))
    (tmp_path / "coco" / "images" / "scene-1.png").unlink()
    with pytest.raises(UsageError, match="scene-1.png is missing"):
        load_suite(annotation_suite(tmp_path, 'file = "coco/instances.json"\nimages = "coco/images"'))


def test_the_suite_fingerprint_follows_the_annotations_and_their_images(coco_set, tmp_path):
    suite = load_suite(annotation_suite(tmp_path, 'file = "coco/instances.json"\nimages = "coco/images"'))
    before = suite.fingerprint()
    assert load_suite(suite.path).fingerprint() == before
    document = json.loads(coco_set.read_text())
    document["annotations"] = document["annotations"][1:]
    coco_set.write_text(json.dumps(document))
    edited = load_suite(suite.path).fingerprint()
    assert edited != before
    image = coco_set.parent / "images" / "scene-2.png"
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert load_suite(suite.path).fingerprint() != edited


# ------------------------------------------------------------------------------------------------ calibration


@pytest.fixture()
def calibration_file(coco_set) -> Path:
    """The annotation file beside its images (calibration_data reads file_names relative to the file's folder)."""
    return Path(shutil.copy(coco_set, coco_set.parent / "images" / "instances.json"))


@pytest.mark.parametrize("settings_cls", [ort_int8.Settings, nncf_int8.Settings])
def test_calibration_data_may_be_an_annotation_file(settings_cls, calibration_file, coco_set):
    assert settings_cls(calibration_data=str(calibration_file)).calibration_data == str(calibration_file)
    with pytest.raises(SettingValueError, match="calibration_data: image file .*scene-0.png is missing"):
        settings_cls(calibration_data=str(coco_set))  # its images are in images/, not beside it
    calibration_file.with_name("bad.json").write_text("{")
    with pytest.raises(SettingValueError, match="calibration_data: .*bad.json is not COCO-format"):
        settings_cls(calibration_data=str(calibration_file.with_name("bad.json")))


def test_calibration_on_annotations_is_recorded_and_prompts_from_the_ground_truth(calibration_file):
    described = data.describe_calibration(3, 0, folder=calibration_file)
    folder = calibration_file.parent
    dataset = load_coco(calibration_file, limit=3, seed=0)
    assert described["source"] == "annotations" and described["count"] == 3
    assert described["images"] == [image.path.name for image in dataset.images]
    assert described["files_sha256"] == files_sha256(folder, described["images"])
    assert described["annotations_sha256"] == sha256_file(calibration_file) and described["skipped"] == []

    embedded = []
    feeds = data.decoder_calibration_feeds(lambda image: embedded.append(image) or np.zeros((1, 256, 64, 64), np.float32),
                                           "l0", 3, seed=0, folder=calibration_file)
    assert len(embedded) == 3 and len(feeds) == 6  # a point and a box per annotated image
    images = data.calibration_images(3, 0, folder=calibration_file)
    assert all(item.source == "annotations" and item.image.boxes is not None for item in images)


def test_the_step_cache_key_follows_the_annotation_file_and_its_images(calibration_file):
    recipe = load_recipe("cpu-ort-int8", [f"precision.int8.calibration_data={calibration_file}"])
    step = next(s for s in plan_steps(recipe) if s.name == "int8:encoder")

    def key():
        return step_payload(step, "parent-sha", {}, "suite", "l0", "weights")["calibration_data"]

    before = key()
    assert before and key() == before
    document = json.loads(calibration_file.read_text())
    document["annotations"] = document["annotations"][1:]
    calibration_file.write_text(json.dumps(document))
    edited = key()
    assert edited != before
    image = calibration_file.parent / "scene-3.png"
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert key() != edited


@pytest.mark.full  # a validate run over an annotation suite
def test_validate_gates_on_an_annotation_suite(copy_export, coco_set, tmp_path):
    """End to end: `validate --suite` with only [[suite.annotations]] scores every annotated image, the GT
    prompts included, and the report names the cases."""
    from evsam_export import api
    from evsam_export.progress import Reporter

    folder = copy_export("annotated-suite")
    suite = annotation_suite(tmp_path, 'file = "coco/instances.json"\nimages = "coco/images"\nlimit = 2', kinds=("point", "box"))
    report = api.validate(folder, str(suite), reporter=Reporter(quiet=True))
    assert report.passed
    parity = json.loads((folder / "parity.json").read_text())
    assert parity["suite"] == "mine" and parity["images"]["count"] == 2 and not parity["images"].get("skipped")
    dataset = load_coco(coco_set, coco_set.parent / "images", limit=2)
    drawn = {caption.split(": ")[1].split(" / ")[0] for caption in (o["caption"] for o in parity["overlays"])}
    assert drawn <= {f"instances/{image.path.name}" for image in dataset.images} and drawn  # the annotated images ran


def test_the_folder_report_names_the_annotation_file_calibrated_on(tmp_path, calibration_file):
    from evsam_export.folder_report import render_folder_report

    described = data.describe_calibration(2, 0, folder=calibration_file)
    manifest = {"variant": "l0", "artifacts": [{"id": "encoder.ort.int8", "target": "ort", "precision": "int8",
                                                "path": "encoder.int8.onnx", "facts": {"calibration": described}}]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    page = render_folder_report(tmp_path)
    assert f"2 files of <code>{calibration_file}</code>" in page and described["files_sha256"][:16] in page


def test_a_suite_extending_another_uses_only_its_own_annotations(coco_set, tmp_path):
    path = tmp_path / "derived.toml"
    path.write_text('extends = "default"\n[suite]\nname = "derived"\ndescription = "d"\n'
                    '[[suite.annotations]]\nfile = "coco/instances.json"\nimages = "coco/images"\nlimit = 1\n')
    suite = load_suite(path)
    assert [type(spec).__name__ for spec in suite.images] == ["AnnotationSet"]
    assert suite.prompt_kinds == load_suite("default").prompt_kinds


@pytest.mark.full
@pytest.mark.heavy
def test_the_ort_int8_recipe_calibrates_on_an_annotation_file_and_still_passes(calibration_file, tmp_path, monkeypatch):
    import subprocess
    import sys

    monkeypatch.setenv("EVSAM_CACHE_DIR", str(tmp_path / "cache"))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "evsam_export.cli", "run", "cpu-ort-int8", "--variant", "l0", "-o", str(out),
                           "--set", f"precision.int8.calibration_data={calibration_file}"],
                          capture_output=True, text=True, env=env, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    calibration = next(a for a in manifest["artifacts"] if a["id"] == "encoder.ort.int8")["facts"]["calibration"]
    assert calibration["source"] == "annotations" and calibration["annotations"] == str(calibration_file)
    assert calibration["count"] == 4 and calibration["annotations_sha256"] == sha256_file(calibration_file)
    assert calibration["files_sha256"] == files_sha256(calibration_file.parent, calibration["images"])
    assert json.loads((out / "parity.json").read_text())["passed"] is True


@pytest.mark.builds  # two real ORT calibrations
def test_an_ort_int8_build_calibrates_on_the_annotated_images(copy_export, gate_suite, calibration_file, tmp_path, monkeypatch):
    """A real calibration (ORT static QDQ of the l0 encoder and decoder, no gate rounds) on the annotation file:
    the facts name it, and the encoder keeps the SNR floor test_precision_ort sets for the synthetic set."""
    from evsam_export.manifest import read_manifest
    from evsam_export.metrics import snr_db
    from evsam_export.model.variants import get_variant
    from evsam_export.parity.gate import ParityGate
    from evsam_export.progress import Reporter
    from evsam_export.runners.ort_runner import OrtRunner
    from evsam_export.steps.step import StepContext

    monkeypatch.setenv("EVSAM_CACHE_DIR", str(tmp_path / "cache"))
    folder = copy_export("annotated-calibration")
    manifest = read_manifest(folder)
    ctx = StepContext(folder=folder, manifest=manifest, variant=get_variant("l0"), reporter=Reporter(quiet=True),
                      suite=str(gate_suite), threads=2, gating=ParityGate())
    settings = ort_int8.Settings(calibration_images=4, calibration_data=str(calibration_file), fallback=False)
    held_out = data.encoder_calibration_feeds("l0", 2, seed=99, photos=False)
    for component in ("encoder", "decoder"):
        parent = manifest.artifact(f"{component}.onnx.fp32")
        ops = ("Conv",) if component == "encoder" else ("Gemm", "MatMul")  # the decoder has no eligible Conv
        (artifact,) = ort_int8.build(ctx, parent, dataclasses.replace(settings, op_types_to_quantize=ops))
        calibration = artifact.facts["calibration"]
        assert calibration["source"] == "annotations" and calibration["annotations"] == str(calibration_file)
        assert calibration["count"] == 4 and calibration["annotations_sha256"] == sha256_file(calibration_file)
        if component == "encoder":
            with OrtRunner(ctx.path_of(parent), parent.inputs, parent.outputs, threads=2) as fp32, \
                    OrtRunner(ctx.path_of(artifact), artifact.inputs, artifact.outputs, threads=2) as int8:
                snr = min(snr_db(fp32.infer(f)["image_embeddings"], int8.infer(f)["image_embeddings"]) for f in held_out)
            assert snr >= 10.0, snr

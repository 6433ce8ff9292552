"""The `app` encoder profile: raw uint8 RGB [H, W, 3] in, preprocessing in the graph."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from evsam_export import api, contract, metrics
from evsam_export.errors import UsageError
from evsam_export.export.app_encoder import preprocessing_difference
from evsam_export.manifest import read_manifest
from evsam_export.progress import Reporter
from evsam_export.runners import runner_for_artifact
from evsam_export.runtime.predictor import Predictor

# Portrait, landscape, smaller than 512 on both sides, and larger than 512 (downscale) with odd sides.
IMAGE_SHAPES = ((300, 200), (240, 320), (130, 170), (601, 777))
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def app_export(tmp_path_factory):
    folder = tmp_path_factory.mktemp("app") / "l0-app"
    options = api.ExportOptions(encoder_profile="app", pad_points_in_graph=True)  # the app-annotation recipe's
    api.export("l0", folder, options=options, reporter=Reporter(quiet=True))
    return folder


def smooth_image(height: int, width: int, seed: int) -> np.ndarray:
    """A photo-like image (gradients and blocks), so masks have real extents."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([(x * 255 // max(width - 1, 1)), (y * 255 // max(height - 1, 1)), ((x + y) % 64) * 4], axis=2)
    top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
    image[top : top + height // 3, left : left + width // 3] = rng.integers(0, 256, 3)
    return image.astype(np.uint8)


def test_in_graph_preprocessing_is_the_host_pipeline_within_two_levels():
    """Resize is the only approximation: the rest (scale, mean/std, padding) must be exact."""
    for size in (512, 1024):
        facts = preprocessing_difference(size, shapes=IMAGE_SHAPES + ((512, 512), (1024, 700)), seed=1)
        assert facts["max_abs_diff_levels"] <= 2.0, facts
        # Images that need no resize go through bit-exactly.
        exact = preprocessing_difference(size, shapes=((size, size // 2), (size // 3, size)), seed=2)
        assert exact["max_abs_diff_normalized"] == 0.0, exact


def test_app_export_declares_what_the_graph_does(app_export):
    manifest = read_manifest(app_export)
    encoder = manifest.artifact("encoder.onnx.fp32")
    image = encoder.inputs[0]
    assert (image.name, image.dtype, tuple(image.shape)) == (contract.INPUT_IMAGE, "uint8", contract.APP_IMAGE_SHAPE)
    assert tuple(encoder.outputs[0].shape) == contract.EMBEDDINGS_SHAPE
    assert manifest.model["encoder_profile"] == "app"
    assert manifest.model["encoder_input"]["in_graph"] is True
    assert encoder.settings["opset"] >= contract.APP_ENCODER_MIN_OPSET
    assert encoder.facts["preprocessing_vs_host"]["max_abs_diff_levels"] <= 2.0
    raw = json.loads((app_export / "manifest.json").read_text())
    assert raw["model"]["encoder_input"]["layout"].startswith("HWC RGB uint8")


def test_app_encoder_matches_host_pipeline_on_raw_images(app_export, l0_export):
    """Same weights (synthetic:0): the app encoder on raw pixels vs the host encoder on preprocess_image,
    embeddings and end-to-end masks through the runtime Predictor."""
    app, host = Predictor(app_export, prefer=("onnx",)), Predictor(l0_export, prefer=("onnx",))
    assert app.encoder_size == host.encoder_size == 512
    for seed, (height, width) in enumerate(IMAGE_SHAPES):
        image = smooth_image(height, width, seed)
        app.set_image(image)
        host.set_image(image)
        assert app.geometry == host.geometry
        assert metrics.snr_db(host.image_embeddings, app.image_embeddings) >= 40.0
        points = np.array([[width * 0.4, height * 0.5]])
        got = app.predict(points, np.array([1]), return_logits=True)
        want = host.predict(points, np.array([1]), return_logits=True)
        assert float(np.mean(metrics.stable_mask_iou(want.masks, got.masks, 0.01))) >= 0.9999
        assert float(np.mean(metrics.mask_iou(want.masks > 0, got.masks > 0))) >= 0.999


def test_app_folder_passes_the_parity_gate(app_export, gate_suite):
    report = api.validate(app_export, suite=gate_suite, reporter=Reporter(quiet=True))
    assert report.passed, [g.line() for g in report.failed_gates]
    encoder_stage = next(s for s in report.stages if s.stage == "encoder")
    assert all(g.passed for g in encoder_stage.gates)


@pytest.mark.parametrize(
    "feed, words",
    [
        (np.zeros((1, 3, 512, 512), np.float32), ("float32", "uint8", "HWC")),  # a host-preprocessed tensor
        (np.zeros((3, 64, 64), np.uint8), ("[3, 64, 64]", "HWC")),  # CHW pixels
        (np.zeros((1, 64, 64, 3), np.uint8), ("rank 3", "HWC")),  # a batch axis
    ],
)
def test_app_encoder_refuses_other_layouts_in_one_line(app_export, feed, words):
    manifest = read_manifest(app_export)
    runner = runner_for_artifact(app_export, manifest.artifact("encoder.onnx.fp32")).load()
    with pytest.raises(UsageError) as caught:
        runner.infer({contract.INPUT_IMAGE: feed})
    message = str(caught.value)
    assert "\n" not in message and all(word in message for word in words), message


def test_x_anylabeling_emulated_loads_the_folder_and_matches_the_predictor(app_export):
    """What X-AnyLabeling's efficientvit_sam model does with its YAML, emulated (the real app: the test
    below): paths relative to the YAML, the raw RGB image into the encoder's first input, clicks scaled by
    target_size, box corners as labels 2/3 without a padding point, orig_im_size, channel 0 of `masks`."""
    import onnxruntime as ort
    import yaml

    from evsam_export.apps import X_ANYLABELING_FILE, write_app_configs

    manifest = read_manifest(app_export)
    write_app_configs(app_export, manifest, {"x_anylabeling": True}, "encoder.onnx.fp32", "decoder.onnx.fp32", "test")
    config = yaml.safe_load((app_export / X_ANYLABELING_FILE).read_text())
    assert {"type", "name", "display_name", "target_size", "encoder_model_path", "decoder_model_path"} <= set(config)
    assert config["type"] == "efficientvit_sam" and not config["encoder_model_path"].startswith("/")
    encoder = ort.InferenceSession(str(app_export / config["encoder_model_path"]), providers=["CPUExecutionProvider"])
    decoder = ort.InferenceSession(str(app_export / config["decoder_model_path"]), providers=["CPUExecutionProvider"])
    image = smooth_image(333, 500, 7)
    embedding = encoder.run(None, {encoder.get_inputs()[0].name: image})[0]
    box = np.array([100.0, 80.0, 300.0, 250.0])
    scale = config["target_size"] / max(image.shape[:2])
    new_h, new_w = int(image.shape[0] * scale + 0.5), int(image.shape[1] * scale + 0.5)
    coords = box.reshape(1, 2, 2) * np.array([new_w / image.shape[1], new_h / image.shape[0]])
    masks = decoder.run(None, {
        "image_embeddings": embedding, "point_coords": coords.astype(np.float32),
        "point_labels": np.array([[2, 3]], np.float32), "mask_input": np.zeros((1, 1, 256, 256), np.float32),
        "has_mask_input": np.zeros(1, np.float32), "orig_im_size": np.array(image.shape[:2], np.float32)})[0]
    predictor = Predictor(app_export, prefer=("onnx",))
    predictor.set_image(image)
    ours = predictor.predict(box=box, multimask_output=False).masks
    assert masks.shape[2:] == ours.shape[2:] == image.shape[:2]
    assert float(metrics.mask_iou(ours[0, 0], masks[0, 0] > 0)) >= 0.999


def test_bench_times_the_app_encoder_on_a_raw_image_against_its_own_host_graph(app_export):
    """bench on an app folder: the app encoder on the raw photo, the same graph without its preprocessing on
    a host-preprocessed tensor, and the host preprocessing; a batch > 1 skips the raw-image subjects."""
    from evsam_export.bench.run import HOST_PREPROCESS, run_bench

    result = run_bench(app_export, threads=1, runs=1, warmup=0, batches=(1, 2), compare=(), memory=False,
                       reporter=Reporter(quiet=True))
    encoder = {(t.subject, t.workload) for t in result.timings if t.component == "encoder"}
    batch1 = {"encoder.onnx.fp32", "encoder.onnx.fp32 without preprocessing", HOST_PREPROCESS}
    assert {(name, "batch 1") for name in batch1} <= encoder
    assert not any(workload == "batch 2" for _, workload in encoder)
    assert all(t.median_ms > 0 for t in result.timings)


def test_stripped_app_encoder_is_the_host_encoder(app_export, tmp_path):
    """bench's baseline is the app graph minus its preprocessing: on an image that needs no resize (the
    in-graph preprocessing is bit-exact there) it gives the app encoder's embeddings."""
    import onnxruntime as ort

    from evsam_export.export.app_encoder import strip_preprocessing
    from evsam_export.model.processing import preprocess_image

    stripped = strip_preprocessing(app_export / "encoder.fp32.onnx", tmp_path / "host.onnx", 512)
    image = smooth_image(512, 256, 5)
    host = ort.InferenceSession(str(stripped), providers=["CPUExecutionProvider"])
    app = ort.InferenceSession(str(app_export / "encoder.fp32.onnx"), providers=["CPUExecutionProvider"])
    want = app.run(None, {contract.INPUT_IMAGE: image})[0]
    got = host.run(None, {contract.INPUT_IMAGE: preprocess_image(image, 512)[0]})[0]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_decoder_reexport_points_the_app_config_at_the_new_decoder(app_export, tmp_path):
    """The recipe's YAML names the ORT-optimised decoder, which a decoder re-export removes: the YAML must
    follow the new decoder (it still suits the app) instead of naming a file that is gone."""
    import shutil

    import yaml

    from evsam_export.apps import X_ANYLABELING_FILE, write_app_configs
    from evsam_export.model.variants import get_variant
    from evsam_export.parity.gate import ParityGate
    from evsam_export.steps.step import StepContext
    from evsam_export.targets import ort as ort_target

    folder = tmp_path / "app"
    shutil.copytree(app_export, folder)
    manifest = read_manifest(folder)
    ctx = StepContext(folder=folder, manifest=manifest, variant=get_variant("l0"), reporter=Reporter(quiet=True), gating=ParityGate())
    (derived,) = ort_target.build(ctx, manifest.artifact("decoder.onnx.fp32"), ort_target.Settings())
    manifest.add(derived)
    manifest.write(folder)
    write_app_configs(folder, manifest, {"x_anylabeling": True}, "encoder.onnx.fp32", derived.id, "test")
    options = api.ExportOptions(encoder_profile="app", pad_points_in_graph=True, simplify="none")
    api.export_decoder(folder, options=options, reporter=Reporter(quiet=True))
    config = yaml.safe_load((folder / X_ANYLABELING_FILE).read_text())
    after = read_manifest(folder)
    assert config["decoder_model_path"] == after.artifact("decoder.onnx.fp32").path != derived.path
    assert (folder / config["decoder_model_path"]).is_file() and config["name"].endswith("_test")
    assert after.history[-1]["app_configs"][X_ANYLABELING_FILE].startswith("now loads")


X_ANYLABELING_VENV = "EVSAM_X_ANYLABELING_VENV"


@pytest.mark.skipif(not os.environ.get(X_ANYLABELING_VENV), reason=(
    f"set {X_ANYLABELING_VENV} to a venv holding the app: python -m venv /work/venv-xal && "
    "/work/venv-xal/bin/pip install x-anylabeling-cvhub onnxruntime"))
def test_real_x_anylabeling_loads_the_folder_and_matches_the_predictor(app_export, tmp_path):
    """scripts/check_x_anylabeling.py in the app's own venv: its ModelManager loads x-anylabeling.yaml,
    its EfficientViT_SAM runs a click and a rectangle; masks must match our Predictor (IoU >= 0.999)."""
    from PIL import Image

    from evsam_export.apps import write_app_configs

    manifest = read_manifest(app_export)
    write_app_configs(app_export, manifest, {"x_anylabeling": True}, "encoder.onnx.fp32", "decoder.onnx.fp32", "test")
    image = tmp_path / "portrait.png"
    Image.fromarray(smooth_image(410, 300, 3)).save(image)
    python = Path(os.environ[X_ANYLABELING_VENV]) / "bin" / "python"
    report = tmp_path / "report.json"
    done = subprocess.run([str(python), str(REPO / "scripts" / "check_x_anylabeling.py"), str(app_export), str(image),
                           "--point", "120,205", "--json", str(report)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    results = {r["prompt"]: r for r in json.loads(report.read_text())["results"]}
    assert set(results) == {"point", "box"} and all(r["iou"] >= 0.999 and r["app_pixels"] > 0 for r in results.values())


def test_app_annotation_recipe_loads_and_refuses_a_host_encoder(tmp_path):
    from evsam_export.errors import RecipeError
    from evsam_export.pipeline.recipe import load_recipe

    recipe = load_recipe("app-annotation")
    assert recipe.apps == {"x_anylabeling": True} and recipe.export_options().encoder_profile == "app"
    with pytest.raises(RecipeError, match="raw pixels"):
        load_recipe("app-annotation", overrides=["export.encoder_profile=host"])

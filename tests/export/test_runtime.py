"""The torch-free runtime (evsam_export.runtime.Predictor) and `evsam-export predict`.

One synthetic-weight l0 artifact folder is exported per test session. The runtime must never import torch,
must segment like the PyTorch model (mask IoU >= 0.99 on real photographs) and the CLI must turn every bad
input into one `error:` line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from folders import linked_copy
from PIL import Image

from evsam_export.errors import ArtifactError, UsageError
from evsam_export.model import processing
from evsam_export.runtime import Prediction, Predictor

MIN_IOU = 0.99


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def l0_folder(l0_export) -> Path:
    return l0_export


@pytest.fixture(scope="session")
def predictor(l0_folder) -> Predictor:
    with Predictor(l0_folder, threads=2) as runtime:
        yield runtime


@pytest.fixture(scope="session")
def torch_model():
    from evsam_export.model.checkpoint import load_model
    from evsam_export.model.variants import VARIANTS

    model, _ = load_model(VARIANTS["l0"], "synthetic:0")
    return model


def photograph(name: str) -> np.ndarray:
    import skimage.data

    return processing.as_rgb_uint8(getattr(skimage.data, name)())


def run_cli(*args: str, cwd: Path | None = None, block_torch: bool = False) -> subprocess.CompletedProcess:
    """`evsam-export ARGS` in a fresh interpreter; with block_torch, `import torch` raises ImportError."""
    prelude = "import sys; sys.modules['torch'] = None; " if block_torch else ""
    code = prelude + "sys.argv = ['evsam-export'] + sys.argv[1:]; from evsam_export.cli import main; main()"
    if not block_torch:
        code = "import sys; " + code
    env = {**os.environ, "CI": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


# ------------------------------------------------------------------------------------------- (a) torch-free


def test_runtime_never_imports_torch(l0_folder):
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        import evsam_export.runtime
        from evsam_export.runtime import Predictor
        assert "torch" not in sys.modules, "import evsam_export.runtime imported torch"
        rng = np.random.default_rng(0)
        image = rng.integers(0, 256, size=(181, 243, 3), dtype=np.uint8)
        predictor = Predictor({str(l0_folder)!r}, threads=2)
        predictor.set_image(image)
        result = predictor.predict(point_coords=[[100, 90]], point_labels=[1])
        boxes = predictor.predict(boxes=[[10, 10, 120, 100], [50, 40, 240, 180]], multimask_output=False)
        assert result.masks.shape == (1, 3, 181, 243) and boxes.masks.shape == (2, 1, 181, 243)
        assert "torch" not in sys.modules, "set_image/predict imported torch"
        print("torch-free ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "torch-free ok" in proc.stdout


def test_cli_predict_works_without_torch(l0_folder, tmp_path):
    Image.fromarray(photograph("coffee")).save(tmp_path / "coffee.png")
    proc = run_cli("predict", str(l0_folder), str(tmp_path / "coffee.png"), "--point", "300,200",
                   "-o", str(tmp_path / "m.png"), block_torch=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "m.png").is_file()


# ------------------------------------------------------------------------------------ (b) parity vs PyTorch


def torch_embeddings(model, image: np.ndarray):
    import torch

    input_image, geometry = processing.preprocess_image(image, model.variant.encoder_size)
    with torch.inference_mode():
        return model.image_encoder(torch.from_numpy(input_image)), geometry


def torch_masks(model, encoded, points=None, labels=None, boxes=None, mask_input=None, multimask=True):
    """The PyTorch reference: encoder on processing.preprocess_image (`encoded`, from torch_embeddings),
    model.predict with prompts in the 1024 frame (processing.transform_coords), processing.postprocess_masks."""
    import torch

    embeddings, geometry = encoded
    coords = label_tensor = box_tensor = mask_tensor = None
    if points is not None:
        coords = torch.from_numpy(processing.transform_coords(np.asarray(points, np.float64), geometry))[None]
        label_tensor = torch.from_numpy(np.asarray(labels, np.float32))[None]
    if boxes is not None:
        box_array = np.asarray(boxes, np.float64).reshape(-1, 2, 2)
        box_tensor = torch.from_numpy(processing.transform_coords(box_array, geometry).reshape(-1, 4))
        if coords is not None and box_tensor.shape[0] > 1:
            coords = coords.expand(box_tensor.shape[0], -1, -1)
            label_tensor = label_tensor.expand(box_tensor.shape[0], -1)
    if mask_input is not None:
        mask_tensor = torch.from_numpy(np.asarray(mask_input, np.float32)).reshape(-1, 1, 256, 256)
    low_res, iou = model.predict(embeddings, coords, label_tensor, box_tensor, mask_tensor, multimask_output=multimask)
    low_res = low_res.numpy()
    return processing.binarize(processing.postprocess_masks(low_res, geometry)), iou.numpy(), low_res


def sixteen_boxes(height: int, width: int, seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.sort(rng.uniform(0, width, size=(16, 2)), axis=1)
    y = np.sort(rng.uniform(0, height, size=(16, 2)), axis=1)
    return np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], axis=1)


PROMPTS = {
    "point": lambda h, w: dict(point_coords=[[0.55 * w, 0.4 * h]], point_labels=[1], multimask_output=True),
    "points_neg": lambda h, w: dict(point_coords=[[0.5 * w, 0.5 * h], [0.1 * w, 0.1 * h]], point_labels=[1, 0], multimask_output=True),
    "box": lambda h, w: dict(box=[0.2 * w, 0.15 * h, 0.8 * w, 0.9 * h], multimask_output=False),
    "box_point": lambda h, w: dict(
        point_coords=[[0.5 * w, 0.5 * h]], point_labels=[1], box=[0.2 * w, 0.15 * h, 0.8 * w, 0.9 * h], multimask_output=True
    ),
    "boxes16": lambda h, w: dict(boxes=sixteen_boxes(h, w), multimask_output=False),
}


@pytest.mark.parametrize(
    "image_name, kinds",
    [("coffee", tuple(PROMPTS)), ("astronaut", ("point", "box", "boxes16"))],
    ids=["coffee-400x600", "astronaut-512x512"],
)
def test_runtime_matches_pytorch(predictor, torch_model, image_name, kinds):
    image = photograph(image_name)
    height, width = image.shape[:2]
    predictor.set_image(image)
    encoded = torch_embeddings(torch_model, image)
    for kind in kinds:
        prompt = PROMPTS[kind](height, width)
        got = predictor.predict(**prompt)
        boxes = prompt.get("boxes", prompt.get("box"))
        want_masks, want_iou, _ = torch_masks(
            torch_model, encoded, prompt.get("point_coords"), prompt.get("point_labels"), boxes, multimask=prompt["multimask_output"]
        )
        assert got.masks.shape == want_masks.shape, kind
        assert got.masks.dtype == bool and got.masks.shape[-2:] == (height, width)
        np.testing.assert_allclose(got.scores, want_iou, atol=1e-4, err_msg=kind)
        ious = [mask_iou(a, b) for a, b in zip(got.masks.reshape(-1, height, width), want_masks.reshape(-1, height, width))]
        assert min(ious) >= MIN_IOU, f"{image_name}/{kind}: min mask IoU {min(ious):.4f}"
        assert got.low_res_logits.shape == (*got.scores.shape, 256, 256)


@pytest.mark.parametrize("shape", [(2, 5000), (3000, 1)], ids=["2x5000", "3000x1"])
def test_extreme_aspect_ratio_matches_pytorch(predictor, torch_model, shape):
    """Beyond 2048:1 upstream rounds the short side to 0 rows and fails; ours keeps 1 row, and the runtime
    (whose sam-profile graph gets the prompt-frame size) still segments like the PyTorch model."""
    height, width = shape
    image = np.ascontiguousarray(np.resize(photograph("coffee")[200], (height, width, 3)))
    predictor.set_image(image)
    boxes = [[0, 0, width, height], [0, 0, width / 3, height]] if width > height else [[0, 0, width, height / 3]]
    got = predictor.predict(boxes=boxes, multimask_output=True)
    want_masks, want_iou, _ = torch_masks(torch_model, torch_embeddings(torch_model, image), boxes=boxes, multimask=True)
    assert got.masks.shape == want_masks.shape == (len(boxes), 3, height, width)
    np.testing.assert_allclose(got.scores, want_iou, atol=1e-4)
    ious = [mask_iou(a, b) for a, b in zip(got.masks.reshape(-1, height, width), want_masks.reshape(-1, height, width))]
    assert min(ious) >= MIN_IOU


def test_mask_refinement_matches_pytorch(predictor, torch_model):
    image = photograph("coffee")
    predictor.set_image(image)
    first = predictor.predict(point_coords=[[300, 200]], point_labels=[1], multimask_output=True)
    previous = first.best_low_res()
    assert previous.shape == (1, 256, 256)
    got = predictor.predict(point_coords=[[300, 200], [320, 180]], point_labels=[1, 1], mask_input=previous, multimask_output=False)
    want_masks, want_iou, _ = torch_masks(
        torch_model, torch_embeddings(torch_model, image), [[300, 200], [320, 180]], [1, 1], mask_input=previous, multimask=False
    )
    np.testing.assert_allclose(got.scores, want_iou, atol=1e-4)
    assert mask_iou(got.masks[0, 0], want_masks[0, 0]) >= MIN_IOU


def test_prediction_helpers_and_logits(predictor):
    image = photograph("coffee")
    predictor.set_image(image)
    result = predictor.predict(boxes=sixteen_boxes(*image.shape[:2]), multimask_output=True)
    assert isinstance(result, Prediction) and result.num_prompts == 16
    best = result.best_masks()
    assert best.shape == (16, *image.shape[:2])
    index = result.best_index()
    np.testing.assert_array_equal(best[3], result.masks[3, index[3]])
    np.testing.assert_array_equal(result.best(3), best[3])
    np.testing.assert_allclose(result.best_scores(), result.scores.max(axis=1))
    logits = predictor.predict(point_coords=[[300, 200]], point_labels=[1], return_logits=True)
    assert logits.masks.dtype == np.float32
    masks = predictor.predict(point_coords=[[300, 200]], point_labels=[1])
    np.testing.assert_array_equal(processing.binarize(logits.masks), masks.masks)


# ------------------------------------------------------------------------------------------ API input errors


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(point_coords=[[700, 10]], point_labels=[1]), "outside"),
        (dict(point_coords=[[10, -1]], point_labels=[1]), "outside"),
        (dict(box=[10, 10, 700, 100]), "outside"),
        (dict(box=[100, 10, 50, 100]), "x1 < x0"),
        (dict(boxes=[[10, 100, 50, 20]]), "y1 < y0"),
        (dict(point_coords=[[10, 10]], point_labels=[2]), "label 2"),
        (dict(point_coords=[[10, 10, 3]], point_labels=[1]), "point_coords must have shape"),
        (dict(point_coords=[[10, 10], [20, 20]], point_labels=[1]), "point_labels must have shape"),
        (dict(point_coords=[[10, 10]]), "need point_labels"),
        (dict(box=[1, 2, 3]), "box must have shape"),
        (dict(boxes=[[1, 2, 3, 4, 5]]), "boxes must have shape"),
        (dict(box=[1, 2, 3, 4], boxes=[[1, 2, 3, 4]]), "not both"),
        (dict(), "at least one point or one box"),
        (dict(point_coords=[[10, 10]], point_labels=[1], mask_input=np.zeros((2, 2))), "mask_input must have shape"),
        (dict(boxes=[[1, 2, 3, 4]] * 2, mask_input=np.zeros((3, 1, 256, 256))), "3 masks for 2 prompt sets"),
        (dict(point_coords=[[np.nan, 10]], point_labels=[1]), "NaN"),
    ],
)
def test_predict_rejects_bad_prompts(predictor, kwargs, needle):
    predictor.set_image(np.zeros((400, 600, 3), np.uint8))
    with pytest.raises(UsageError) as info:
        predictor.predict(**kwargs)
    assert needle in info.value.one_line()
    assert "\n" not in info.value.one_line()


def test_predict_before_set_image_and_bad_image(l0_folder):
    fresh = Predictor(l0_folder)
    with pytest.raises(UsageError, match="set_image"):
        fresh.predict(point_coords=[[1, 1]], point_labels=[1])
    with pytest.raises(UsageError, match="image"):
        fresh.set_image(np.zeros((4, 4, 5), np.uint8))


def test_artifact_choice_and_integrity(l0_folder, tmp_path):
    chosen = Predictor(l0_folder, encoder="encoder.onnx.fp32", decoder="decoder.onnx.fp32", prefer=("onnx",))
    assert chosen.info["encoder"] == "encoder.onnx.fp32" and chosen.info["decoder_profile"] == "sam"
    with pytest.raises(ArtifactError, match="no artifact"):
        Predictor(l0_folder, encoder="encoder.ort.int8")
    with pytest.raises(UsageError, match="not usable as the encoder"):
        Predictor(l0_folder, encoder="decoder.onnx.fp32")
    with pytest.raises(UsageError, match="prefer"):
        Predictor(l0_folder, prefer=("coreml",))
    with pytest.raises(ArtifactError, match="no manifest.json"):
        Predictor(tmp_path)

    # A copy whose manifest says the decoder returns token 0 only (--single-mask), and one with a bad hash.
    def copy_with(edit) -> Path:
        folder = linked_copy(l0_folder, tmp_path / f"copy{len(list(tmp_path.iterdir()))}")
        manifest = json.loads((l0_folder / "manifest.json").read_text())
        edit(manifest)
        (folder / "manifest.json").write_text(json.dumps(manifest))
        return folder

    def token0(manifest):
        decoder = next(a for a in manifest["artifacts"] if a["component"] == "decoder")
        for output in decoder["outputs"]:
            if output["name"] != "masks":
                output["shape"][1] = 1
        manifest["model"]["mask_selection"]["outputs"] = "token0"

    single = Predictor(copy_with(token0))
    single.set_image(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(UsageError, match="single-mask"):
        single.predict(point_coords=[[10, 10]], point_labels=[1], multimask_output=True)

    def bad_hash(manifest):
        manifest["artifacts"][0]["sha256"] = "0" * 64

    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        Predictor(copy_with(bad_hash))


# --------------------------------------------------------------------------------------- (c) CLI error lines


def test_cli_errors_are_one_line(l0_folder, tmp_path):
    image = tmp_path / "img.png"
    Image.fromarray(photograph("coffee")).save(image)  # 600x400
    text = tmp_path / "x.png"
    text.write_text("this is not an image\n")
    out = str(tmp_path / "out" / "m.png")
    cases = [
        (("predict", str(l0_folder), str(tmp_path / "missing.png"), "--point", "10,10", "-o", out), ["image not found"]),
        (("predict", str(l0_folder), str(text), "--point", "10,10", "-o", out), ["cannot read image"]),
        (("predict", str(l0_folder), str(image), "--point", "601,10", "-o", out), ["outside the 600x400 image"]),
        (("predict", str(l0_folder), str(image), "--point=-3,10", "-o", out), ["outside"]),
        (("predict", str(l0_folder), str(image), "--box", "300,10,100,200", "-o", out), ["x1 < x0"]),
        (("predict", str(tmp_path), str(image), "--point", "10,10", "-o", out), ["no manifest.json"]),
        (("predict", str(tmp_path / "nowhere"), str(image), "--point", "10,10", "-o", out), ["not found"]),
        (("predict", str(l0_folder), str(image), "--point", "10;10", "-o", out), ["bad --point"]),
        (("predict", str(l0_folder), str(image), "--point", "10,10,5", "-o", out), ["not 0 or 1"]),
        (("predict", str(l0_folder), str(image), "--box", "1,2,3", "-o", out), ["bad --box"]),
        (("predict", str(l0_folder), str(image), "-o", out), ["at least one --point"]),
        (("predict", str(l0_folder), str(image), "--point", "10,10", "-o", str(tmp_path / "m.jpg")), [".png"]),
        (("predict", str(l0_folder), str(image), "--point", "10,10", "--encoder", "encoder.ort.int8", "-o", out), ["no artifact"]),
    ]
    for args, needles in cases:
        assert_one_line_error(run_cli(*args), *needles)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------- (d) CLI outputs


def _odd_images(tmp_path: Path) -> dict[str, tuple[Path, tuple[int, int]]]:
    rgb = photograph("astronaut")
    files = {}
    Image.fromarray(rgb[:333, :417]).save(tmp_path / "rgb.png")
    files["rgb"] = (tmp_path / "rgb.png", (333, 417))
    Image.fromarray(photograph("camera")[:257, :199][:, :, 0]).save(tmp_path / "gray.png")
    files["gray"] = (tmp_path / "gray.png", (257, 199))
    rgba = np.dstack([rgb[:101, :151], np.full((101, 151), 200, np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    files["rgba"] = (tmp_path / "rgba.png", (101, 151))
    Image.fromarray(rgb[:211, :123]).convert("P", palette=Image.ADAPTIVE).save(tmp_path / "palette.png")
    files["palette"] = (tmp_path / "palette.png", (211, 123))
    Image.fromarray(rgb[:99, :77]).save(tmp_path / "rgb.jpg", quality=90)
    files["jpeg"] = (tmp_path / "rgb.jpg", (99, 77))
    return files


@pytest.mark.parametrize("kind", ["rgb", "gray", "rgba", "palette", "jpeg"])
def test_cli_predict_writes_mask_overlay_json(l0_folder, tmp_path, kind):
    path, (height, width) = _odd_images(tmp_path)[kind]
    out = tmp_path / "result" / "mask.png"
    point = f"{width // 2},{height // 2}"
    proc = run_cli("predict", str(l0_folder), str(path), "--point", point, "--point", "3,3,0", "--multimask", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    score_lines = [line for line in proc.stdout.splitlines() if "score" in line]
    assert len(score_lines) == 1, proc.stdout
    mask = Image.open(out)
    assert mask.size == (width, height) and mask.mode == "L"
    assert set(np.unique(np.asarray(mask))) <= {0, 255}
    overlay = Image.open(out.with_name("mask.overlay.png"))
    assert overlay.size == (width, height) and overlay.mode == "RGB"
    report = json.loads(out.with_name("mask.json").read_text())
    assert report["image_size"] == [height, width]
    assert report["prompts"]["points"] == [
        {"x": float(width // 2), "y": float(height // 2), "label": 1},
        {"x": 3.0, "y": 3.0, "label": 0},
    ]
    assert len(report["results"]) == 1 and len(report["results"][0]["scores"]) == 3
    assert report["results"][0]["area_px"] == int(np.count_nonzero(np.asarray(mask)))
    assert report["encoder"] == "encoder.onnx.fp32" and report["decoder"] == "decoder.onnx.fp32"


def test_cli_predict_several_boxes_writes_union_and_per_box_masks(l0_folder, tmp_path):
    image = photograph("coffee")  # 400x600
    Image.fromarray(image).save(tmp_path / "coffee.png")
    boxes = [[50, 40, 300, 350], [250, 100, 590, 390], [10, 10, 100, 80]]
    out = tmp_path / "m.png"
    args = ["predict", str(l0_folder), str(tmp_path / "coffee.png"), "-o", str(out), "--point", "200,200"]
    for box in boxes:
        args += ["--box", ",".join(str(v) for v in box)]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert len([line for line in proc.stdout.splitlines() if line.startswith("box ")]) == 3
    per_box = [np.asarray(Image.open(tmp_path / f"m.{i}.png")) > 0 for i in range(3)]
    union = np.asarray(Image.open(out)) > 0
    np.testing.assert_array_equal(union, np.logical_or.reduce(per_box))
    report = json.loads((tmp_path / "m.json").read_text())
    assert [r["box"] for r in report["results"]] == [[float(v) for v in b] for b in boxes]
    assert [r["mask"] for r in report["results"]] == ["m.0.png", "m.1.png", "m.2.png"]
    assert (tmp_path / "m.overlay.png").is_file()

    # The same masks as the Python API (token 0 per box: no --multimask).
    with Predictor(l0_folder) as runtime:
        runtime.set_image(image)
        api = runtime.predict(point_coords=[[200, 200]], point_labels=[1], boxes=boxes, multimask_output=False)
    for i in range(3):
        assert mask_iou(api.best(i), per_box[i]) >= MIN_IOU


def test_read_image_handles_16_bit_and_exif(tmp_path):
    from evsam_export.data.images import read_image_file as read_image

    ramp = (np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    rgb = read_image(tmp_path / "deep.png")
    assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8 and rgb.max() > 200

    wide = np.zeros((20, 50, 3), np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.fromarray(wide).save(tmp_path / "rotated.jpg", exif=exif)
    assert read_image(tmp_path / "rotated.jpg").shape == (50, 20, 3)

"""Bounded memory per prompt batch.

Prompt sets run in chunks sized to a memory budget and are post-processed per chunk, so the host's working
memory does not grow with the number of prompt sets beyond the results themselves; chunking never changes a
result. The decoder is asked only for the outputs the runtime reads. The CLI never makes whole-image float
copies. Peak RSS measurements are in docs/benchmarks.md ("Memory")."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from PIL import Image

from evsam_export import contract, overlay
from evsam_export.cli import predict_cmd
from evsam_export.contract import TensorSpec
from evsam_export.errors import UsageError
from evsam_export.model import processing
from evsam_export.model.processing import ImageGeometry
from evsam_export.runners.base import Runner
from evsam_export.runtime import Predictor
from evsam_export.runtime import predictor as predictor_module

SEVEN_BOXES = np.array(
    [
        [10, 10, 100, 120], [50, 60, 300, 250], [0, 0, 467, 301], [200, 100, 210, 110],
        [5, 5, 6, 6], [300, 20, 460, 290], [100, 100, 400, 200],
    ],
    dtype=np.float64,
)


def scene(height: int, width: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def record_decoder_calls(runtime: Predictor) -> list[tuple[int, tuple[str, ...] | None]]:
    """Wrap the decoder's infer so each call's prompt-set count and requested outputs are recorded."""
    calls: list[tuple[int, tuple[str, ...] | None]] = []
    infer = runtime.decoder.infer

    def recording(feeds, outputs=None):
        calls.append((int(feeds[contract.POINT_COORDS].shape[0]), None if outputs is None else tuple(outputs)))
        return infer(feeds, outputs=outputs)

    runtime.decoder.infer = recording
    return calls


# ------------------------------------------------------------------------------------- chunks change nothing


@pytest.fixture(scope="module")
def seven_box_results(l0_export):
    """Results for SEVEN_BOXES with chunk sizes 1, 3, all (7) and the default budget, plus the decoder calls."""
    image = scene(301, 467)
    results = {}
    for chunk in (1, 3, 7, None):
        with Predictor(l0_export, threads=2, max_prompt_batch=chunk) as runtime:
            runtime.set_image(image)
            calls = record_decoder_calls(runtime)
            for multimask in (False, True):
                prediction = runtime.predict(boxes=SEVEN_BOXES, multimask_output=multimask)
                logits = runtime.predict(boxes=SEVEN_BOXES, multimask_output=multimask, return_logits=True)
                results[chunk, multimask] = (prediction, logits.masks)
            results[chunk, "calls"] = calls
    return results


@pytest.mark.parametrize("chunk", [1, 3, None], ids=["chunk1", "chunk3", "default"])
@pytest.mark.parametrize("multimask", [False, True], ids=["single", "multimask"])
def test_chunk_size_never_changes_results(seven_box_results, chunk, multimask):
    whole, whole_logits = seven_box_results[7, multimask]
    chunked, chunked_logits = seven_box_results[chunk, multimask]
    assert whole.masks.shape == (7, 3 if multimask else 1, 301, 467)
    assert chunked.masks.dtype == bool
    assert np.array_equal(chunked.masks, whole.masks)
    assert np.array_equal(chunked.scores, whole.scores)
    # ONNX Runtime's kernels sum in a batch-size-dependent order, so the decoder's logits for one prompt set
    # differ by up to ~1.2e-6 between a call with 1, 3 or 7 prompt sets (measured; docs/benchmarks.md).
    np.testing.assert_allclose(chunked.low_res_logits, whole.low_res_logits, rtol=0, atol=1e-5)
    np.testing.assert_allclose(chunked_logits, whole_logits, rtol=0, atol=1e-5)
    assert np.array_equal(chunked.best_masks(), whole.best_masks())


def test_prompt_sets_run_in_chunks_and_fetch_only_used_outputs(seven_box_results):
    used = (contract.LOW_RES_MASKS, contract.IOU_PREDICTIONS)
    per_predict = {1: [1] * 7, 3: [3, 3, 1], 7: [7]}
    for chunk, sizes in per_predict.items():
        calls = seven_box_results[chunk, "calls"]
        assert [count for count, _ in calls] == sizes * 4  # 2 multimask settings x (masks, logits)
        assert {outputs for _, outputs in calls} == {used}


def test_default_chunk_follows_the_budget(l0_export):
    with Predictor(l0_export, threads=1, memory_budget_mib=1) as tiny, Predictor(l0_export, threads=1) as default:
        assert tiny.prompt_chunk_size(True) == tiny.prompt_chunk_size(False) == 1
        single = predictor_module.prompt_sets_per_chunk(predictor_module.DEFAULT_MEMORY_BUDGET_MIB, 1)
        multi = predictor_module.prompt_sets_per_chunk(predictor_module.DEFAULT_MEMORY_BUDGET_MIB, 3)
        assert default.prompt_chunk_size(False) == single
        assert default.prompt_chunk_size(True) == multi
        assert single >= 16  # an app's batch of 16 boxes is one decoder call
        assert single >= multi >= 1


def test_host_memory_per_chunk_follows_the_upscale_path(monkeypatch):
    budget = predictor_module.DEFAULT_MEMORY_BUDGET_MIB
    per_set = predictor_module.DECODER_MIB_PER_PROMPT_SET
    host = predictor_module.HOST_MIB_PER_CANDIDATE
    monkeypatch.setattr(processing, "opencv", lambda: object())  # one mask's temporaries at a time
    assert predictor_module.prompt_sets_per_chunk(budget, 1) == predictor_module.prompt_sets_per_chunk(budget, 3)
    assert predictor_module.prompt_sets_per_chunk(budget, 3) == (budget - host) // per_set
    monkeypatch.setattr(processing, "opencv", lambda: None)  # numpy upscales every candidate of the chunk
    assert predictor_module.prompt_sets_per_chunk(budget, 1) > predictor_module.prompt_sets_per_chunk(budget, 3)
    assert predictor_module.prompt_sets_per_chunk(budget, 3) == budget // (per_set + 3 * host)
    assert predictor_module.prompt_sets_per_chunk(budget, 0) == budget // per_set


def test_prompt_sets_per_chunk_scales_with_budget(monkeypatch):
    monkeypatch.setattr(processing, "opencv", lambda: None)
    per_set = predictor_module.DECODER_MIB_PER_PROMPT_SET + predictor_module.HOST_MIB_PER_CANDIDATE
    assert predictor_module.prompt_sets_per_chunk(per_set * 10, 1) == 10
    assert predictor_module.prompt_sets_per_chunk(per_set * 10 - 1, 1) == 9
    assert predictor_module.prompt_sets_per_chunk(0.5, 3) == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"memory_budget_mib": 0},
        {"memory_budget_mib": -5},
        {"memory_budget_mib": True},
        {"memory_budget_mib": "512"},
        {"memory_budget_mib": float("nan")},
        {"max_prompt_batch": 0},
        {"max_prompt_batch": 2.5},
        {"max_prompt_batch": True},
    ],
)
def test_bad_budget_arguments_are_one_line(l0_export, kwargs):
    with pytest.raises(UsageError) as info:
        Predictor(l0_export, **kwargs)
    assert "\n" not in str(info.value)
    assert next(iter(kwargs)) in str(info.value)


# ----------------------------------------------------------------------------- memory does not grow with B


def traced_peak_beyond_results(runtime: Predictor, boxes: np.ndarray) -> int:
    """Peak host bytes (numpy/Python, as tracemalloc sees them) of one predict() beyond the arrays it returns."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        prediction = runtime.predict(boxes=boxes, multimask_output=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    kept = prediction.masks.nbytes + prediction.scores.nbytes + prediction.low_res_logits.nbytes
    return peak - before - kept


def test_host_memory_beyond_results_does_not_grow_with_prompt_sets(l0_export):
    image = scene(240, 320, seed=5)
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 150, (48, 2))
    boxes = np.concatenate([corners, corners + rng.uniform(5, 80, (48, 2))], axis=1)
    with Predictor(l0_export, threads=2, max_prompt_batch=2) as runtime:
        runtime.set_image(image)
        few = traced_peak_beyond_results(runtime, boxes[:4])
        many = traced_peak_beyond_results(runtime, boxes)
    # Unchunked, the 48-box run held 12x the 4-box float temporaries (each 1024x1024 upscale is 4 MiB per
    # candidate); chunked, both hold one chunk of two prompt sets. 4 MiB of slack covers the prompt arrays.
    assert many <= few + 4 * 2**20, (few, many)


# ---------------------------------------------------------------------------- banded post-processing is exact


def _banded(low_res, geometry, band_bytes):
    logits = np.empty(low_res.shape[:-2] + geometry.original_size, np.float32)
    masks = np.empty(logits.shape, bool)
    processing.postprocess_into(low_res, geometry, logits, band_bytes=band_bytes)
    processing.postprocess_into(low_res, geometry, masks, band_bytes=band_bytes)
    assert np.array_equal(masks, processing.binarize(logits))
    return logits


def _geometry(original_size):
    return ImageGeometry(original_size=original_size, input_size=processing.resized_shape(*original_size, 1024), encoder_size=512)


@pytest.mark.parametrize("original_size", [(301, 467), (5000, 2), (1, 900), (1024, 1024)])
@pytest.mark.parametrize("band_bytes", [1, 200_000, 2**40], ids=["row", "band", "whole"])
def test_postprocess_into_is_bit_identical_without_opencv(original_size, band_bytes, monkeypatch):
    monkeypatch.setattr(processing, "opencv", lambda: None)
    low_res = np.random.default_rng(1).standard_normal((2, 3, 256, 256)).astype(np.float32)
    geometry = _geometry(original_size)
    assert np.array_equal(_banded(low_res, geometry, band_bytes), processing.postprocess_masks(low_res, geometry))


@pytest.mark.parametrize("original_size", [(301, 467), (5000, 2), (1, 900), (768, 1024), (1080, 1920)])
def test_postprocess_into_with_opencv_is_within_the_logit_tolerance_and_bands_join_exactly(original_size):
    """OpenCV computes source coordinates in its own float arithmetic: the result may differ from the numpy
    reference by less than the parity gate's 1e-3 logit tolerance, never by band size."""
    pytest.importorskip("cv2")
    low_res = (3 * np.random.default_rng(1).standard_normal((2, 3, 256, 256))).astype(np.float32)
    geometry = _geometry(original_size)
    whole = _banded(low_res, geometry, 2**40)
    for band_bytes in (1, 200_000):
        assert np.array_equal(_banded(low_res, geometry, band_bytes), whole)
    assert np.abs(whole - processing.postprocess_masks(low_res, geometry)).max() < 1e-3


@pytest.mark.parametrize("original_size", [(768, 1024), (301, 467), (1, 900), (1023, 1), (1024, 1024)])
def test_opencv_crop_of_the_frame_equals_the_whole_frame_cropped(original_size):
    """Resizing only the low-res rows and columns the crop reads gives the cropped 1024 frame bit for bit."""
    pytest.importorskip("cv2")
    low_res = (3 * np.random.default_rng(2).standard_normal((2, 1, 256, 256))).astype(np.float32)
    geometry = _geometry(original_size)
    new_h, new_w = geometry.input_size
    frame = processing.resize_bilinear_fast(low_res, 1024, 1024)[..., :new_h, :new_w]
    expected = processing.resize_bilinear_fast(frame, *original_size) if original_size != (new_h, new_w) else frame
    got = np.empty(low_res.shape[:-2] + original_size, np.float32)
    processing.postprocess_into(low_res, geometry, got)
    if original_size[0] == new_h:  # no row blend: OpenCV's own values throughout
        assert np.array_equal(got, expected)
    assert np.abs(got - expected).max() < 1e-3


def test_frame_crop_source_reads_only_what_the_crop_needs():
    # Output row 767 of the x4 frame reads source rows 191 and 192: 193 rows, all 256 columns.
    assert processing.frame_crop_source((768, 1024)) == (193, 256)
    assert processing.frame_crop_source((1, 1024)) == (2, 256)
    assert processing.frame_crop_source((1024, 1024)) == (256, 256)


# ---------------------------------------------------------------------------------- runner output selection


class TwoOutputs(Runner):
    runtime = "fake"

    def __init__(self) -> None:
        super().__init__([TensorSpec("x", "float32", (2,))], [TensorSpec("a", "float32", (2,)), TensorSpec("b", "float32", (2,))], "fake")
        self.asked: list[list[str] | None] = []

    def _load(self) -> None:
        pass

    def _infer(self, feeds):
        self.asked.append(None)
        return {"a": feeds["x"] + 1, "b": feeds["x"] * 2}


def test_runner_returns_only_wanted_outputs():
    runner = TwoOutputs()
    feeds = {"x": np.array([1.0, 2.0], np.float32)}
    assert sorted(runner.infer(feeds)) == ["a", "b"]
    only_b = runner.infer(feeds, outputs=["b"])
    assert list(only_b) == ["b"]
    assert np.array_equal(only_b["b"], [2.0, 4.0])
    with pytest.raises(UsageError, match="no output named"):
        runner.infer(feeds, outputs=["masks"])


def test_ort_runner_runs_only_the_nodes_of_the_wanted_outputs(l0_export):
    """ORT runs every node of a session whatever is fetched, so the `sam` decoder asked for its low-res outputs
    runs on a session pruned to their nodes (no in-graph upscale): same values, bit for bit."""
    from evsam_export.manifest import read_manifest
    from evsam_export.runners import runner_for_artifact
    from evsam_export.runners.ort_runner import outputs_subgraph

    manifest = read_manifest(l0_export)
    artifact = manifest.artifact("decoder.onnx.fp32")
    spec = contract.artifact_spec(artifact)
    wanted = [contract.LOW_RES_MASKS, contract.IOU_PREDICTIONS]
    pruned = outputs_subgraph(l0_export / artifact.path, wanted)
    assert [o.name for o in pruned.graph.output] == wanted
    assert "Resize" not in {node.op_type for node in pruned.graph.node}  # the upscale to orig_im_size is gone
    assert [i.name for i in pruned.graph.input] == spec.input_names  # same feeds
    runner = runner_for_artifact(l0_export, artifact, 1).load()
    try:
        embeddings = np.random.default_rng(0).standard_normal(contract.EMBEDDINGS_SHAPE).astype(np.float32)
        feeds = contract.decoder_feeds(
            spec,
            image_embeddings=embeddings,
            point_coords=np.array([[[10.0, 10.0], [0.0, 0.0]], [[500.0, 300.0], [0.0, 0.0]]], np.float32),
            point_labels=np.array([[1.0, -1.0], [1.0, -1.0]], np.float32),
            original_size=predictor_module.UNREAD_MASKS_SIZE,
        )
        full = runner.infer(feeds)
        out = runner.infer(feeds, outputs=wanted)
        assert runner.session_for(wanted) is not runner.session
        assert runner.session_for([o.name for o in spec.outputs]) is runner.session
    finally:
        runner.close()
    assert list(out) == wanted
    assert out[contract.LOW_RES_MASKS].shape == (2, 4, 256, 256)
    for name in wanted:
        assert np.array_equal(out[name], full[name])


# ------------------------------------------------------------------------------------ CLI: no float copies


def test_overlay_in_bands_equals_whole_image_blend(monkeypatch):
    rgb = scene(37, 53, seed=7)
    rng = np.random.default_rng(8)
    masks = rng.random((3, 37, 53)) > 0.5
    canvas = rgb.astype(np.float32)  # the whole-image blend the banded one must reproduce
    for index, mask in enumerate(masks):
        colour = np.asarray(overlay.PALETTE[index], dtype=np.float32)
        canvas[mask] = canvas[mask] * (1.0 - overlay.OVERLAY_ALPHA) + colour * overlay.OVERLAY_ALPHA
    expected = np.clip(canvas.round(), 0, 255).astype(np.uint8)
    monkeypatch.setattr(overlay, "BAND_BYTES", 4 * 3 * 53 * 5)  # five rows per band
    banded = np.asarray(overlay.prompt_overlay(rgb, masks, [], []))
    assert np.array_equal(banded, expected)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "CMYK"])
def test_pixels_read_in_bands_equal_numpy_asarray(tmp_path, monkeypatch, mode):
    pixels = scene(41, 29, seed=9)
    image = Image.fromarray(pixels).convert(mode)
    path = tmp_path / ("image.tif" if mode == "CMYK" else "image.png")
    image.save(path)
    expected = processing.as_rgb_uint8(np.asarray(image.convert("RGB") if mode == "CMYK" else image))
    from evsam_export.data import images

    monkeypatch.setattr(images, "READ_BAND_BYTES", 3 * 29 * 4)  # a few rows per band
    assert np.array_equal(images.read_image_file(path), expected)


def test_mask_png_is_0_and_255(tmp_path):
    mask = np.random.default_rng(2).random((19, 23)) > 0.5
    path = tmp_path / "mask.png"
    predict_cmd.save_mask(mask, path)
    written = np.asarray(Image.open(path))
    assert written.dtype == np.uint8
    assert np.array_equal(written, np.where(mask, 255, 0))


def test_cli_memory_budget_changes_no_output(l0_export, tmp_path):
    import subprocess
    import sys

    Image.fromarray(scene(120, 160, seed=11)).save(tmp_path / "scene.png")
    boxes = ["10,10,60,50", "40,30,150,110", "0,0,160,120"]
    written = {}
    for budget in (None, "1"):
        out = tmp_path / f"budget-{budget}.png"
        args = ["predict", str(l0_export), str(tmp_path / "scene.png"), "-o", str(out), "--threads", "1"]
        args += [item for box in boxes for item in ("--box", box)]
        args += [] if budget is None else ["--memory-budget", budget]
        code = "import sys; sys.argv = ['evsam-export'] + sys.argv[1:]; from evsam_export.cli import main; main()"
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        written[budget] = [(tmp_path / f"budget-{budget}{suffix}").read_bytes() for suffix in (".png", ".0.png", ".1.png", ".2.png")]
    assert written[None] == written["1"]
    refused = subprocess.run(
        [sys.executable, "-c", code, "predict", str(l0_export), str(tmp_path / "scene.png"), "-o", str(tmp_path / "x.png"),
         "--box", "1,1,5,5", "--memory-budget", "0"],
        capture_output=True, text=True, timeout=300,
    )
    assert refused.returncode == 2, refused.stderr  # a usage error, before any model runs
    assert not (tmp_path / "x.png").exists()

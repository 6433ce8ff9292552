"""The split decoder: decoder_image (what depends on the image and the mask prompt only) chained into
decoder_prompt gives the single graph's outputs; the export records and checks the pair; the Predictor runs it
by default, with the image half once per image, and returns the single graph's masks, mask prompts included."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from evsam_export import contract
from evsam_export.errors import UsageError
from evsam_export.manifest import read_manifest
from evsam_export.model.checkpoint import load_model
from evsam_export.model.sam import DecoderGraph, DecoderImageGraph, DecoderPromptGraph
from evsam_export.model.variants import VARIANTS
from evsam_export.parity.suites import load_suite
from evsam_export.runners import runner_for_artifact
from evsam_export.runners.split_decoder import SplitDecoderRunner, split_pair_of
from evsam_export.runtime import Predictor

SPLIT_IDS = ["decoder_image.onnx.fp32", "decoder_prompt.onnx.fp32"]


def scene(height: int = 200, width: int = 300, seed: int = 1) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], axis=-1).astype(np.uint8)
    rgb[50:140, 80:200] = (220, 40, 40)  # an object the prompts aim at
    return np.clip(rgb + np.random.default_rng(seed).integers(0, 30, rgb.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def model():
    model, _ = load_model(VARIANTS["l0"], "synthetic:3")
    return model.eval()


@pytest.mark.parametrize(("mask_case", "single_mask_rule"), [
    ("no mask", None), ("one mask for all", "sam-onnx"), ("mask per prompt set", None)])
def test_split_pair_equals_the_single_token_layout_graph(model, mask_case, single_mask_rule):
    single_mask = single_mask_rule is not None
    rule = single_mask_rule or "token0"
    sample = contract.sample_feeds(contract.decoder_spec("tensorrt"), batch=2, num_points=2, seed=4)
    feeds = {name: torch.from_numpy(value) for name, value in sample.items()}
    masks = feeds["mask_input"]
    mask_input, has_mask = {"no mask": (masks[:1], torch.zeros(1)), "one mask for all": (masks[:1], torch.ones(1)),
                            "mask per prompt set": (masks, torch.ones(2))}[mask_case]
    coords, labels = feeds["point_coords"], feeds["point_labels"]
    with torch.inference_mode():
        iou, low_res = DecoderGraph(model, "tensorrt", single_mask, rule, token_layout=True)(
            feeds["image_embeddings"], coords, labels, mask_input, has_mask)
        image_side = DecoderImageGraph(model)(feeds["image_embeddings"], mask_input, has_mask)
        split_iou, split_low_res = DecoderPromptGraph(model, single_mask, rule)(*image_side, coords, labels)
    assert [tuple(t.shape) for t in image_side] == [tuple(s.shape) for s in contract.image_side_specs(mask_input.shape[0])]
    # The same ops on the same values: the halves only move the image-only ops into a graph of their own (and the
    # token-layout graph equals upstream's masks: tests/unit/test_decoder_layout.py).
    assert torch.equal(split_low_res, low_res) and torch.equal(split_iou, iou)


def test_export_records_and_checks_the_split_pair(l0_export):
    manifest = read_manifest(l0_export)
    image, prompt = (manifest.artifact(artifact_id) for artifact_id in SPLIT_IDS)
    assert (image.component, prompt.component) == (contract.DECODER_IMAGE, contract.DECODER_PROMPT)
    assert image.parent == prompt.parent == "decoder.onnx.fp32"
    assert split_pair_of(manifest.artifacts, manifest.artifact("decoder.onnx.fp32")) == (image, prompt)
    assert image.inputs == list(contract.decoder_image_spec().inputs) and image.outputs == list(contract.decoder_image_spec().outputs)
    assert prompt.inputs == list(contract.decoder_prompt_spec().inputs) and prompt.outputs == list(contract.decoder_prompt_spec().outputs)
    check = prompt.facts["split_check"]
    tolerance = load_suite("default").tolerance("fp32")
    assert check["cases"] == ["no mask prompt", "one mask for all prompt sets", "a mask per prompt set"]
    assert check["low_res_masks_max_abs"] <= tolerance.decoder_logit_max_abs
    assert check["low_res_masks_max_abs"] <= 1e-5 and check["iou_predictions_max_abs"] <= 1e-5  # bit-close, not just gated
    # The mask prompt's convolutions run in the image half only, not once per decoder call.
    assert image.facts["op_types"].get("Conv", 0) >= 1 and "Conv" not in prompt.facts["op_types"]


@pytest.fixture(scope="module")
def predictors(l0_export):
    split, single = Predictor(l0_export, threads=2), Predictor(l0_export, threads=2, split_decoder=False)
    image = scene()
    split.set_image(image)
    single.set_image(image)
    yield split, single
    split.close()
    single.close()


def test_predictor_runs_the_split_pair_by_default(predictors):
    split, single = predictors
    assert split.info["split_decoder"] == SPLIT_IDS and split.info["decoder"] == "decoder.onnx.fp32"
    assert single.info["split_decoder"] is None
    assert isinstance(split.decoder, SplitDecoderRunner) and split.decoder.image_side_runs == 1  # in set_image
    requests = [
        {"point_coords": [[140, 90]], "point_labels": [1]},
        {"point_coords": [[140, 90], [20, 20]], "point_labels": [1, 0], "multimask_output": False},
        {"boxes": [[80, 50, 200, 140], [10, 10, 60, 80], [0, 0, 300, 200]], "multimask_output": False},
    ]
    for request in requests:
        a, b = split.predict(**request), single.predict(**request)
        assert np.array_equal(a.masks, b.masks) and np.array_equal(a.scores, b.scores)
        assert float(np.abs(a.low_res_logits - b.low_res_logits).max()) <= 1e-5
    assert split.decoder.image_side_runs == 1  # every prompt without a mask reused set_image's image half


def test_mask_prompts_run_the_image_half_with_the_mask(predictors):
    split, single = predictors
    first = split.predict(boxes=[[80, 50, 200, 140], [10, 10, 60, 80]], multimask_output=False)
    runs = split.decoder.image_side_runs
    one_each = first.low_res_logits  # [2,1,256,256]: a mask per prompt set
    for mask_input in (first.best_low_res(0), one_each):
        a = split.predict(point_coords=[[[140, 90]], [[30, 40]]], point_labels=[[1], [1]], mask_input=mask_input)
        b = single.predict(point_coords=[[[140, 90]], [[30, 40]]], point_labels=[[1], [1]], mask_input=mask_input)
        assert float(np.abs(a.low_res_logits - b.low_res_logits).max()) <= 1e-5 and np.array_equal(a.masks, b.masks)
    assert split.decoder.image_side_runs == runs + 2
    # Back to no mask prompt: the cached image half of this image again, not a new run.
    split.predict(point_coords=[[140, 90]], point_labels=[1])
    assert split.decoder.image_side_runs == runs + 2


def test_runner_cache_follows_the_embeddings(l0_export):
    manifest = read_manifest(l0_export)
    image, prompt = split_pair_of(manifest.artifacts, manifest.artifact("decoder.onnx.fp32"))
    single = runner_for_artifact(l0_export, manifest.artifact("decoder.onnx.fp32"), threads=2)
    with SplitDecoderRunner(runner_for_artifact(l0_export, image, 2), runner_for_artifact(l0_export, prompt, 2)) as split, single:
        feeds = contract.sample_feeds(contract.decoder_spec("tensorrt"), batch=2, num_points=2, seed=6)
        embeddings = feeds["image_embeddings"].copy()  # writeable: changed in place below
        wanted = [contract.LOW_RES_MASKS]
        for scale in (1.0, 0.5):
            embeddings *= scale
            no_mask = contract.decoder_feeds(split, embeddings, feeds["point_coords"], feeds["point_labels"])
            expected = single.infer(contract.decoder_feeds(single, original_size=(4, 4), **no_mask), outputs=wanted)
            assert float(np.abs(split.infer(no_mask, outputs=wanted)[wanted[0]] - expected[wanted[0]]).max()) <= 1e-5
        assert split.image_side_runs == 2  # an in-place change of a writeable array is seen


def test_split_decoder_choice_and_refusal(copy_export):
    folder = copy_export("nosplit")
    data = json.loads((folder / "manifest.json").read_text())
    data["artifacts"] = [a for a in data["artifacts"] if a["id"] not in SPLIT_IDS]
    (folder / "manifest.json").write_text(json.dumps(data))
    with Predictor(folder, threads=1) as predictor:
        assert predictor.info["split_decoder"] is None  # falls back to the single graph
    with pytest.raises(UsageError, match="no split decoder exported beside decoder.onnx.fp32"):
        Predictor(folder, split_decoder=True)
    with pytest.raises(UsageError, match="split_decoder must be"):
        Predictor(folder, split_decoder="yes")

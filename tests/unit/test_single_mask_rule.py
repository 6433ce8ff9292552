"""--single-mask-rule sam-onnx: SAM's ONNX wrapper's token choice, checked against a reference written here
from the rule's description, on the exported graph and in the parity gate."""

from __future__ import annotations

import numpy as np
import pytest

from evsam_export import api, contract
from evsam_export.errors import RecipeError, UsageError
from evsam_export.export.onnx_export import export_onnx
from evsam_export.export.simplify import ort_outputs
from evsam_export.model.checkpoint import load_model
from evsam_export.model.sam import DecoderGraph
from evsam_export.model.variants import get_variant
from evsam_export.pipeline.recipe import load_recipe
from evsam_export.progress import Reporter


def sam_onnx_reference(iou_predictions: np.ndarray, num_points: int) -> np.ndarray:
    """The rule as SAM's ONNX wrapper documents it: with more than two point tokens (padding point included)
    return the multimask_output=False mask, token 0; otherwise the candidate of tokens 1, 2, 3 with the highest
    predicted IoU (the first on a tie)."""
    chosen = []
    for row in np.asarray(iou_predictions):
        if num_points > 2:
            chosen.append(0)
            continue
        best = 1
        for token in (2, 3):
            if row[token] > row[best]:
                best = token
        chosen.append(best)
    return np.array(chosen)


@pytest.mark.parametrize("num_points", [1, 2, 3, 5])
def test_contract_rule_equals_the_reference(num_points):
    iou = np.random.default_rng(num_points).uniform(0, 1, size=(64, 4)).astype(np.float32)
    iou[:5, 1:] = iou[:5, 3:4]  # ties among tokens 1-3
    assert np.array_equal(contract.single_mask_tokens(iou, num_points, "sam-onnx"), sam_onnx_reference(iou, num_points))
    assert not contract.single_mask_tokens(iou, num_points, "token0").any()


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    """The l0 (synthetic:0) decoder traced with all four tokens and with the sam-onnx single mask."""
    model, _ = load_model(get_variant("l0"))
    folder = tmp_path_factory.mktemp("decoders")
    paths = {}
    for name, single, rule in (("all4", False, "token0"), ("sam_onnx", True, "sam-onnx")):
        spec = contract.decoder_spec("sam", single_mask=single)
        paths[name] = (folder / f"{name}.onnx", spec)
        export_onnx(DecoderGraph(model, "sam", single, rule), spec, paths[name][0])
    return paths


@pytest.mark.parametrize("labels", [[1, -1], [2, 3], [1, 0, -1], [1, 2, 3], [1, 1, 0, -1]])
def test_exported_decoder_follows_the_reference(decoders, labels):
    """A point + padding and a box (2 tokens: best of 1-3), two points + padding and a point + box (3: token 0)."""
    all4_path, all4_spec = decoders["all4"]
    single_path, single_spec = decoders["sam_onnx"]
    feeds = contract.sample_feeds(all4_spec, batch=6, num_points=len(labels), seed=len(labels))
    feeds[contract.POINT_LABELS] = np.tile(np.array(labels, np.float32), (6, 1))
    masks, iou, low_res = ort_outputs(all4_path, feeds)
    got_masks, got_iou, got_low = ort_outputs(single_path, contract.decoder_feeds(
        single_spec, feeds[contract.IMAGE_EMBEDDINGS], feeds[contract.POINT_COORDS], feeds[contract.POINT_LABELS],
        feeds[contract.MASK_INPUT], feeds[contract.HAS_MASK_INPUT], contract.SAMPLE_ORIGINAL_SIZE))
    chosen = sam_onnx_reference(iou, len(labels))
    rows = np.arange(6)
    assert got_low.shape == (6, 1, 256, 256) and got_masks.shape[1] == 1
    np.testing.assert_allclose(got_iou[:, 0], iou[rows, chosen], atol=1e-6)
    np.testing.assert_allclose(got_low[:, 0], low_res[rows, chosen], atol=1e-5)
    np.testing.assert_allclose(got_masks[:, 0], masks[rows, chosen], atol=1e-5)


@pytest.mark.builds  # an export of its own
def test_sam_onnx_folder_passes_the_parity_gate(tmp_path, gate_suite):
    options = api.ExportOptions(single_mask=True, single_mask_rule="sam-onnx", simplify="none")
    result = api.export("l0", tmp_path / "l0", options=options, reporter=Reporter(quiet=True))
    decoder = result.manifest.artifact("decoder.onnx.fp32")
    assert decoder.settings["single_mask_rule"] == "sam-onnx"
    assert result.manifest.model["mask_selection"]["single_mask_rule"] == "sam-onnx"
    report = api.validate(tmp_path / "l0", suite=gate_suite, reporter=Reporter(quiet=True))
    assert report.passed, [g.line() for g in report.failed_gates]


def test_rule_without_single_mask_is_refused():
    with pytest.raises(UsageError, match="single_mask"):
        api.ExportOptions(single_mask_rule="sam-onnx")


@pytest.mark.parametrize("line, words", [('single_mask_rule = "best"', ("single_mask_rule", "token0, sam-onnx")),
                                         ('encoder_profile = "raw"', ("encoder_profile", "host, app"))])
def test_recipe_values_are_checked_when_it_loads(tmp_path, line, words):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(f'[recipe]\nname = "bad"\ntarget = "ort"\n\n[export]\nsingle_mask = true\n{line}\n')
    with pytest.raises(RecipeError) as caught:
        load_recipe(recipe)
    assert all(word in caught.value.one_line() for word in words), caught.value.one_line()

"""The exported decoder is traced from MaskDecoder.predict_masks(token_layout=True) (faster on CPU); it must give
upstream's (`efficientsam==1.0.0`) masks and scores for every prompt kind, and its graph must be free of
what it was built to remove (ConvTranspose, the LayerNorm2d reductions, the per-prompt image expand)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_model_upstream import IOU_ATOL, MASK_ATOL, make_prompts, max_diff, previous_low_res, synthetic_image, upstream_all_tokens
from upstream import build_upstream

from evsam_export.manifest import read_manifest
from evsam_export.model import processing
from evsam_export.model.checkpoint import load_model
from evsam_export.model.decoder import build_prompt_tokens
from evsam_export.model.sam import DecoderGraph
from evsam_export.model.variants import VARIANTS


@pytest.fixture(scope="module")
def pair():
    """l0 only: every variant shares the decoder design and its synthetic decoder weights."""
    torch.manual_seed(0)
    ours, _ = load_model(VARIANTS["l0"], "synthetic:7")
    upstream = build_upstream("l0", ours.state_dict())
    input_image, geometry = processing.preprocess_image(synthetic_image(), VARIANTS["l0"].encoder_size)
    with torch.inference_mode():
        embedding = upstream.image_encoder(torch.from_numpy(input_image))
    return SimpleNamespace(ours=ours, upstream=upstream, geometry=geometry, embedding=embedding)


@pytest.mark.parametrize("case", ["point", "points+negatives", "box+point", "16 boxes"])
def test_token_layout_graph_matches_upstream(pair, case):
    prompts = make_prompts(case, pair.geometry)
    coords, labels = build_prompt_tokens(prompts["points"], prompts["boxes"])
    batch = coords.shape[0]
    mask_input, has_mask = torch.zeros((1, 1, 256, 256)), torch.zeros(1)
    with torch.inference_mode():
        iou, masks = DecoderGraph(pair.ours, "tensorrt", token_layout=True)(pair.embedding, coords, labels, mask_input, has_mask)
        iou_ref, masks_ref = DecoderGraph(pair.ours, "tensorrt")(pair.embedding, coords, labels, mask_input, has_mask)
    ref_masks, ref_iou = upstream_all_tokens(pair.upstream, pair.embedding, prompts["points"], prompts["boxes"])
    assert tuple(masks.shape) == (batch, 4, 256, 256)
    assert max_diff(masks, ref_masks) <= MASK_ATOL and max_diff(iou, ref_iou) <= IOU_ATOL
    # Against our own upstream formulation: only float summation order differs.
    assert max_diff(masks, masks_ref) <= 1e-4 and max_diff(iou, iou_ref) <= 1e-4


@pytest.mark.parametrize("mask_batch", [1, 3], ids=["one-mask-for-all", "mask-per-prompt"])
def test_token_layout_graph_with_mask_input_matches_upstream(pair, mask_batch):
    """A mask prompt makes the image tokens per mask: [1] broadcasts over the prompt sets, [B] is one each."""
    mask = previous_low_res(pair)
    points, point_labels = make_prompts("points+negatives", pair.geometry)["points"]
    points, point_labels = points.repeat(3, 1, 1), point_labels.repeat(3, 1)
    points[1:, :, 0] += torch.tensor([[40.0], [-60.0]])  # three different prompt sets
    masks_in = mask.repeat(mask_batch, 1, 1, 1) * (1 + torch.arange(mask_batch).reshape(-1, 1, 1, 1))
    coords, labels = build_prompt_tokens((points, point_labels), None)
    with torch.inference_mode():
        iou, masks = DecoderGraph(pair.ours, "tensorrt", token_layout=True)(
            pair.embedding, coords, labels, masks_in, torch.ones(mask_batch))
    ref_masks, ref_iou = upstream_all_tokens(pair.upstream, pair.embedding, (points, point_labels), masks=masks_in.expand(3, -1, -1, -1))
    assert max_diff(masks, ref_masks) <= MASK_ATOL and max_diff(iou, ref_iou) <= IOU_ATOL
    assert max_diff(masks[0], masks[1]) > 100 * MASK_ATOL


@pytest.mark.export  # reads the session's l0 export
def test_exported_decoder_has_no_convtranspose_or_layernorm2d_reductions(l0_export):
    ops = read_manifest(l0_export).artifact("decoder.onnx.fp32").facts["op_types"]
    assert "ConvTranspose" not in ops
    # LayerNorm2d is left only in the mask-prompt path (mask_downscaling, 2 x 2 ReduceMean at mask batch size).
    assert ops.get("ReduceMean", 0) == 4 and ops.get("LayerNormalization", 0) >= 10
    assert ops.get("Expand", 0) <= 1  # the output tokens only: the image is never expanded per prompt set

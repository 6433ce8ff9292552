"""Numerical parity of our PyTorch EfficientViT-SAM with the upstream reference (`efficientsam==1.0.0`).

Every variant is loaded with the same synthetic weights into both implementations; image embeddings,
prompt encoder + mask decoder outputs and the export DecoderGraph are compared. Pre/post-processing
(evsam_export.model.processing, numpy) is compared with upstream's formulas. Upstream's end-to-end
EfficientViTSamPredictor cannot run here (its preprocessing needs torchvision), so its pieces are compared
one by one instead.
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from upstream import build_upstream, load_upstream_zoo

from evsam_export.model import processing
from evsam_export.model.checkpoint import load_model
from evsam_export.model.decoder import PromptEncoder
from evsam_export.model.decoder import build_prompt_tokens as build_prompt_tokens_torch
from evsam_export.model.sam import DecoderGraph
from evsam_export.model.variants import PIXEL_MEAN, PIXEL_STD, PROMPT_FRAME, VARIANT_NAMES, VARIANTS

EMBEDDING_ATOL = 1e-4
MASK_ATOL = 1e-3
IOU_ATOL = 1e-4
IMAGE_HW = (600, 800)  # landscape, so the encoder input has bottom padding and prompts a non-trivial scale


def synthetic_image(height: int = IMAGE_HW[0], width: int = IMAGE_HW[1], seed: int = 0) -> np.ndarray:
    """Deterministic RGB uint8 image: smooth colour blobs plus pixel noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(height // 50 + 2, width // 50 + 2, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float64)
    return np.clip(smooth + rng.normal(0.0, 12.0, size=smooth.shape), 0, 255).astype(np.uint8)


def upstream_module(name: str):
    """An upstream module; importing the zoo first (with torchvision stubbed) leaves it in sys.modules."""
    load_upstream_zoo()
    return importlib.import_module(name)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return (a.float() - b.float()).abs().max().item()


# ---------------------------------------------------------------------------------------------------------
# Models: one variant at a time (module scope, so pytest groups the tests by variant and frees the previous)
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[n if n == "l0" else pytest.param(n, marks=pytest.mark.full) for n in VARIANT_NAMES])
def pair(request):
    name = request.param
    torch.manual_seed(0)
    ours, _ = load_model(VARIANTS[name], "synthetic:7")
    upstream = build_upstream(name, ours.state_dict())
    image = synthetic_image()
    input_image, geometry = processing.preprocess_image(image, VARIANTS[name].encoder_size)
    x = torch.from_numpy(input_image)
    with torch.inference_mode():
        ours_embedding = ours.image_encoder(x)
        upstream_embedding = upstream.image_encoder(x)
    yield SimpleNamespace(
        name=name,
        ours=ours,
        upstream=upstream,
        geometry=geometry,
        input_image=x,
        ours_embedding=ours_embedding,
        embedding=upstream_embedding,  # the decoders are both fed the reference embedding
    )


def test_image_embeddings_full_size(pair):
    size = VARIANTS[pair.name].encoder_size
    assert tuple(pair.input_image.shape) == (1, 3, size, size)
    assert tuple(pair.ours_embedding.shape) == (1, 256, 64, 64)
    assert pair.embedding.std().item() > 0.1  # the synthetic weights give a non-degenerate embedding
    assert max_diff(pair.ours_embedding, pair.embedding) <= EMBEDDING_ATOL


def test_image_embeddings_half_size(pair):
    """Half the encoder size (256 for l*, 512 for xl*): every neck input now goes through the bicubic
    upsample (at full size the shallowest neck stage is already 64x64 and skips it)."""
    size = VARIANTS[pair.name].encoder_size // 2
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 3, size, size)).astype(np.float32))
    with torch.inference_mode():
        ours = pair.ours.image_encoder(x)
        upstream = pair.upstream.image_encoder(x)
    assert max_diff(ours, upstream) <= EMBEDDING_ATOL


# ---------------------------------------------------------------------------------------------------------
# Prompt encoder + mask decoder: upstream prompt_encoder + mask_decoder vs our model.predict
# ---------------------------------------------------------------------------------------------------------

POINTS = np.array([[410.0, 300.0], [520.0, 330.0], [150.0, 100.0], [700.0, 520.0]])
POINT_LABELS = np.array([1, 1, 0, 0])
BOX = np.array([250.0, 180.0, 600.0, 450.0])


def sixteen_boxes() -> np.ndarray:
    rng = np.random.default_rng(3)
    corners = rng.uniform([0, 0], [IMAGE_HW[1], IMAGE_HW[0]], size=(16, 2, 2))
    return np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1)  # x0 y0 x1 y1


def to_frame(pixels: np.ndarray, geometry) -> torch.Tensor:
    """Original-image pixels -> the 1024 prompt frame, like the predictor's apply_coords."""
    return torch.from_numpy(processing.transform_coords(pixels, geometry))


def make_prompts(case: str, geometry) -> dict:
    """Prompts in the 1024 frame as predict_torch takes them (labels int like the predictor's)."""
    point = (to_frame(POINTS[None, :1], geometry), torch.tensor([[1]], dtype=torch.int))
    if case == "point":
        return dict(points=point, boxes=None)
    if case == "points+negatives":
        return dict(points=(to_frame(POINTS[None], geometry), torch.tensor(POINT_LABELS[None], dtype=torch.int)),
                    boxes=None)
    if case == "box":
        return dict(points=None, boxes=to_frame(BOX.reshape(1, 2, 2), geometry).reshape(1, 4))
    if case == "box+point":
        return dict(points=point, boxes=to_frame(BOX.reshape(1, 2, 2), geometry).reshape(1, 4))
    if case == "16 boxes":
        return dict(points=None, boxes=to_frame(sixteen_boxes().reshape(16, 2, 2), geometry).reshape(16, 4))
    raise AssertionError(case)


def upstream_decode(upstream, embedding, points, boxes, masks, multimask):
    """EfficientViTSamPredictor.predict_torch without its post-processing."""
    with torch.inference_mode():
        sparse, dense = upstream.prompt_encoder(points=points, boxes=boxes, masks=masks)
        return upstream.mask_decoder(
            image_embeddings=embedding,
            image_pe=upstream.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )


def upstream_all_tokens(upstream, embedding, points, boxes=None, masks=None):
    """All four mask tokens (upstream's MaskDecoder.predict_masks, before its multimask selection)."""
    with torch.inference_mode():
        sparse, dense = upstream.prompt_encoder(points=points, boxes=boxes, masks=masks)
        return upstream.mask_decoder.predict_masks(
            image_embeddings=embedding,
            image_pe=upstream.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
        )


def ours_decode(model, embedding, points, boxes, masks, multimask):
    coords, labels = points if points is not None else (None, None)
    return model.predict(
        embedding, point_coords=coords, point_labels=labels, boxes=boxes, mask_input=masks,
        multimask_output=multimask,
    )


def assert_decoders_agree(ours, reference, batch: int, multimask: bool):
    (masks, iou), (ref_masks, ref_iou) = ours, reference
    assert tuple(ref_masks.shape) == (batch, 3 if multimask else 1, 256, 256)
    assert ref_masks.std().item() > 0.01  # masks respond to the inputs (not a constant)
    assert max_diff(masks, ref_masks) <= MASK_ATOL
    assert max_diff(iou, ref_iou) <= IOU_ATOL


@pytest.mark.parametrize("multimask", [True, False], ids=["multimask", "single"])
@pytest.mark.parametrize("case", ["point", "points+negatives", "box", "box+point"])
def test_decoder_matches_upstream(pair, case, multimask):
    prompts = make_prompts(case, pair.geometry)
    reference = upstream_decode(pair.upstream, pair.embedding, prompts["points"], prompts["boxes"], None, multimask)
    ours = ours_decode(pair.ours, pair.embedding, prompts["points"], prompts["boxes"], None, multimask)
    assert_decoders_agree(ours, reference, 1, multimask)


# A batch of 16 prompt sets costs 16 single decodes. The decoder's synthetic weights are the same in every
# variant (drawn per key), and the per-variant embeddings are covered above, so one variant suffices.
# (It must be the fixture's FIRST param: pytest groups tests by param index, so any other index would
# rebuild that variant's models a second time.)
@pytest.mark.parametrize("pair", VARIANT_NAMES[:1], indirect=True)
def test_decoder_matches_upstream_16_boxes(pair):
    boxes = make_prompts("16 boxes", pair.geometry)["boxes"]
    # One upstream pass gives all four tokens; upstream's mask_decoder(multimask_output=...) only slices
    # them (tokens 1..3 or token 0), which the single-prompt tests above check for every variant.
    ref_masks, ref_iou = upstream_all_tokens(pair.upstream, pair.embedding, None, boxes=boxes)
    for multimask, selection in ((True, slice(1, None)), (False, slice(0, 1))):
        ours = ours_decode(pair.ours, pair.embedding, None, boxes, None, multimask)
        assert_decoders_agree(ours, (ref_masks[:, selection], ref_iou[:, selection]), 16, multimask)
    # 16 different prompt sets, 16 different masks (the batch is not one prompt broadcast).
    assert max_diff(ref_masks[:8], ref_masks[8:]) > 100 * MASK_ATOL


def previous_low_res(pair) -> torch.Tensor:
    """The best (highest predicted IoU) low-res logits of a first one-point pass: [1,1,256,256]."""
    point = make_prompts("point", pair.geometry)["points"]
    masks, iou = upstream_decode(pair.upstream, pair.embedding, point, None, None, True)
    best = int(iou[0].argmax())
    return masks[:, best : best + 1].clone()


@pytest.mark.parametrize("multimask", [True, False], ids=["multimask", "single"])
def test_decoder_mask_input_refinement_matches_upstream(pair, multimask):
    mask_input = previous_low_res(pair)
    prompts = make_prompts("points+negatives", pair.geometry)
    reference = upstream_decode(pair.upstream, pair.embedding, prompts["points"], None, mask_input, multimask)
    ours = ours_decode(pair.ours, pair.embedding, prompts["points"], None, mask_input, multimask)
    assert_decoders_agree(ours, reference, 1, multimask)
    # The mask prompt is not ignored: the same points without it give other logits.
    without = upstream_decode(pair.upstream, pair.embedding, prompts["points"], None, None, multimask)
    assert max_diff(without[0], reference[0]) > 10 * MASK_ATOL


# ---------------------------------------------------------------------------------------------------------
# The export DecoderGraph: padding point and token selection
# ---------------------------------------------------------------------------------------------------------


def no_mask():
    return torch.zeros((1, 1, 256, 256)), torch.zeros(1)


def test_decoder_graph_needs_the_padding_point(pair):
    """PyTorch SAM appends a (0,0,label -1) token to point-only prompts. The branch-free graph does not add
    it: fed without it, it gives different masks than upstream; fed with it (our token layout), equal ones."""
    coords, labels = make_prompts("point", pair.geometry)["points"]
    ref_masks, ref_iou = upstream_all_tokens(pair.upstream, pair.embedding, (coords, labels))
    graph = DecoderGraph(pair.ours, profile="tensorrt").eval()
    mask_input, has_mask = no_mask()
    with torch.inference_mode():
        iou_nopad, masks_nopad = graph(pair.embedding, coords, labels.float(), mask_input, has_mask)
        padded_coords, padded_labels = build_prompt_tokens_torch((coords, labels), None)
        assert padded_labels.tolist() == [[1.0, -1.0]]
        iou_pad, masks_pad = graph(pair.embedding, padded_coords, padded_labels, mask_input, has_mask)
    assert tuple(masks_pad.shape) == (1, 4, 256, 256) and tuple(iou_pad.shape) == (1, 4)
    assert max_diff(masks_nopad, ref_masks) > 100 * MASK_ATOL
    assert max_diff(masks_pad, ref_masks) <= MASK_ATOL
    assert max_diff(iou_pad, ref_iou) <= IOU_ATOL


def test_decoder_graph_single_mask_is_upstream_single_output(pair):
    """DecoderGraph(single_mask=True) returns token 0, which is upstream's multimask_output=False mask; the
    four-token graph's tokens 1..3 are upstream's multimask_output=True masks."""
    prompts = make_prompts("box+point", pair.geometry)
    coords, labels = build_prompt_tokens_torch(prompts["points"], prompts["boxes"])
    mask_input, has_mask = no_mask()
    with torch.inference_mode():
        iou1, masks1 = DecoderGraph(pair.ours, profile="tensorrt", single_mask=True)(
            pair.embedding, coords, labels, mask_input, has_mask
        )
        iou4, masks4 = DecoderGraph(pair.ours, profile="tensorrt")(pair.embedding, coords, labels, mask_input, has_mask)
    single = upstream_decode(pair.upstream, pair.embedding, prompts["points"], prompts["boxes"], None, False)
    multi = upstream_decode(pair.upstream, pair.embedding, prompts["points"], prompts["boxes"], None, True)
    assert_decoders_agree((masks1, iou1), single, 1, False)
    assert_decoders_agree((masks4[:, 1:], iou4[:, 1:]), multi, 1, True)
    assert torch.equal(masks4[:, :1], masks1) and torch.equal(iou4[:, :1], iou1)


def test_decoder_graph_sam_profile_with_mask_input(pair):
    """`sam` profile: has_mask_input=1 uses the mask prompt, and masks are upscaled to orig_im_size like
    upstream's postprocess_masks."""
    mask_input = previous_low_res(pair)
    prompts = make_prompts("points+negatives", pair.geometry)
    coords, labels = build_prompt_tokens_torch(prompts["points"], None)
    orig = torch.tensor(pair.geometry.original_size, dtype=torch.float32)
    with torch.inference_mode():
        masks, iou, low_res = DecoderGraph(pair.ours, profile="sam")(
            pair.embedding, coords, labels, mask_input, torch.ones(1), orig
        )
        ref_low, ref_iou = upstream_all_tokens(pair.upstream, pair.embedding, prompts["points"], masks=mask_input)
        ref_masks = pair.upstream.postprocess_masks(ref_low, pair.geometry.input_size, pair.geometry.original_size)
    assert tuple(masks.shape) == (1, 4, *pair.geometry.original_size)
    assert max_diff(low_res, ref_low) <= MASK_ATOL
    assert max_diff(iou, ref_iou) <= IOU_ATOL
    assert max_diff(masks, ref_masks) <= MASK_ATOL


# ---------------------------------------------------------------------------------------------------------
# Pre- and post-processing (numpy) vs upstream's formulas
# ---------------------------------------------------------------------------------------------------------

SIZES = [(1, 1), (1, 2000), (2000, 1), (600, 800), (800, 600), (683, 1024), (1024, 1024), (512, 384),
         (333, 777), (1080, 1920), (3000, 4000), (7, 5), (513, 511), (1023, 1025)]


@pytest.fixture(scope="module")
def upstream_plain():
    """Upstream L0 with its own random init: for the weight-free helpers (postprocess_masks)."""
    torch.manual_seed(0)
    return load_upstream_zoo().create_efficientvit_sam_model("efficientvit-sam-l0", pretrained=False).eval()


def test_preprocess_shape_matches_upstream():
    sam = upstream_module("efficientsam.models.efficientvit.sam")
    transforms = upstream_module("efficientsam.segment_anything.utils.transforms")
    rng = np.random.default_rng(5)
    sizes = SIZES + [tuple(int(v) for v in rng.integers(1, 5000, 2)) for _ in range(200)]
    for height, width in sizes:
        for long_side in (512, 1024):
            ours = processing.preprocess_shape(height, width, long_side)
            assert ours == tuple(sam.SamResize.get_preprocess_shape(height, width, long_side)), (height, width)
            assert ours == tuple(transforms.ResizeLongestSide.get_preprocess_shape(height, width, long_side))


@pytest.mark.parametrize("original_size", [(600, 800), (800, 600), (333, 777), (1080, 1920), (7, 5)])
def test_transform_coords_matches_predictor_apply_coords(original_size):
    sam = upstream_module("efficientsam.models.efficientvit.sam")
    transforms = upstream_module("efficientsam.segment_anything.utils.transforms")
    # EfficientViTSamPredictor.set_image: input_size = ResizeLongestSide.get_preprocess_shape(*orig, 1024)
    input_size = transforms.ResizeLongestSide.get_preprocess_shape(*original_size, long_side_length=PROMPT_FRAME)
    # The predictor's apply_coords/apply_boxes read only original_size/input_size (set by set_image, which
    # needs torchvision): a predictor made without __init__ (no model) and given those two attributes.
    predictor_state = object.__new__(sam.EfficientViTSamPredictor)
    predictor_state.original_size, predictor_state.input_size = original_size, input_size
    geometry = processing.ImageGeometry(original_size, processing.preprocess_shape(*original_size, PROMPT_FRAME), 512)
    assert geometry.input_size == tuple(input_size)
    rng = np.random.default_rng(6)
    coords = rng.uniform(0, max(original_size), size=(3, 5, 2))
    reference = predictor_state.apply_coords(coords)
    # predict() then does torch.as_tensor(..., dtype=torch.float): float32 is what the model sees.
    np.testing.assert_array_equal(processing.transform_coords(coords, geometry), reference.astype(np.float32))
    boxes = rng.uniform(0, max(original_size), size=(4, 4))
    reference_boxes = predictor_state.apply_boxes(boxes)
    ours_boxes = processing.transform_coords(boxes.reshape(-1, 2, 2), geometry).reshape(-1, 4)
    np.testing.assert_array_equal(ours_boxes, reference_boxes.astype(np.float32))


def torch_fuses_source_index() -> bool:
    """Whether this torch build computes bilinear source indices as one fused multiply-add (one rounding),
    as its AVX2/AVX-512 CPU kernels and CUDA do and processing.resize_bilinear does. Its DEFAULT (pre-AVX2)
    CPU kernel rounds twice, which moves weights by up to index * 2**-24 (about 3e-5 at 1080p)."""
    scale = np.float32(576) / np.float32(1080)
    fused = np.float32(np.float64(scale) * 960.5 - 0.5) - np.float32(511)  # output column 960 of 1080
    eye = torch.eye(576).reshape(576, 1, 1, 576)
    weight = F.interpolate(eye, size=(1, 1080), mode="bilinear", align_corners=False)[512, 0, 0, 960].item()
    return weight == float(fused)


# Where torch rounds the source index twice, high-resolution outputs differ by up to ~2e-3 on logits of
# this scale; the 1e-4 bound is for the fused arithmetic of AVX2/AVX-512/CUDA builds.
RESIZE_ATOL = 1e-4 if torch_fuses_source_index() else 2e-3


@pytest.mark.parametrize(
    "size_in,size_out",
    [((256, 256), (1024, 1024)), ((256, 256), (683, 1024)), ((768, 1024), (600, 800)), ((1024, 683), (300, 200)),
     ((1024, 1024), (301, 451)), ((37, 53), (19, 7)), ((5, 3), (64, 96)), ((256, 256), (256, 256)),
     ((576, 1024), (1080, 1920)), ((768, 1024), (1536, 2048))],
)
def test_resize_bilinear_matches_torch(size_in, size_out):
    x = (10 * np.random.default_rng(7).standard_normal((2, 2, *size_in))).astype(np.float32)
    ours = processing.resize_bilinear(x, *size_out)
    reference = F.interpolate(torch.from_numpy(x), size=size_out, mode="bilinear", align_corners=False)
    assert ours.shape == tuple(reference.shape)
    assert np.abs(ours - reference.numpy()).max() <= RESIZE_ATOL


@pytest.mark.parametrize("size_in,size_out", [(576, 1080), (1024, 1920), (1024, 4000), (683, 200), (256, 1024),
                                               (7, 3000), (1024, 7)])
def test_resize_bilinear_weights_equal_torch(size_in, size_out):
    """Interpolating the identity exposes the weights: ours are torch's bit for bit (torch rounds the source
    index once, as a fused multiply-add; rounding twice shifts weights by ~3e-5 at 1080p)."""
    if not torch_fuses_source_index():
        pytest.skip("this torch build's CPU bilinear kernel rounds the source index twice (DEFAULT capability)")
    eye = np.eye(size_in, dtype=np.float32).reshape(size_in, 1, 1, size_in)
    ours = processing.resize_bilinear(eye, 1, size_out)
    reference = F.interpolate(torch.from_numpy(eye), size=(1, size_out), mode="bilinear", align_corners=False)
    np.testing.assert_array_equal(ours, reference.numpy())


@pytest.mark.parametrize("original_size", [(600, 800), (800, 600), (1024, 1024), (300, 200), (1080, 1920), (7, 5)])
def test_postprocess_masks_matches_upstream(upstream_plain, original_size):
    low_res = (8 * np.random.default_rng(8).standard_normal((1, 3, 256, 256))).astype(np.float32)
    geometry = processing.ImageGeometry(original_size, processing.preprocess_shape(*original_size, PROMPT_FRAME), 512)
    ours = processing.postprocess_masks(low_res, geometry)
    with torch.inference_mode():
        reference = upstream_plain.postprocess_masks(
            torch.from_numpy(low_res), geometry.input_size, original_size
        ).numpy()
    assert ours.shape == reference.shape == (1, 3, *original_size)
    assert np.abs(ours - reference).max() <= RESIZE_ATOL
    confident = np.abs(reference) > 1e-2  # thresholding agrees wherever rounding cannot flip it
    np.testing.assert_array_equal(
        processing.binarize(ours)[confident], (reference > upstream_plain.mask_threshold)[confident]
    )


def prompt_cases():
    """(points [N,2] px, labels [N], boxes [4] or [B,4] px) in the numpy API's shapes."""
    boxes16 = sixteen_boxes()
    return {
        "point": (POINTS[:1], POINT_LABELS[:1], None),
        "points+negatives": (POINTS, POINT_LABELS, None),
        "box": (None, None, BOX),
        "box+point": (POINTS[:1], POINT_LABELS[:1], BOX),
        "16 boxes": (None, None, boxes16),
        "16 boxes + shared point": (POINTS[:2], POINT_LABELS[:2], boxes16),
    }


@pytest.fixture(scope="module")
def prompt_encoders(upstream_plain):
    """Upstream's PromptEncoder and ours, with the same (upstream's random) weights."""
    ours = PromptEncoder()
    ours.load_state_dict(upstream_plain.prompt_encoder.state_dict())
    return ours.eval(), upstream_plain.prompt_encoder


@pytest.mark.parametrize("case", list(prompt_cases()))
def test_build_prompt_tokens_layout(prompt_encoders, case):
    """numpy tokens == torch tokens (decoder.build_prompt_tokens) == upstream's layout: the padding point
    (0, 0, label -1) only without a box, box corners last with labels 2 and 3."""
    geometry = processing.ImageGeometry(IMAGE_HW, processing.preprocess_shape(*IMAGE_HW, PROMPT_FRAME), 512)
    points, labels, boxes = prompt_cases()[case]
    tokens = processing.build_prompt_tokens(geometry, points, labels, boxes)
    batch = 1 if boxes is None else np.asarray(boxes).reshape(-1, 4).shape[0]
    num_points = 0 if points is None else len(points)
    expected_n = num_points + (1 if boxes is None else 2)
    assert tokens.point_coords.shape == (batch, expected_n, 2) and tokens.point_coords.dtype == np.float32
    assert tokens.point_labels.shape == (batch, expected_n) and tokens.point_labels.dtype == np.float32
    if boxes is None:
        np.testing.assert_array_equal(tokens.point_labels[:, -1], -1)
        np.testing.assert_array_equal(tokens.point_coords[:, -1], 0)
    else:
        assert not (tokens.point_labels == -1).any()
        np.testing.assert_array_equal(tokens.point_labels[:, -2:], np.tile([[2.0, 3.0]], (batch, 1)))

    # Same prompts through the torch token builder and through upstream's PromptEncoder.
    torch_points = None
    if points is not None:
        batched = np.broadcast_to(points, (batch, *points.shape))
        coords = torch.from_numpy(processing.transform_coords(batched, geometry))
        torch_points = (coords, torch.from_numpy(np.broadcast_to(labels, (batch, len(labels))).copy()).int())
    torch_boxes = None
    if boxes is not None:
        box_array = np.asarray(boxes, dtype=np.float64).reshape(-1, 2, 2)
        torch_boxes = torch.from_numpy(processing.transform_coords(box_array, geometry)).reshape(-1, 4)
    torch_coords, torch_labels = build_prompt_tokens_torch(torch_points, torch_boxes)
    np.testing.assert_array_equal(tokens.point_coords, torch_coords.numpy())
    np.testing.assert_array_equal(tokens.point_labels, torch_labels.numpy())

    ours, upstream = prompt_encoders
    with torch.inference_mode():
        reference, _ = upstream(points=torch_points, boxes=torch_boxes, masks=None)
        sparse = ours.embed_point_tokens(torch.from_numpy(tokens.point_coords), torch.from_numpy(tokens.point_labels))
    assert max_diff(sparse, reference) <= 1e-5


@pytest.mark.parametrize("image_hw,encoder_size", [((600, 800), 512), ((300, 200), 1024), ((512, 384), 512),
                                                    ((1024, 700), 1024), ((97, 1301), 512)])
def test_preprocess_image_matches_upstream_formula(image_hw, encoder_size):
    """Upstream transform: SamResize (Pillow bilinear via torchvision's PIL path) -> ToTensor (/255) ->
    Normalize(mean/255, std/255) -> SamPad (zeros, bottom/right); recomputed here in torch."""
    image = synthetic_image(*image_hw, seed=2)
    ours, geometry = processing.preprocess_image(image, encoder_size)
    height, width = image_hw
    resized = image
    if max(height, width) != encoder_size:  # SamResize.__call__
        new_h, new_w = processing.preprocess_shape(height, width, encoder_size)
        # torchvision F.resize on a PIL image = PIL.Image.resize((w, h), BILINEAR)
        resized = np.array(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    tensor = torch.from_numpy(resized).permute(2, 0, 1).contiguous().to(torch.float32).div(255)  # ToTensor
    mean = torch.as_tensor([m / 255 for m in PIXEL_MEAN], dtype=torch.float32)  # Normalize(mean=[123.675/255..
    std = torch.as_tensor([s / 255 for s in PIXEL_STD], dtype=torch.float32)
    tensor = (tensor - mean[:, None, None]) / std[:, None, None]
    reference = F.pad(tensor, (0, encoder_size - tensor.shape[2], 0, encoder_size - tensor.shape[1]), value=0)
    assert ours.shape == (1, 3, encoder_size, encoder_size) and ours.dtype == np.float32
    # mean/255 rounded in float32 (ours) vs in float64 then cast (torchvision): at most an ulp or two apart.
    assert np.abs(ours[0] - reference.numpy()).max() <= 1e-6
    assert geometry.original_size == image_hw
    assert geometry.input_size == processing.preprocess_shape(height, width, PROMPT_FRAME)

"""The encoder/decoder IO contract, written once.

Tensor names, dtypes and shapes (named strings for dynamic axes), the inputs each decoder profile has
(`sam`: SAM's ONNX contract with `orig_im_size` and an upscaled `masks` output; `tensorrt`: neither), the
single-mask variant, and the point-label conventions. The exporter traces against these specs, the
manifest records them, and every caller that feeds a graph (runtime, parity gate, precision steps)
builds its feeds here from semantic inputs, so no one spells the decoder's inputs by hand:

    spec = decoder_spec("tensorrt")
    feeds = decoder_feeds(spec, image_embeddings=emb, point_coords=coords, point_labels=labels,
                          original_size=(480, 640))       # orig_im_size only where the spec has it

numpy only: importing this never imports torch or onnx.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from evsam_export.errors import ExportError
from evsam_export.model.variants import (
    EMBEDDING_DIM,
    EMBEDDING_SIZE,
    LABEL_BACKGROUND,
    LABEL_BOX_BOTTOM_RIGHT,
    LABEL_BOX_TOP_LEFT,
    LABEL_FOREGROUND,
    LABEL_PADDING,
    LOW_RES_MASK_SIZE,
    NUM_MASK_TOKENS,
    PIXEL_MEAN,
    PIXEL_STD,
)

# ------------------------------------------------------------------------------------------- tensor names

INPUT_IMAGE = "input_image"
IMAGE_EMBEDDINGS = "image_embeddings"
POINT_COORDS = "point_coords"
POINT_LABELS = "point_labels"
MASK_INPUT = "mask_input"
HAS_MASK_INPUT = "has_mask_input"
ORIG_IM_SIZE = "orig_im_size"
MASKS = "masks"
IOU_PREDICTIONS = "iou_predictions"
LOW_RES_MASKS = "low_res_masks"

# The split decoder: its image half's outputs, which are its prompt half's first inputs (model.decoder.ImageSide).
IMAGE_TOKENS = "image_tokens"
LAYER0_IMAGE_QUERIES = "layer0_image_queries"
LAYER0_KEYS_T = "layer0_keys_t"
LAYER0_VALUES = "layer0_values"
IMAGE_SIDE = (IMAGE_TOKENS, LAYER0_IMAGE_QUERIES, LAYER0_KEYS_T, LAYER0_VALUES)
# Component names: the single-graph decoder, and the split decoder's image half (run once per image, or per
# mask prompt) and prompt half (run per decoder call), which our runtime uses in its place when present.
DECODER = "decoder"
DECODER_IMAGE = "decoder_image"
DECODER_PROMPT = "decoder_prompt"
SPLIT_DECODER = (DECODER_IMAGE, DECODER_PROMPT)

DECODER_PROFILES = ("sam", "tensorrt")
# host: the caller resizes, normalises and pads (processing.preprocess_image) and feeds float32 NCHW;
# app: the graph does it, from a raw uint8 RGB image, as annotation apps feed encoders.
ENCODER_PROFILES = ("host", "app")
APP_IMAGE_SHAPE = ("image_height", "image_width", 3)
APP_ENCODER_MIN_OPSET = 18  # Resize's antialias attribute, which the app profile needs to match Pillow, is opset 18
EMBEDDINGS_SHAPE = (1, EMBEDDING_DIM, EMBEDDING_SIZE, EMBEDDING_SIZE)

# ------------------------------------------------------------------------------------ label conventions

# PyTorch SAM's point labels (model.variants), in the order manifest.json lists them.
POINT_LABEL_MEANINGS = {
    LABEL_FOREGROUND: "foreground",
    LABEL_BACKGROUND: "background",
    LABEL_BOX_TOP_LEFT: "box top-left",
    LABEL_BOX_BOTTOM_RIGHT: "box bottom-right",
    LABEL_PADDING: "padding",
}
# The labels a user may give with a point; box corners and padding are laid out by processing.build_prompt_tokens.
USER_POINT_LABELS = (LABEL_BACKGROUND, LABEL_FOREGROUND)

# The decoder returns all four mask tokens ("all4") or, exported with --single-mask, token 0 only.
ALL_TOKENS = "all4"
TOKEN0_ONLY = "token0"


# Which token a single-mask decoder returns. token0: PyTorch SAM's multimask_output=False. sam-onnx: SAM's own
# ONNX wrapper (return_single_mask), which apps built on it (samexporter, X-AnyLabeling) show in channel 0.
SINGLE_MASK_RULES = ("token0", "sam-onnx")
SAM_ONNX_RULE = ("SAM ONNX return_single_mask: token 0 when point_coords has more than 2 points (padding point and "
                 "box corners included), else the best of tokens 1-3 by predicted IoU")


def single_mask_tokens(iou_predictions: np.ndarray, num_points: int, rule: str = "token0") -> np.ndarray:
    """The token [B] a single-mask decoder of `rule` returns for each prompt set, from all four predicted IoUs [B,4]
    and the number of point tokens fed (point_coords.shape[1])."""
    iou = np.asarray(iou_predictions)
    if rule == "token0" or num_points > 2:
        return np.zeros(iou.shape[0], dtype=np.int64)
    if rule != "sam-onnx":
        raise ValueError(f"unknown single-mask rule {rule!r} (use {' or '.join(SINGLE_MASK_RULES)})")
    return 1 + np.argmax(iou[:, 1:], axis=1)


def mask_selection(single_mask: bool, rule: str = "token0") -> dict:
    """The mask-token semantics of a decoder, as manifest.json records them."""
    if single_mask and rule == "sam-onnx":
        return {"outputs": TOKEN0_ONLY, "tokens": 1, "single_mask_rule": rule, "rule": SAM_ONNX_RULE}
    if single_mask:
        return {"outputs": TOKEN0_ONLY, "tokens": 1, "single_mask_rule": "token0",
                "rule": "token 0 only: PyTorch SAM multimask_output=False"}
    return {
        "outputs": ALL_TOKENS,
        "tokens": NUM_MASK_TOKENS,
        "rule": "tokens in upstream order: [0] = multimask_output=False, [1:4] = multimask_output=True",
    }


# ------------------------------------------------------------------------------------------------ specs


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: float32, float16, int64
    shape: tuple  # ints for fixed dims, strings for named dynamic axes

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: dict) -> TensorSpec:
        return cls(name=data["name"], dtype=data["dtype"], shape=tuple(data["shape"]))


@dataclass(frozen=True)
class ComponentSpec:
    component: str  # encoder | decoder | decoder_image | decoder_prompt (the split decoder's halves)
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    profile: str | None = None
    single_mask: bool = False

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        return next((t for t in self.outputs if t.name == name), None)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes = {}
        for spec in self.inputs + self.outputs:
            named = {i: dim for i, dim in enumerate(spec.shape) if isinstance(dim, str)}
            if named:
                axes[spec.name] = named
        return axes

    @property
    def mask_tokens(self) -> int | str | None:
        """Mask tokens per prompt set (dim 1 of low_res_masks): 4, 1, or a name where the axis is dynamic."""
        low_res = self.output(LOW_RES_MASKS)
        return None if low_res is None or len(low_res.shape) < 2 else low_res.shape[1]

    @property
    def static_prompts(self) -> bool:
        """Whether the prompt-side batch is fixed (--static-prompts): prompt sets, or masks for a graph without
        points (the split decoder's image half)."""
        coords, mask = self.input(POINT_COORDS), self.input(MASK_INPUT)
        if coords is not None:
            return isinstance(coords.shape[0], int)
        return mask is not None and isinstance(mask.shape[0], int)

    @property
    def prompt_batch(self) -> int | str | None:
        """Prompt sets per call (dim 0 of point_coords): an int for --static-prompts graphs, else its axis name."""
        coords = self.input(POINT_COORDS)
        return None if coords is None or not coords.shape else coords.shape[0]


def encoder_spec(variant, dynamic_batch: bool = True, profile: str = "host") -> ComponentSpec:
    """The encoder of `variant` (anything with .encoder_size). `host`: one normalised, padded NCHW image in,
    embeddings out; `app`: one raw uint8 RGB image [H, W, 3] of any size in (no batch axis), embeddings out."""
    if profile == "app":
        return ComponentSpec(
            component="encoder",
            inputs=(TensorSpec(INPUT_IMAGE, "uint8", APP_IMAGE_SHAPE),),
            outputs=(TensorSpec(IMAGE_EMBEDDINGS, "float32", EMBEDDINGS_SHAPE),),
            profile="app",
        )
    if profile != "host":
        raise ExportError(f"unknown encoder profile {profile!r}", hint="use " + " or ".join(ENCODER_PROFILES))
    batch = "batch" if dynamic_batch else 1
    size = variant.encoder_size
    return ComponentSpec(
        component="encoder",
        inputs=(TensorSpec(INPUT_IMAGE, "float32", (batch, 3, size, size)),),
        outputs=(TensorSpec(IMAGE_EMBEDDINGS, "float32", (batch, EMBEDDING_DIM, EMBEDDING_SIZE, EMBEDDING_SIZE)),),
        profile="host",
    )


def encoder_profile_of(input_image: TensorSpec) -> str:
    """The profile of an encoder graph with this input: `app` takes raw uint8 pixels, `host` preprocessed floats."""
    return "app" if input_image.dtype == "uint8" else "host"


def encoder_input_contract(profile: str, encoder_size: int) -> dict:
    """What the encoder's input is and which preprocessing steps the caller or the graph performs (manifest.json)."""
    steps = {
        "resize": f"longest side to {encoder_size}, bilinear with antialiasing on downscale (Pillow BILINEAR), "
                  "sides int(x * scale + 0.5), at least 1",
        "normalize": {"mean": list(PIXEL_MEAN), "std": list(PIXEL_STD), "scale": "0..255"},
        "pad": f"zeros at bottom/right to {encoder_size}x{encoder_size}",
    }
    if profile == "app":
        return {
            "layout": "HWC RGB uint8, no batch axis, any height and width",
            "in_graph": True,
            **steps,
            "resize": steps["resize"] + "; ONNX Resize antialias=1 then rounded to 0..255 like Pillow's uint8 output",
        }
    return {"layout": "NCHW RGB float32", "in_graph": False, **steps}


def decoder_spec(profile: str = "sam", single_mask: bool = False, dynamic_prompts: bool = True) -> ComponentSpec:
    prompts = "num_prompts" if dynamic_prompts else 1
    points = "num_points" if dynamic_prompts else 2
    masks = 1 if single_mask else NUM_MASK_TOKENS
    low = LOW_RES_MASK_SIZE
    inputs = [
        TensorSpec(IMAGE_EMBEDDINGS, "float32", EMBEDDINGS_SHAPE),
        TensorSpec(POINT_COORDS, "float32", (prompts, points, 2)),
        TensorSpec(POINT_LABELS, "float32", (prompts, points)),
        # [1,...] broadcasts over all prompt sets (what SAM apps feed); [B,...] gives one mask per set.
        TensorSpec(MASK_INPUT, "float32", ("mask_batch" if dynamic_prompts else 1, 1, low, low)),
        TensorSpec(HAS_MASK_INPUT, "float32", ("mask_batch" if dynamic_prompts else 1,)),
    ]
    outputs = [
        TensorSpec(IOU_PREDICTIONS, "float32", (prompts, masks)),
        TensorSpec(LOW_RES_MASKS, "float32", (prompts, masks, low, low)),
    ]
    if profile == "sam":
        inputs.append(TensorSpec(ORIG_IM_SIZE, "float32", (2,)))
        outputs.insert(0, TensorSpec(MASKS, "float32", (prompts, masks, "image_height", "image_width")))
    elif profile != "tensorrt":
        raise ExportError(f"unknown decoder profile {profile!r}", hint="use " + " or ".join(DECODER_PROFILES))
    return ComponentSpec("decoder", tuple(inputs), tuple(outputs), profile=profile, single_mask=single_mask)


# Layer-0 attention heads and their depth in SAM's decoder (8 heads over C/2 = 128 channels).
IMAGE_SIDE_HEADS = 8
IMAGE_SIDE_HEAD_DEPTH = EMBEDDING_DIM // 2 // IMAGE_SIDE_HEADS
IMAGE_TOKEN_COUNT = EMBEDDING_SIZE * EMBEDDING_SIZE


def image_side_specs(mask_batch) -> tuple[TensorSpec, ...]:
    """The image half's outputs (= the prompt half's image inputs), batch `mask_batch` (1 without a mask prompt)."""
    tokens, heads, depth = IMAGE_TOKEN_COUNT, IMAGE_SIDE_HEADS, IMAGE_SIDE_HEAD_DEPTH
    return (
        TensorSpec(IMAGE_TOKENS, "float32", (mask_batch, tokens, EMBEDDING_DIM)),
        TensorSpec(LAYER0_IMAGE_QUERIES, "float32", (mask_batch, tokens, heads * depth)),
        TensorSpec(LAYER0_KEYS_T, "float32", (mask_batch, heads, depth, tokens)),
        TensorSpec(LAYER0_VALUES, "float32", (mask_batch, heads, tokens, depth)),
    )


def decoder_image_spec(dynamic_prompts: bool = True) -> ComponentSpec:
    """The split decoder's image half: the embeddings and the mask prompt (as the single graph takes them) in,
    the image-only tensors of the decoder out, one per mask (mask_batch 1 when there is no mask prompt)."""
    single = decoder_spec("tensorrt", dynamic_prompts=dynamic_prompts)
    mask_batch = single.input(MASK_INPUT).shape[0]
    inputs = (single.input(IMAGE_EMBEDDINGS), single.input(MASK_INPUT), single.input(HAS_MASK_INPUT))
    return ComponentSpec(DECODER_IMAGE, inputs, image_side_specs(mask_batch))


def decoder_prompt_spec(single_mask: bool = False, dynamic_prompts: bool = True) -> ComponentSpec:
    """The split decoder's prompt half: the image half's outputs ([1] broadcast over the prompt sets, or one per
    prompt set) and the point tokens in, the single graph's `tensorrt` outputs out (no in-graph upscale: our
    runtime upscales on the host)."""
    single = decoder_spec("tensorrt", single_mask, dynamic_prompts)
    mask_batch = single.input(MASK_INPUT).shape[0]
    inputs = image_side_specs(mask_batch) + (single.input(POINT_COORDS), single.input(POINT_LABELS))
    return ComponentSpec(DECODER_PROMPT, inputs, single.outputs, profile="tensorrt", single_mask=single_mask)


def split_decoder_spec(image_half, prompt_half) -> ComponentSpec:
    """The contract the split decoder's halves (anything with .inputs / .outputs) offer together: the `tensorrt`
    decoder's inputs, in its order, and the prompt half's outputs (runners.split_decoder.SplitDecoderRunner)."""
    image_inputs = {t.name: t for t in image_half.inputs}
    prompt_inputs = {t.name: t for t in prompt_half.inputs}
    inputs = (image_inputs[IMAGE_EMBEDDINGS], prompt_inputs[POINT_COORDS], prompt_inputs[POINT_LABELS],
              image_inputs[MASK_INPUT], image_inputs[HAS_MASK_INPUT])
    outputs = tuple(prompt_half.outputs)
    single_mask = next(t for t in outputs if t.name == LOW_RES_MASKS).shape[1] == 1
    return ComponentSpec(DECODER, inputs, outputs, profile="tensorrt", single_mask=single_mask)


# The names every graph of a component has, whatever its profile; the `sam` decoder profile adds SAM_PROFILE_INPUTS.
REQUIRED_IO = {
    "encoder": (INPUT_IMAGE, IMAGE_EMBEDDINGS),
    DECODER: tuple(decoder_spec("tensorrt").input_names + decoder_spec("tensorrt").output_names),
    DECODER_IMAGE: tuple(decoder_image_spec().input_names + decoder_image_spec().output_names),
    DECODER_PROMPT: tuple(decoder_prompt_spec().input_names + decoder_prompt_spec().output_names),
}
SAM_PROFILE_INPUTS = tuple(name for name in decoder_spec("sam").input_names if name not in decoder_spec("tensorrt").input_names)


def decoder_profile_of(input_names: Iterable[str]) -> str:
    """The profile of a decoder graph with these inputs: `sam` if it has SAM's extra inputs, else `tensorrt`."""
    names = set(input_names)
    return "sam" if all(name in names for name in SAM_PROFILE_INPUTS) else "tensorrt"


def missing_io(spec: ComponentSpec) -> list[str]:
    """The inputs and outputs every graph of spec's component has that `spec` lacks (empty for an
    evsam-export graph)."""
    have = set(spec.input_names) | set(spec.output_names)
    return [name for name in REQUIRED_IO[spec.component] if name not in have]


def artifact_spec(artifact) -> ComponentSpec:
    """The ComponentSpec of an exported artifact (its manifest IO), for feeds and contract checks."""
    spec = ComponentSpec(artifact.component, tuple(artifact.inputs), tuple(artifact.outputs))
    if artifact.component == DECODER_IMAGE:
        return spec
    if artifact.component == DECODER_PROMPT:
        return ComponentSpec(spec.component, spec.inputs, spec.outputs, profile="tensorrt", single_mask=spec.mask_tokens == 1)
    if artifact.component == "encoder":
        image = spec.input(INPUT_IMAGE)
        return spec if image is None else ComponentSpec(spec.component, spec.inputs, spec.outputs, encoder_profile_of(image))
    return ComponentSpec(
        spec.component,
        spec.inputs,
        spec.outputs,
        profile=decoder_profile_of(spec.input_names),
        single_mask=spec.mask_tokens == 1,
    )


# ------------------------------------------------------------------------------------------------ feeds


def input_names_of(inputs) -> list[str]:
    """Input names of a ComponentSpec, Artifact or Runner (anything with .inputs), or of a sequence of
    TensorSpecs or names."""
    specs = inputs.inputs if hasattr(inputs, "inputs") else inputs
    return [getattr(spec, "name", spec) for spec in specs]


def _for_inputs(inputs, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`values` restricted to the inputs the graph has, in its input order; a missing one is left for
    runners.base.check_feeds to report."""
    return {name: values[name] for name in input_names_of(inputs) if name in values}


def encoder_feeds(inputs, input_image: np.ndarray) -> dict[str, np.ndarray]:
    """Encoder feeds: `input_image` [B,3,S,S] float32, already preprocessed (processing.preprocess_image), or
    for an `app` encoder the raw uint8 RGB image [H,W,3] (runners.base.check_feeds refuses anything else)."""
    return _for_inputs(inputs, {INPUT_IMAGE: input_image})


def no_mask_input(count: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(mask_input [count,1,256,256], has_mask_input [count]) that tell the decoder there is no mask prompt."""
    low = LOW_RES_MASK_SIZE
    return np.zeros((count, 1, low, low), np.float32), np.zeros((count,), np.float32)


def decoder_feeds(
    inputs,
    image_embeddings: np.ndarray,
    point_coords: np.ndarray,
    point_labels: np.ndarray,
    mask_input: np.ndarray | None = None,
    has_mask_input: np.ndarray | None = None,
    original_size: Sequence[float] | None = None,
) -> dict[str, np.ndarray]:
    """Decoder feeds for the graph whose inputs are `inputs` (see input_names_of), from semantic inputs.

    image_embeddings [1,256,64,64]; point_coords [B,N,2] in the 1024 prompt frame and point_labels [B,N]
    laid out like PyTorch SAM (processing.build_prompt_tokens); mask_input [1|B,1,256,256] low-res logits
    (None: no mask prompt), has_mask_input [1|B] (None: 1 for each given mask); original_size (H, W) of
    the image, fed as orig_im_size only to graphs that have it (the `sam` profile)."""
    if mask_input is None:
        if has_mask_input is not None:
            raise ValueError("has_mask_input given without mask_input")
        mask_input, has_mask_input = no_mask_input()
    elif has_mask_input is None:
        has_mask_input = np.ones((np.shape(mask_input)[0],), np.float32)
    values = {
        IMAGE_EMBEDDINGS: image_embeddings,
        POINT_COORDS: point_coords,
        POINT_LABELS: point_labels,
        MASK_INPUT: mask_input,
        HAS_MASK_INPUT: has_mask_input,
    }
    if original_size is not None:
        values[ORIG_IM_SIZE] = np.array(original_size, dtype=np.float32)
    return _for_inputs(inputs, values)


# Label pattern of sample prompts: every kind of token, including box corners and padding.
SAMPLE_LABEL_CYCLE = (LABEL_FOREGROUND, LABEL_BACKGROUND, LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT, LABEL_PADDING)
SAMPLE_ORIGINAL_SIZE = (480, 640)


def trace_feeds(spec: ComponentSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """The feeds a component is traced and checked with: a decoder gets 2 prompt sets x 3 points, so no dynamic
    dim is specialised to 1 or to a coincidence, except where its contract fixes them (--static-prompts)."""
    if spec.component == "encoder":
        return sample_feeds(spec, batch=1, seed=seed)
    if spec.component == DECODER_IMAGE:
        masks = spec.input(MASK_INPUT).shape[0]
        return sample_feeds(spec, batch=masks if isinstance(masks, int) else 2, seed=seed)
    prompts, points = spec.input(POINT_COORDS).shape[:2]
    return sample_feeds(spec, batch=prompts if isinstance(prompts, int) else 2,
                        num_points=points if isinstance(points, int) else 3, seed=seed)


def sample_feeds(spec: ComponentSpec, batch: int = 1, num_points: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic example inputs that satisfy `spec` (used for tracing and for equivalence checks)."""
    rng = np.random.default_rng(seed)
    if spec.component == "encoder" and spec.profile == "app":
        # Portrait and not a multiple of anything, so the in-graph resize and padding both do work.
        return encoder_feeds(spec, rng.integers(0, 256, size=(301, 217, 3), dtype=np.uint8))
    if spec.component == "encoder":
        size = spec.inputs[0].shape[-1]
        return encoder_feeds(spec, rng.standard_normal((batch, 3, size, size)).astype(np.float32))
    coords = rng.uniform(0, 1023, size=(batch, num_points, 2)).astype(np.float32)
    labels = np.tile(np.array(SAMPLE_LABEL_CYCLE, dtype=np.float32), num_points)[:num_points]
    if spec.component == DECODER_PROMPT:
        # Image-side tensors of the prompt sets' own masks ([batch]); values at the scale of real ones.
        image_side = {t.name: rng.standard_normal((batch, *t.shape[1:])).astype(np.float32) for t in image_side_specs(batch)}
        return _for_inputs(spec, {**image_side, POINT_COORDS: coords, POINT_LABELS: np.tile(labels, (batch, 1))})
    embeddings = rng.standard_normal(EMBEDDINGS_SHAPE).astype(np.float32)
    low = LOW_RES_MASK_SIZE
    mask = rng.standard_normal((batch, 1, low, low)).astype(np.float32)
    return decoder_feeds(
        spec,
        image_embeddings=embeddings,
        point_coords=coords,
        point_labels=np.tile(labels, (batch, 1)),
        mask_input=mask,
        has_mask_input=np.ones((batch,), dtype=np.float32),
        original_size=SAMPLE_ORIGINAL_SIZE,
    )

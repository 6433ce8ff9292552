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
from evsam_export.model.variants import EMBEDDING_DIM, EMBEDDING_SIZE, LOW_RES_MASK_SIZE, NUM_MASK_TOKENS

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

DECODER_PROFILES = ("sam", "tensorrt")
EMBEDDINGS_SHAPE = (1, EMBEDDING_DIM, EMBEDDING_SIZE, EMBEDDING_SIZE)

# ------------------------------------------------------------------------------------ label conventions

# PyTorch SAM's point labels, in the order manifest.json lists them.
LABEL_FOREGROUND = 1.0
LABEL_BACKGROUND = 0.0
LABEL_BOX_TOP_LEFT = 2.0
LABEL_BOX_BOTTOM_RIGHT = 3.0
LABEL_PADDING = -1.0
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


def mask_selection(single_mask: bool) -> dict:
    """The mask-token semantics of a decoder, as manifest.json records them."""
    if single_mask:
        return {"outputs": TOKEN0_ONLY, "tokens": 1, "rule": "token 0 only: PyTorch SAM multimask_output=False"}
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
    component: str  # encoder | decoder
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
    def prompt_batch(self) -> int | str | None:
        """Prompt sets per call (dim 0 of point_coords): an int for --static-prompts graphs, else its axis name."""
        coords = self.input(POINT_COORDS)
        return None if coords is None or not coords.shape else coords.shape[0]


def encoder_spec(variant, dynamic_batch: bool = True) -> ComponentSpec:
    """The encoder of `variant` (anything with .encoder_size): one normalised, padded NCHW image in, embeddings out."""
    batch = "batch" if dynamic_batch else 1
    size = variant.encoder_size
    return ComponentSpec(
        component="encoder",
        inputs=(TensorSpec(INPUT_IMAGE, "float32", (batch, 3, size, size)),),
        outputs=(TensorSpec(IMAGE_EMBEDDINGS, "float32", (batch, EMBEDDING_DIM, EMBEDDING_SIZE, EMBEDDING_SIZE)),),
    )


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


# The names every graph of a component has, whatever its profile; the `sam` decoder profile adds SAM_PROFILE_INPUTS.
REQUIRED_IO = {
    "encoder": (INPUT_IMAGE, IMAGE_EMBEDDINGS),
    "decoder": tuple(decoder_spec("tensorrt").input_names + decoder_spec("tensorrt").output_names),
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
    if artifact.component == "encoder":
        return spec
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
    """Encoder feeds: `input_image` [B,3,S,S] float32, already preprocessed (processing.preprocess_image)."""
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


def sample_feeds(spec: ComponentSpec, batch: int = 1, num_points: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic example inputs that satisfy `spec` (used for tracing and for equivalence checks)."""
    rng = np.random.default_rng(seed)
    if spec.component == "encoder":
        size = spec.inputs[0].shape[-1]
        return encoder_feeds(spec, rng.standard_normal((batch, 3, size, size)).astype(np.float32))
    coords = rng.uniform(0, 1023, size=(batch, num_points, 2)).astype(np.float32)
    labels = np.tile(np.array(SAMPLE_LABEL_CYCLE, dtype=np.float32), num_points)[:num_points]
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

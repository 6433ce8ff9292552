"""The `app` encoder profile: SAM's host preprocessing written as ONNX nodes in front of the traced encoder.

Annotation apps feed the encoder a raw image, so the graph takes uint8 RGB [H, W, 3] and does what
model.processing.preprocess_image does on the host: resize the longest side to the encoder size (Resize with
antialias=1, the triangle filter Pillow's BILINEAR uses, then rounded to 0..255 because Pillow returns uint8),
scale to 0..1, SAM's mean/std, zero-pad bottom/right to a square. The resize is the only step that is not
bit-identical to the host; prepend_preprocessing measures it on images of several shapes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from evsam_export import contract
from evsam_export.model.variants import PIXEL_MEAN, PIXEL_STD

PREFIX = "/app_preprocess/"
PREPROCESSED = PREFIX + "input_image"
# Shapes the export checks the in-graph preprocessing on: portrait, landscape, smaller than 512, square.
CHECK_SHAPES = ((301, 217), (480, 640), (200, 300), (37, 1500), (777, 777))


def preprocessing_nodes(encoder_size: int, output_name: str = PREPROCESSED) -> tuple[list, list]:
    """(nodes, initializers) mapping contract.INPUT_IMAGE (uint8 [H,W,3]) to `output_name` (float32 [1,3,S,S])."""
    from onnx import TensorProto, helper, numpy_helper

    def const(name: str, value) -> str:
        if PREFIX + name not in {init.name for init in initializers}:
            initializers.append(numpy_helper.from_array(np.asarray(value), PREFIX + name))
        return PREFIX + name

    def node(op: str, inputs: list[str], name: str, **attributes) -> str:
        nodes.append(helper.make_node(op, inputs, [PREFIX + name], name=PREFIX + name, **attributes))
        return PREFIX + name

    nodes, initializers = [], []
    # Output size in float64 like processing.resized_shape (Python floats): int(side * S / longest + 0.5), >= 1.
    shape = node("Shape", [contract.INPUT_IMAGE], "shape")
    height_width = node("Slice", [shape, const("zero", np.array([0], np.int64)), const("two", np.array([2], np.int64))], "height_width")
    sides = node("Cast", [height_width], "sides", to=TensorProto.DOUBLE)
    longest = node("ReduceMax", [sides], "longest", keepdims=1)
    scale = node("Div", [const("encoder_size", np.array([encoder_size], np.float64)), longest], "scale")
    scaled = node("Add", [node("Mul", [sides, scale], "scaled_sides"), const("half", np.array([0.5], np.float64))], "rounded_up")
    new_sides = node("Max", [node("Cast", [node("Floor", [scaled], "floor")], "new_sides_raw", to=TensorProto.INT64),
                             const("one", np.array([1], np.int64))], "new_sides")
    # HWC uint8 -> NCHW float32 in 0..255.
    pixels = node("Cast", [contract.INPUT_IMAGE], "pixels", to=TensorProto.FLOAT)
    nchw = node("Unsqueeze", [node("Transpose", [pixels], "chw", perm=[2, 0, 1]), const("axis0", np.array([0], np.int64))], "nchw")
    # Pillow resamples horizontally, rounds to uint8 (half up), then vertically and rounds again; two Resize
    # nodes do the same. exclude_outside=1 renormalises the filter at the borders as Pillow does (without it
    # the first and last rows and columns differ by up to 14 levels).
    new_width = node("Slice", [new_sides, const("one", np.array([1], np.int64)), const("two", np.array([2], np.int64))], "new_width")
    old_height = node("Slice", [height_width, const("zero", np.array([0], np.int64)), const("one", np.array([1], np.int64))], "old_height")
    batch_channels = const("batch_channels", np.array([1, 3], np.int64))
    passes = (("horizontal", node("Concat", [batch_channels, old_height, new_width], "horizontal_sizes", axis=0)),
              ("vertical", node("Concat", [batch_channels, new_sides], "vertical_sizes", axis=0)))
    half, black, white = const("half_level", np.float32(0.5)), const("black", np.float32(0.0)), const("white", np.float32(255.0))
    image = nchw
    for name, sizes in passes:
        resized = node("Resize", [image, "", "", sizes], f"{name}_resize", mode="linear", antialias=1, exclude_outside=1,
                       coordinate_transformation_mode="half_pixel")
        image = node("Clip", [node("Floor", [node("Add", [resized, half], f"{name}_plus_half")], f"{name}_round"), black, white],
                     f"{name}_uint8")
    as_uint8 = image
    # ToTensor then Normalize(mean/255, std/255) in float32, in processing.preprocess_image's order.
    unit = node("Div", [as_uint8, const("max_value", np.float32(255.0))], "unit")
    mean = const("mean", (np.asarray(PIXEL_MEAN, np.float32) / np.float32(255.0)).reshape(1, 3, 1, 1))
    std = const("std", (np.asarray(PIXEL_STD, np.float32) / np.float32(255.0)).reshape(1, 3, 1, 1))
    normalized = node("Div", [node("Sub", [unit, mean], "centered"), std], "normalized")
    padding = node("Sub", [const("square", np.array([encoder_size, encoder_size], np.int64)), new_sides], "padding")
    pads = node("Concat", [const("no_padding", np.zeros(6, np.int64)), padding], "pads", axis=0)
    nodes.append(helper.make_node("Pad", [normalized, pads], [output_name], name=PREFIX + "pad", mode="constant"))
    return nodes, initializers


def preprocessing_model(encoder_size: int, opset: int = contract.APP_ENCODER_MIN_OPSET):
    """The preprocessing alone as a model (input_image uint8 [H,W,3] -> preprocessed [1,3,S,S]), for checks."""
    from onnx import TensorProto, helper

    nodes, initializers = preprocessing_nodes(encoder_size, "preprocessed")
    graph = helper.make_graph(
        nodes,
        "app_preprocess",
        [helper.make_tensor_value_info(contract.INPUT_IMAGE, TensorProto.UINT8, list(contract.APP_IMAGE_SHAPE))],
        [helper.make_tensor_value_info("preprocessed", TensorProto.FLOAT, [1, 3, encoder_size, encoder_size])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def preprocessing_difference(encoder_size: int, shapes=CHECK_SHAPES, seed: int = 0) -> dict:
    """Max |in-graph - host| of the preprocessed image over uniform-noise images of `shapes` (noise is the
    resize's worst case), in normalised units and in 0..255 pixel levels before normalisation."""
    import onnxruntime as ort

    from evsam_export.model.processing import preprocess_image

    session = ort.InferenceSession(preprocessing_model(encoder_size).SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    std = np.asarray(PIXEL_STD, np.float32).reshape(1, 3, 1, 1)
    worst, worst_levels, per_shape = 0.0, 0.0, {}
    for height, width in shapes:
        image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        host, _ = preprocess_image(image, encoder_size)
        graph = session.run(None, {contract.INPUT_IMAGE: image})[0]
        levels = np.abs(host - graph) * std  # normalised units back to 0..255 pixel levels
        per_shape[f"{height}x{width}"] = {"max_levels": round(float(levels.max()), 3),
                                          "differing_values": round(float(np.mean(levels > 0.5)), 5)}
        worst = max(worst, float(np.max(np.abs(host - graph))))
        worst_levels = max(worst_levels, float(levels.max()))
    return {"max_abs_diff_normalized": worst, "max_abs_diff_levels": round(worst_levels, 3), "per_shape": per_shape}


def strip_preprocessing(path: Path, output: Path, encoder_size: int) -> Path:
    """The app encoder at `path` without its preprocessing nodes (prepend_preprocessing undone): the host
    encoder graph it was built from, float32 [1,3,S,S] in, written to `output` (bench's same-graph baseline)."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    if not any(PREPROCESSED in node.output for node in graph.node):
        raise ValueError(f"{path} has no {PREPROCESSED} tensor: not an app-profile encoder as exported")
    kept = [node for node in graph.node if not node.name.startswith(PREFIX)]
    for node in kept:
        node.input[:] = [contract.INPUT_IMAGE if name == PREPROCESSED else name for name in node.input]
    del graph.node[:]
    graph.node.extend(kept)
    initializers = [init for init in graph.initializer if not init.name.startswith(PREFIX)]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    del graph.input[:]
    graph.input.append(onnx.helper.make_tensor_value_info(contract.INPUT_IMAGE, onnx.TensorProto.FLOAT,
                                                          [1, 3, encoder_size, encoder_size]))
    onnx.save(model, str(output))
    return output


def prepend_preprocessing(path: Path, encoder_size: int) -> tuple[contract.ComponentSpec, dict]:
    """Rewrite the traced host encoder at `path` (batch 1, opset >= 18) into the app profile; returns its spec
    and the facts manifest.json records (what the graph does, measured difference to the host pipeline)."""
    import onnx

    from evsam_export.export.onnx_export import check_contract, stamp_output_shapes

    model = onnx.load(str(path))
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset < contract.APP_ENCODER_MIN_OPSET:
        raise ValueError(f"the app encoder needs opset {contract.APP_ENCODER_MIN_OPSET}, the graph has {opset}")
    graph = model.graph
    for node in graph.node:
        node.input[:] = [PREPROCESSED if name == contract.INPUT_IMAGE else name for name in node.input]
    nodes, initializers = preprocessing_nodes(encoder_size)
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + existing)
    graph.initializer.extend(initializers)
    del graph.input[:]
    graph.input.append(onnx.helper.make_tensor_value_info(contract.INPUT_IMAGE, onnx.TensorProto.UINT8, list(contract.APP_IMAGE_SHAPE)))
    spec = contract.encoder_spec(None, profile="app")  # the app input has no size to take from a variant
    stamp_output_shapes(model, spec)
    check_contract(model, spec)
    onnx.save(model, str(path))
    facts = {"preprocessing": contract.encoder_input_contract("app", encoder_size),
             "preprocessing_vs_host": preprocessing_difference(encoder_size)}
    return spec, facts


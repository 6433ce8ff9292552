"""Trace the encoder and the prompt decoder to ONNX, each with a declared IO contract.

We use the TorchScript exporter (`dynamo=False`): torch>=2.9's default dynamo exporter changes the
opset, writes a `.onnx.data` sidecar and flattens node names (`node_matmul_3`), which breaks the
name-scoped precision islands later steps rely on (RUNTIMES.md §1.2.4). Opset 17 is the widest
TensorRT/ORT/OpenVINO common ground.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evsam_export.errors import ExportError
from evsam_export.manifest import TensorSpec
from evsam_export.model.variants import EMBEDDING_DIM, EMBEDDING_SIZE, LOW_RES_MASK_SIZE, NUM_MASK_TOKENS, Variant

DEFAULT_OPSET = 17
MIN_OPSET = 17  # LayerNormalization and the Resize modes we emit need 17


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

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes = {}
        for spec in self.inputs + self.outputs:
            named = {i: dim for i, dim in enumerate(spec.shape) if isinstance(dim, str)}
            if named:
                axes[spec.name] = named
        return axes


def encoder_spec(variant: Variant, dynamic_batch: bool = True) -> ComponentSpec:
    batch = "batch" if dynamic_batch else 1
    size = variant.encoder_size
    return ComponentSpec(
        component="encoder",
        inputs=(TensorSpec("input_image", "float32", (batch, 3, size, size)),),
        outputs=(TensorSpec("image_embeddings", "float32", (batch, EMBEDDING_DIM, EMBEDDING_SIZE, EMBEDDING_SIZE)),),
    )


def decoder_spec(profile: str = "sam", single_mask: bool = False, dynamic_prompts: bool = True) -> ComponentSpec:
    prompts = "num_prompts" if dynamic_prompts else 1
    points = "num_points" if dynamic_prompts else 2
    masks = 1 if single_mask else NUM_MASK_TOKENS
    low = LOW_RES_MASK_SIZE
    inputs = [
        TensorSpec("image_embeddings", "float32", (1, EMBEDDING_DIM, EMBEDDING_SIZE, EMBEDDING_SIZE)),
        TensorSpec("point_coords", "float32", (prompts, points, 2)),
        TensorSpec("point_labels", "float32", (prompts, points)),
        # [1,...] broadcasts over all prompt sets (what SAM apps feed); [B,...] gives one mask per set.
        TensorSpec("mask_input", "float32", ("mask_batch" if dynamic_prompts else 1, 1, low, low)),
        TensorSpec("has_mask_input", "float32", ("mask_batch" if dynamic_prompts else 1,)),
    ]
    outputs = [
        TensorSpec("iou_predictions", "float32", (prompts, masks)),
        TensorSpec("low_res_masks", "float32", (prompts, masks, low, low)),
    ]
    if profile == "sam":
        inputs.append(TensorSpec("orig_im_size", "float32", (2,)))
        outputs.insert(0, TensorSpec("masks", "float32", (prompts, masks, "image_height", "image_width")))
    elif profile != "tensorrt":
        raise ExportError(f"unknown decoder profile {profile!r}", hint="use sam or tensorrt")
    return ComponentSpec("decoder", tuple(inputs), tuple(outputs), profile=profile, single_mask=single_mask)


def artifact_spec(artifact) -> ComponentSpec:
    """The ComponentSpec of an exported artifact (its manifest IO), for feeds and contract checks."""
    names = {t.name for t in artifact.inputs}
    return ComponentSpec(
        artifact.component,
        tuple(artifact.inputs),
        tuple(artifact.outputs),
        profile=None if artifact.component == "encoder" else ("sam" if "orig_im_size" in names else "tensorrt"),
        single_mask=artifact.component == "decoder" and artifact.outputs[-1].shape[1] == 1,
    )


def sample_feeds(spec: ComponentSpec, batch: int = 1, num_points: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic example inputs that satisfy `spec` (used for tracing and for equivalence checks)."""
    rng = np.random.default_rng(seed)
    if spec.component == "encoder":
        size = spec.inputs[0].shape[-1]
        return {"input_image": rng.standard_normal((batch, 3, size, size)).astype(np.float32)}
    coords = rng.uniform(0, 1023, size=(batch, num_points, 2)).astype(np.float32)
    labels = np.tile(np.array([1.0, 0.0, 2.0, 3.0, -1.0], dtype=np.float32), num_points)[:num_points]
    feeds = {
        "image_embeddings": rng.standard_normal((1, EMBEDDING_DIM, EMBEDDING_SIZE, EMBEDDING_SIZE)).astype(np.float32),
        "point_coords": coords,
        "point_labels": np.tile(labels, (batch, 1)),
        "mask_input": rng.standard_normal((batch, 1, LOW_RES_MASK_SIZE, LOW_RES_MASK_SIZE)).astype(np.float32),
        "has_mask_input": np.ones((batch,), dtype=np.float32),
    }
    if spec.profile == "sam":
        feeds["orig_im_size"] = np.array([480.0, 640.0], dtype=np.float32)
    return feeds


def export_onnx(module, spec: ComponentSpec, path: Path, opset: int = DEFAULT_OPSET) -> None:
    """Trace `module` with example feeds for `spec` and write a single-file ONNX model to `path`."""
    import torch

    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old", hint=f"use --opset {MIN_OPSET} or newer")
    # Trace with 2 prompt sets x 3 points so no dynamic dim is specialised to 1 or to a coincidence.
    example = sample_feeds(spec, batch=2 if spec.component == "decoder" else 1, num_points=3)
    args = tuple(torch.from_numpy(example[name]) for name in spec.input_names)
    # A fresh wrapper module starts in training mode, and the exporter restores that mode on the whole
    # subtree after tracing, which would silently switch the shared model's BatchNorms to batch statistics.
    module.eval()
    # Run eagerly first so a model error reads as Python, not as a tracer failure.
    with torch.inference_mode():
        module(*args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about Python ints; the contract checks below decide
        try:
            torch.onnx.export(
                module,
                args,
                str(path),
                input_names=spec.input_names,
                output_names=spec.output_names,
                dynamic_axes=spec.dynamic_axes(),
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        except Exception as exc:  # the exporter raises many types; report one line
            raise ExportError(
                f"torch.onnx.export of the {spec.component} failed: {str(exc).splitlines()[0][:200]}",
                hint="re-run with --debug for the traceback",
            ) from exc
    import onnx

    model = onnx.load(str(path))
    stamp_output_shapes(model, spec)
    onnx.save(model, str(path))


FORBIDDEN_OPS = {"If", "Loop", "OneHot", "NonZero"}


def stamp_output_shapes(model, spec: ComponentSpec) -> None:
    """Write the declared output shapes into the graph: the tracer names derived dims after internal
    nodes ('Reshapelow_res_masks_dim_1'), which tells a consumer nothing; the spec's names do."""
    import onnx

    by_name = {t.name: t for t in spec.outputs}
    for output in model.graph.output:
        want = by_name.get(output.name)
        if want is None:
            continue
        elem_type = output.type.tensor_type.elem_type
        output.CopyFrom(onnx.helper.make_tensor_value_info(output.name, elem_type, list(want.shape)))


def check_contract(model_or_path, spec: ComponentSpec) -> None:
    """The graph's IO names, dtypes and (named) dims equal the spec; no control flow or OneHot."""
    import onnx

    model = onnx.load(str(model_or_path)) if isinstance(model_or_path, (str, Path)) else model_or_path
    onnx.checker.check_model(model, full_check=False)
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    problems = []
    actual_inputs = [vi for vi in graph.input if vi.name not in initializers]
    for kind, expected, actual in (("input", spec.inputs, actual_inputs), ("output", spec.outputs, graph.output)):
        if [t.name for t in expected] != [vi.name for vi in actual]:
            problems.append(f"{kind}s {[vi.name for vi in actual]} != {[t.name for t in expected]}")
            continue
        for want, got in zip(expected, actual):
            dtype = onnx.helper.tensor_dtype_to_np_dtype(got.type.tensor_type.elem_type).name
            dims = tuple(d.dim_param if d.dim_param else d.dim_value for d in got.type.tensor_type.shape.dim)
            if dtype != want.dtype:
                problems.append(f"{want.name} dtype {dtype} != {want.dtype}")
            if dims != tuple(want.shape):
                problems.append(f"{want.name} shape {dims} != {tuple(want.shape)}")
    ops = {node.op_type for node in graph.node}
    bad_ops = sorted(ops & FORBIDDEN_OPS)
    if bad_ops:
        problems.append(f"forbidden ops {bad_ops} (control flow / OneHot break TensorRT and fixed-shape runtimes)")
    if problems:
        raise ExportError(f"{spec.component} graph breaks its IO contract: " + "; ".join(problems))


def op_histogram(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))

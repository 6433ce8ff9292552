"""Trace the encoder and the prompt decoder to ONNX, each with a declared IO contract.

We use the TorchScript exporter (`dynamo=False`): torch>=2.9's default dynamo exporter changes the
opset, writes a `.onnx.data` sidecar and flattens node names (`node_matmul_3`), which breaks the
name-scoped precision islands later steps rely on (docs/runtimes.md "TorchScript exporter, opset 17"). Opset 17 is the widest
TensorRT/ORT/OpenVINO common ground.
"""

from __future__ import annotations

import warnings
from pathlib import Path

# The specs are declared in evsam_export.contract; artifact_spec/decoder_spec/encoder_spec stay importable
# from here for the steps and tests that already take them from the exporter.
from evsam_export.contract import ComponentSpec, artifact_spec, decoder_spec, encoder_spec, sample_feeds, trace_feeds  # noqa: F401
from evsam_export.errors import ExportError

DEFAULT_OPSET = 17
MIN_OPSET = 17  # LayerNormalization and the Resize modes we emit need 17


def export_onnx(module, spec: ComponentSpec, path: Path, opset: int = DEFAULT_OPSET) -> None:
    """Trace `module` with example feeds for `spec` and write a single-file ONNX model to `path`."""
    import torch

    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old", hint=f"use --opset {MIN_OPSET} or newer")
    example = trace_feeds(spec)
    args = tuple(torch.from_numpy(example[name]) for name in spec.input_names)
    # A fresh wrapper module starts in training mode, and the exporter restores that mode on the whole
    # subtree after tracing, which would silently switch the shared model's BatchNorms to batch statistics.
    module.eval()
    # Run eagerly first so a model error reads as Python, not as a tracer failure.
    with torch.inference_mode():
        module(*args)
    # no_grad: the parameters require grad, so a traced forward would keep every activation for a backward
    # pass until the export returns (xl1's encoder peak drops by gigabytes; the graph bytes are the same).
    with warnings.catch_warnings(), torch.no_grad():
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

"""Named graph passes that make the exported graphs faster without changing what they compute.

Found by profiling ONNX Runtime per op type (`scripts/profile_ort.py`, L0 encoder, 2 threads, synthetic
weights, ORT 1.32; the profile tables are in docs/benchmarks.md). Every pass

* says why it exists and what it measured (the `reason` / `measured` fields, printed by `targets`);
* matches a narrow, fully checked pattern and leaves anything else alone (a pass that finds nothing is a
  no-op, never an error);
* is followed, wherever it runs, by an output-equivalence check against the graph before the pass
  (`check_equivalence`, max |diff| <= 1e-4 at every test shape); tests/export/test_graph_passes.py checks each
  pass on its own against ORT and PyTorch.

Two kinds: *portable* passes emit standard ONNX at the graph's opset and run at export, so every target
(ORT, OpenVINO, TensorRT) gets them; *onnxruntime* passes emit `com.microsoft` contrib ops and run only
in the ONNX Runtime targets.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

CONTRIB_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class GraphPass:
    name: str
    runtime: str  # "portable" (standard ONNX) | "onnxruntime" (com.microsoft ops)
    reason: str
    measured: str
    rewrite: Callable  # (onnx_graphsurgeon.Graph) -> number of rewritten sites


# ---------------------------------------------------------------------------------------------------
# bicubic-resize-as-matmul


def _source_coordinate(out_index: np.ndarray, in_len: int, out_len: int, mode: str) -> np.ndarray:
    """ONNX Resize's coordinate_transformation_mode, for sizes given (scale = out_len / in_len)."""
    scale = out_len / in_len
    if mode == "half_pixel":
        return (out_index + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (out_index + 0.5) / scale - 0.5 if out_len > 1 else np.zeros_like(out_index)
    if mode == "align_corners":
        return out_index * (in_len - 1) / (out_len - 1) if out_len > 1 else np.zeros_like(out_index)
    if mode == "asymmetric":
        return out_index / scale
    raise ValueError(mode)


def _cubic_kernel(distance: np.ndarray, a: float) -> np.ndarray:
    d = np.abs(distance)
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return np.where(d <= 1, near, np.where(d < 2, far, 0.0))


def cubic_resize_matrix(in_len: int, out_len: int, mode: str = "half_pixel", a: float = -0.75) -> np.ndarray:
    """[out_len, in_len] matrix M with resize(x) == M @ x along one axis: ONNX Resize `cubic` with
    exclude_outside=0, i.e. the four taps at floor(x)-1 .. floor(x)+2 clamped to the edge (PyTorch's
    bicubic, align_corners=False, is half_pixel with a = -0.75). Computed in float64."""
    out_index = np.arange(out_len, dtype=np.float64)
    source = _source_coordinate(out_index, in_len, out_len, mode)
    base = np.floor(source)
    frac = source - base
    matrix = np.zeros((out_len, in_len), np.float64)
    for offset in (-1, 0, 1, 2):
        weight = _cubic_kernel(frac - offset, a)
        column = np.clip(base + offset, 0, in_len - 1).astype(np.int64)
        np.add.at(matrix, (np.arange(out_len), column), weight)
    return matrix


_COORDINATE_MODES = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric")


def _constant(tensor) -> np.ndarray | None:
    """Value of a graph constant (initializer or Constant node output), else None."""
    import onnx_graphsurgeon as gs

    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        value = tensor.inputs[0].attrs["value"]
        return np.asarray(value.values)
    return None


def _spatial_size(resize) -> tuple[int, int] | None:
    """The (H, W) a Resize produces, if it is fixed and only the last two axes change.

    Accepts constant `scales` or `sizes` whose leading entries keep the input's dims, and the TorchScript
    pattern `sizes = Concat(Slice(Shape(x), 0, k), const[H, W])` (F.interpolate(size=...) with a dynamic
    batch), where the leading dims are x's own by construction."""
    x = resize.inputs[0]
    if x.shape is None or len(x.shape) < 3 or not all(isinstance(d, int) for d in x.shape[-2:]):
        return None
    rank = len(x.shape)
    scales = _constant(resize.inputs[2]) if len(resize.inputs) > 2 and resize.inputs[2].name else None
    sizes_tensor = resize.inputs[3] if len(resize.inputs) > 3 and resize.inputs[3].name else None
    if scales is not None and scales.size == rank:
        if not np.all(scales[:-2] == 1.0):
            return None
        out = [x.shape[-2] * float(scales[-2]), x.shape[-1] * float(scales[-1])]
        # Resize maps coordinates with the given scale; our matrices use out/in, equal only when integral.
        if not all(v >= 1 and v == math.floor(v) for v in out):
            return None
        return int(out[0]), int(out[1])
    if sizes_tensor is None:
        return None
    sizes = _constant(sizes_tensor)
    if sizes is not None:
        if sizes.size != rank or list(sizes[:-2]) != list(x.shape[:-2]):
            return None
        return int(sizes[-2]), int(sizes[-1])
    if len(sizes_tensor.inputs) != 1 or sizes_tensor.inputs[0].op != "Concat" or len(sizes_tensor.inputs[0].inputs) != 2:
        return None
    leading, spatial = sizes_tensor.inputs[0].inputs
    spatial = _constant(spatial)
    if spatial is None or spatial.size != 2 or len(leading.inputs) != 1:
        return None
    sliced = leading.inputs[0]
    if sliced.op != "Slice" or len(sliced.inputs[0].inputs) != 1 or sliced.inputs[0].inputs[0].op != "Shape":
        return None
    shape_node = sliced.inputs[0].inputs[0]
    starts, ends = (_constant(t) for t in sliced.inputs[1:3])
    axes = _constant(sliced.inputs[3]) if len(sliced.inputs) > 3 else np.array([0])
    if shape_node.inputs[0] is not x or shape_node.attrs.get("start", 0) != 0 or shape_node.attrs.get("end") is not None:
        return None
    if starts is None or ends is None or axes is None or list(starts) != [0] or list(axes) != [0] or int(ends[0]) != rank - 2:
        return None
    return int(spatial[0]), int(spatial[1])


def rewrite_bicubic_resize(graph) -> int:
    """Resize(mode=cubic) with fixed spatial sizes -> MatMul(x, Cᵀ) then MatMul(R, ·).

    Bicubic resizing is separable and linear: out = R · x · Cᵀ per channel with constant [H, h] and [W, w]
    interpolation matrices (`cubic_resize_matrix`), which MatMul broadcasts over batch and channels.
    Nodes are named `<resize>/bicubic_cols` and `<resize>/bicubic_rows` so precision islands can keep them
    fp32 (the upstream upsample runs with autocast off)."""
    import onnx_graphsurgeon as gs

    count = 0
    for node in [n for n in graph.nodes if n.op == "Resize"]:
        attrs = node.attrs
        mode = attrs.get("coordinate_transformation_mode", "half_pixel")
        if attrs.get("mode") != "cubic" or mode not in _COORDINATE_MODES:
            continue
        if attrs.get("exclude_outside", 0) != 0 or attrs.get("antialias", 0) != 0:
            continue
        if attrs.get("axes") is not None or attrs.get("keep_aspect_ratio_policy", "stretch") != "stretch":
            continue
        size = _spatial_size(node)
        if size is None:
            continue
        x, y = node.inputs[0], node.outputs[0]
        if x.dtype is not None and np.dtype(x.dtype) != np.float32:
            continue
        a = float(attrs.get("cubic_coeff_a", -0.75))
        (in_h, in_w), (out_h, out_w) = x.shape[-2:], size
        rows = cubic_resize_matrix(in_h, out_h, mode, a).astype(np.float32)
        cols_t = cubic_resize_matrix(in_w, out_w, mode, a).T.astype(np.float32).copy()
        widened = gs.Variable(f"{node.name}/bicubic_cols_output", dtype=np.float32)
        graph.nodes.append(gs.Node("MatMul", f"{node.name}/bicubic_cols",
                                   inputs=[x, gs.Constant(f"{node.name}/bicubic_cols_matrix", cols_t)], outputs=[widened]))
        graph.nodes.append(gs.Node("MatMul", f"{node.name}/bicubic_rows",
                                   inputs=[gs.Constant(f"{node.name}/bicubic_rows_matrix", rows), widened], outputs=[y]))
        node.outputs.clear()
        count += 1
    return count


# ---------------------------------------------------------------------------------------------------
# tanh-gelu-as-fastgelu

_GELU_CONSTANTS = {"kappa": 0.044715, "beta": math.sqrt(2.0 / math.pi), "one": 1.0, "half": 0.5}


def _is_scalar(tensor, value: float) -> bool:
    constant = _constant(tensor)
    return constant is not None and constant.size == 1 and abs(float(constant.reshape(-1)[0]) - value) <= 1e-6 * max(1.0, abs(value))


def _producer(tensor, op: str):
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == op:
        return tensor.inputs[0]
    return None


def _split_scalar(node, value: float):
    """For a binary node with one scalar-constant operand equal to `value`: the other operand."""
    a, b = node.inputs
    if _is_scalar(a, value):
        return b
    if _is_scalar(b, value):
        return a
    return None


def _match_tanh_gelu(tanh, graph_outputs: set[int]) -> tuple[object, object, list, bool] | None:
    """TorchScript's decomposition of GELU(approximate="tanh") at opset < 20, operands in either order:
    y = 0.5 * (x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * (x * (x * x))))))
    onnxsim often folds the final `0.5 *` into the weights of the Convs that read y; then the graph holds
    y2 = x * (1 + tanh(...)) = 2 * GELU(x). Returns (x, y or y2, nodes, halved) when every intermediate
    has exactly one consumer and is no graph output (x excepted); `halved` says whether the 0.5 is still in
    the graph. `graph_outputs`: ids of the graph's output tensors."""
    scaled = _producer(tanh.inputs[0], "Mul")
    inner = _split_scalar(scaled, _GELU_CONSTANTS["beta"]) if scaled is not None else None
    summed = _producer(inner, "Add") if inner is not None else None
    if summed is None:
        return None
    chain = None
    for x, cubic_term in (summed.inputs, summed.inputs[::-1]):
        scaled_cube = _producer(cubic_term, "Mul")
        cube = _split_scalar(scaled_cube, _GELU_CONSTANTS["kappa"]) if scaled_cube is not None else None
        cube_node = _producer(cube, "Mul") if cube is not None else None
        if cube_node is None or x not in cube_node.inputs:
            continue
        square = cube_node.inputs[1] if cube_node.inputs[0] is x else cube_node.inputs[0]
        square_node = _producer(square, "Mul")
        if square_node is None or list(square_node.inputs) != [x, x]:
            continue
        chain = (x, [square_node, cube_node, scaled_cube, summed, scaled, tanh])
        break
    if chain is None:
        return None
    x, nodes = chain
    if len(tanh.outputs[0].outputs) != 1:
        return None
    plus_one = tanh.outputs[0].outputs[0]
    if plus_one.op != "Add" or _split_scalar(plus_one, _GELU_CONSTANTS["one"]) is not tanh.outputs[0]:
        return None
    if len(plus_one.outputs[0].outputs) != 1:
        return None
    times_x = plus_one.outputs[0].outputs[0]
    if times_x.op != "Mul" or set(map(id, times_x.inputs)) != {id(x), id(plus_one.outputs[0])}:
        return None
    nodes += [plus_one, times_x]
    consumers = times_x.outputs[0].outputs
    halved = len(consumers) == 1 and consumers[0].op == "Mul" and _split_scalar(consumers[0], _GELU_CONSTANTS["half"]) is times_x.outputs[0]
    if halved:
        nodes.append(consumers[0])
    internal = [n.outputs[0] for n in nodes[:-1]]
    if any(len(t.outputs) != 1 or id(t) in graph_outputs for t in internal) or x in internal:
        return None
    return x, nodes[-1].outputs[0], nodes, halved


def _conv_weights_only_reader(tensor) -> bool:
    """Every consumer of `tensor` is a Conv reading it as data, with a constant weight used nowhere else."""
    import onnx_graphsurgeon as gs

    return bool(tensor.outputs) and all(
        n.op == "Conv" and n.inputs[0] is tensor and isinstance(n.inputs[1], gs.Constant) and len(n.inputs[1].outputs) == 1
        for n in tensor.outputs
    )


def rewrite_tanh_gelu(graph) -> int:
    """The tanh-GELU decomposition (8-9 nodes) -> one com.microsoft FastGelu (same formula, one pass).

    Where onnxsim folded GELU's 0.5 into the next Convs' weights, the folded factor is undone exactly:
    those weights are doubled (a power of two: bit-exact in fp32) so the Convs read FastGelu's output
    directly; if a reader is anything else, an explicit `* 2` follows the FastGelu."""
    import onnx_graphsurgeon as gs

    count = 0
    graph_outputs = {id(t) for t in graph.outputs}
    for tanh in [n for n in graph.nodes if n.op == "Tanh"]:
        match = _match_tanh_gelu(tanh, graph_outputs)
        if match is None:
            continue
        x, y, nodes, halved = match
        for node in nodes:
            node.outputs.clear()
        scope = tanh.name.rsplit("/", 1)[0] if "/" in tanh.name else tanh.name
        fold_into_convs = not halved and _conv_weights_only_reader(y)
        gelu = y if halved or fold_into_convs else gs.Variable(f"{scope}/FastGelu_output", dtype=np.float32)
        graph.nodes.append(gs.Node("FastGelu", f"{scope}/FastGelu", inputs=[x], outputs=[gelu], domain=CONTRIB_DOMAIN))
        if fold_into_convs:
            for conv in y.outputs:
                weight = conv.inputs[1]
                conv.inputs[1] = gs.Constant(
                    f"{weight.name}/gelu_half_unfolded", (np.asarray(weight.values) * 2).astype(weight.values.dtype)
                )
        elif not halved:
            graph.nodes.append(gs.Node("Mul", f"{scope}/FastGelu_times_2",
                                       inputs=[gelu, gs.Constant(f"{scope}/two", np.array(2.0, np.float32))], outputs=[y]))
        count += 1
    return count


PASSES = {
    p.name: p
    for p in (
        GraphPass(
            "bicubic-resize-as-matmul",
            "portable",
            reason=(
                "ORT's CPU cubic Resize is a scalar per-pixel loop: the neck's two bicubic upsamples "
                "(16->64 and 32->64, 256 channels) took 22% of the L0 encoder. Two MatMuls with constant "
                "interpolation matrices compute the same separable bicubic sum on MLAS GEMM."
            ),
            measured="L0 encoder, ORT 1.32, 2 threads: Resize 140 ms -> MatMul 1.4 ms; 621 -> 443 ms per image; max |diff| 2.9e-6",
            rewrite=rewrite_bicubic_resize,
        ),
        GraphPass(
            "tanh-gelu-as-fastgelu",
            "onnxruntime",
            reason=(
                "Opset 17 has no Gelu op, so TorchScript writes tanh-GELU as 9 elementwise nodes (6 Mul, 2 Add, "
                "Tanh), each a full pass over the activation; ORT's own FastGeluFusion does not match this "
                "operand order (30 Tanh left in the session graph). com.microsoft.FastGelu computes the same "
                "formula in one pass (onnxsim's folding of GELU's 0.5 into the next Conv is undone exactly)."
            ),
            measured="L0 encoder, ORT 1.32, 2 threads: Mul+Add+Tanh 88 ms -> FastGelu 20 ms; 451 -> 386 ms per image; max |diff| 4.3e-6",
            rewrite=rewrite_tanh_gelu,
        ),
    )
}

EXPORT_PASSES = tuple(name for name, p in PASSES.items() if p.runtime == "portable")
ORT_PASSES = tuple(name for name, p in PASSES.items() if p.runtime == "onnxruntime")


def check_pass_names(names, runtimes: tuple[str, ...]) -> tuple[str, ...]:
    from evsam_export.errors import RecipeError

    names = tuple(names)
    for name in names:
        if name not in PASSES:
            raise RecipeError(f"unknown graph pass {name!r}", hint=f"known passes: {', '.join(PASSES)}")
        if PASSES[name].runtime not in runtimes:
            raise RecipeError(f"graph pass {name!r} emits {PASSES[name].runtime} ops and cannot run here",
                              hint=f"passes allowed here: {', '.join(n for n, p in PASSES.items() if p.runtime in runtimes)}")
    return names


def apply_passes(model, names) -> tuple[object, dict[str, int]]:
    """Run the named passes on an onnx.ModelProto; returns (new model, rewritten sites per pass).

    Model-level fields that onnx-graphsurgeon does not carry (producer, metadata) are copied over."""
    import onnx
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    counts = {}
    for name in names:
        counts[name] = PASSES[name].rewrite(graph)
        graph.cleanup().toposort()
    if any(PASSES[n].runtime == "onnxruntime" and counts[n] for n in names):
        domains = list(graph.import_domains or [onnx.helper.make_opsetid("", graph.opset)])
        if not any(d.domain == CONTRIB_DOMAIN for d in domains):
            graph.import_domains = domains + [onnx.helper.make_opsetid(CONTRIB_DOMAIN, 1)]
    rewritten = gs.export_onnx(graph)
    rewritten.ir_version = model.ir_version
    rewritten.producer_name, rewritten.producer_version = model.producer_name, model.producer_version
    del rewritten.metadata_props[:]
    rewritten.metadata_props.extend(model.metadata_props)
    return rewritten, counts


def apply_checked(model, names, spec) -> tuple[object, dict]:
    """`apply_passes`, then prove it: ORT outputs before and after at the equivalence shapes of `spec`
    (simplify.py's feeds: two prompt shapes for the decoder) within EQUIVALENCE_ATOL, the IO contract
    unchanged. Returns (model, facts for the manifest)."""
    import gc

    from evsam_export.errors import ExportError
    from evsam_export.export.onnx_export import check_contract
    from evsam_export.export.simplify import EQUIVALENCE_ATOL, equivalence_feeds, max_abs_difference, ort_outputs

    feeds = equivalence_feeds(spec)
    # The reference runs before the rewrite and `model` is dropped after it, so a caller that hands over its
    # only reference never holds the original, the rewrite and an ORT session of either at once.
    reference = [ort_outputs(model, f) for f in feeds]
    rewritten, counts = apply_passes(model, names)
    facts = {"passes": counts, "nodes_before": len(model.graph.node), "nodes_after": len(rewritten.graph.node)}
    if not any(counts.values()):
        return model, {**facts, "max_abs_diff": 0.0}
    del model
    gc.collect()
    check_contract(rewritten, spec)
    diff = max_abs_difference(reference, [ort_outputs(rewritten, f) for f in feeds])
    if not diff <= EQUIVALENCE_ATOL:
        applied = ", ".join(f"{n} x{c}" for n, c in counts.items() if c)
        raise ExportError(f"graph passes ({applied}) moved {spec.component} outputs by {diff:.2e} (> {EQUIVALENCE_ATOL})",
                          hint="report this graph; rerun without graph passes (--no-graph-passes / graph_passes = [])")
    return rewritten, {**facts, "max_abs_diff": diff}

"""What a lower-precision artifact really holds, and whether it earns its name.

A census counts the compute ops (Conv, ConvTranspose, MatMul, Gemm) that run in the lower precision out of
all of them, read from the graph that ships: a QDQ ONNX (`ort_int8.qdq_structure`) or an OpenVINO IR after
NNCF (a Convolution/MatMul fed by a FakeQuantize on its activation and INT8 weights). It is recorded as
`facts["lowered"]`, printed on the summary line and in the tables, so a build that reverted nearly every
layer says so.

A gated INT8 build ships only when it gained something: when no layer is left INT8, or the INT8 graph is
less than `min_speedup` times faster than its fp32 parent (timed alternated on the build machine), the step
hands back the fp32 parent instead, with `facts["lowering"]` saying why in one line, and `run` exits with
`NothingGained.exit_code` (docs/design.md "A missed goal never exits 0").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

# ONNX op types a census counts: the ops whose kernels a lower precision speeds up.
COUNTED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# OpenVINO op types and the ONNX op type each is counted as.
OPENVINO_OPS = {"Convolution": "Conv", "GroupConvolution": "Conv", "ConvolutionBackpropData": "ConvTranspose",
                "GroupConvolutionBackpropData": "ConvTranspose", "MatMul": "MatMul"}
# Ops a value passes through without leaving its precision (OpenVINO's low-precision transformations move
# dequantization across them).
_TRANSPARENT_OPS = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Pad", "Slice", "StridedSlice", "VariadicSplit",
                    "Split", "Concat", "Gather", "Relu", "MaxPool"}
# What compressed INT8 weights go through on their way to the op (Constant i8 -> Convert -> Subtract -> Multiply).
_DEQUANTIZE_OPS = {"Convert", "Subtract", "Multiply", "Reshape", "Transpose", "Unsqueeze", "Squeeze"}

# A gated INT8 build that is not at least this many times faster than its fp32 parent ships the parent.
MIN_SPEEDUP = 1.1

PRECISION_LABEL = {"int8": "INT8", "fp16": "fp16", "bf16": "bf16"}


def census(lowered: dict[str, int], total: dict[str, int], precision: str) -> dict:
    """{"precision", "ops": {op: {"lowered", "total"}}, "lowered", "total", "text"} over the op types present."""
    ops = {op: {"lowered": int(lowered.get(op, 0)), "total": int(total[op])} for op in COUNTED_OPS if total.get(op)}
    counted = {"precision": precision, "ops": ops, "lowered": sum(v["lowered"] for v in ops.values()),
               "total": sum(v["total"] for v in ops.values())}
    return {**counted, "text": census_text(counted)}


def census_text(counted: dict | None) -> str:
    """'56 of 69 Conv, 0 of 8 MatMul INT8' ('' without a census)."""
    if not counted or not counted.get("ops"):
        return ""
    label = PRECISION_LABEL.get(counted["precision"], counted["precision"])
    parts = [f"{v['lowered']} of {v['total']} {op}" for op, v in counted["ops"].items()]
    return f"{', '.join(parts)} {label}"


def qdq_census(structure: dict) -> dict:
    """Census of a QDQ ONNX from `ort_int8.qdq_structure` (quantized / float nodes per op type)."""
    quantized, kept = structure.get("quantized", {}), structure.get("float", {})
    total = {op: quantized.get(op, 0) + kept.get(op, 0) for op in set(quantized) | set(kept)}
    return census(quantized, total, "int8")


def fp16_census(model) -> dict:
    """Census of an fp16 ONNX (fp32 islands): a counted op runs in fp16 when its first input is an fp16 tensor."""
    import onnx

    types = {init.name: init.data_type for init in model.graph.initializer}
    for info in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        types[info.name] = info.type.tensor_type.elem_type
    for node in model.graph.node:  # a Cast says its output type even where shape inference recorded nothing
        if node.op_type == "Cast":
            to = next((a.i for a in node.attribute if a.name == "to"), None)
            types.setdefault(node.output[0], to)
    lowered: dict[str, int] = {}
    total: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type not in COUNTED_OPS:
            continue
        total[node.op_type] = total.get(node.op_type, 0) + 1
        if types.get(node.input[0]) == onnx.TensorProto.FLOAT16:
            lowered[node.op_type] = lowered.get(node.op_type, 0) + 1
    return census(lowered, total, "fp16")


def whole_graph_census(nodes: Iterable[tuple[str, str]], precision: str) -> dict:
    """Census of a graph a runtime computes wholly in `precision` (OpenVINO's bf16 inference hint)."""
    total: dict[str, int] = {}
    for _, op_type in nodes:
        counted = OPENVINO_OPS.get(op_type, op_type if op_type in COUNTED_OPS else None)
        if counted:
            total[counted] = total.get(counted, 0) + 1
    return census(total, total, precision)


def _reaches(node, wanted: Callable, through: set[str]) -> bool:
    """Whether `node` or an input chain through `through` ops (every input of a Concat, the first otherwise)
    reaches a node for which `wanted(node)` holds."""
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if wanted(current):
            return True
        kind = current.get_type_name()
        if kind in through:
            inputs = range(current.get_input_size()) if kind in ("Concat", "Subtract", "Multiply") else (0,)
            stack.extend(current.input_value(i).get_node() for i in inputs)
    return False


def _is_fake_quantize(node) -> bool:
    return node.get_type_name() == "FakeQuantize"


def _is_int8_constant(node) -> bool:
    import openvino as ov

    return node.get_type_name() == "Constant" and node.get_element_type() in (ov.Type.i8, ov.Type.u8, ov.Type.i4, ov.Type.u4)


def openvino_int8_ops(model) -> tuple[list[str], list[str]]:
    """(INT8 ops, float ops) among an ov.Model's counted ops, by friendly name: an op runs in INT8 when its
    activation input is fed by a FakeQuantize and its weights are quantized (an INT8 constant, or a
    FakeQuantize for a MatMul of two activations)."""
    int8, float_ops = [], []
    for op in model.get_ops():
        if op.get_type_name() not in OPENVINO_OPS:
            continue
        activation = op.input_value(0).get_node()
        weights = op.input_value(1).get_node()
        quantized = (_reaches(activation, _is_fake_quantize, _TRANSPARENT_OPS)
                     and (_reaches(weights, _is_int8_constant, _DEQUANTIZE_OPS)
                          or _reaches(weights, _is_fake_quantize, _TRANSPARENT_OPS | _DEQUANTIZE_OPS)))
        (int8 if quantized else float_ops).append(op.get_friendly_name())
    return int8, float_ops


def openvino_census(model) -> dict:
    """Census of an ov.Model after NNCF, counted as ONNX op types."""
    lowered: dict[str, int] = {}
    total: dict[str, int] = {}
    int8, _ = openvino_int8_ops(model)
    int8_names = set(int8)
    for op in model.get_ops():
        counted = OPENVINO_OPS.get(op.get_type_name())
        if counted is None:
            continue
        total[counted] = total.get(counted, 0) + 1
        if op.get_friendly_name() in int8_names:
            lowered[counted] = lowered.get(counted, 0) + 1
    return census(lowered, total, "int8")


# ------------------------------------------------------------------------------------------ the gain


def measure_speedup(parent_call: Callable[[], object], candidate_call: Callable[[], object], runs: int) -> dict:
    """Median ms of the parent and the candidate, timed alternated in this process (one warm-up each), and
    their ratio."""
    from evsam_export.bench.timing import alternate_calls, latency_summary

    times = alternate_calls({"parent": parent_call, "candidate": candidate_call}, runs, warmup=1)
    parent_ms = latency_summary(times["parent"])["median"]
    candidate_ms = latency_summary(times["candidate"])["median"]
    return {"parent_ms": round(parent_ms, 1), "candidate_ms": round(candidate_ms, 1),
            "speedup": round(parent_ms / max(candidate_ms, 1e-9), 3), "runs": runs}


def gain_verdict(counted: dict, gate_passed: bool, timing: dict | None, min_speedup: float,
                 carriers: list[dict] | None = None) -> str:
    """'' when a gated lower-precision build earned its name, else the one line that says why not. `carriers`
    (a ranked search that found no passing candidate): the regions that carry the error, with their effect."""
    label = PRECISION_LABEL.get(counted["precision"], counted["precision"])
    if not counted["lowered"]:
        return f"no {label} layer passed the gate; the artifact is the fp32 parent"
    if not gate_passed:
        if carriers:
            named = ", ".join(f"{c['region']} ({c['alone_snr_db']} dB alone)" for c in carriers)
            return f"no {label} candidate passed the gate; the artifact is the fp32 parent; the error is carried by {named}"
        return ""  # a failed gate is reported by the gate itself (and the release gate decides)
    if timing is not None and timing["speedup"] < min_speedup:
        return (f"{census_text(counted)} is only {timing['speedup']:.2f}x its fp32 parent ({timing['candidate_ms']:.0f} vs "
                f"{timing['parent_ms']:.0f} ms, needs {min_speedup:g}x); the artifact is the fp32 parent")
    return ""


def lowering_fact(precision: str, line: str, counted: dict, timing: dict | None, candidate_facts: dict) -> dict:
    """`facts["lowering"]` of a parent handed back instead of a candidate that gained nothing: the line, the
    candidate's census, timing and fallback rounds (what was tried)."""
    return {"asked": precision, "shipped": "fp32", "line": line, "candidate": counted, "timing": timing,
            "gate_passed": candidate_facts.get("gate_passed"), "fallback": candidate_facts.get("fallback"),
            "error_carriers": candidate_facts.get("error_carriers")}


def declined(artifact) -> str:
    """The one line of a parent handed back by a lower-precision step ('' for any other artifact)."""
    lowering = (artifact.facts or {}).get("lowering")
    return lowering.get("line", "") if isinstance(lowering, dict) else ""


def settle(ctx, parent, artifact, min_speedup: float, timer: Callable[[], dict] | None, fallback_artifact=None):
    """The artifact a gated lower-precision step ships: `artifact` when it earned its name, else
    `fallback_artifact()` (the fp32 parent by default) carrying `facts["lowering"]`, with the candidate's files
    removed so no fp32 graph is left under a lower-precision name. `timer()` times the candidate against the
    parent (`measure_speedup`); it runs only for a candidate that passed its gate with layers left lowered."""
    from dataclasses import replace

    facts = dict(artifact.facts)
    counted = facts["lowered"]
    timing = None
    if counted["lowered"] and facts.get("gate_passed") and min_speedup > 0 and timer is not None:
        label = PRECISION_LABEL.get(counted["precision"], counted["precision"])
        with ctx.reporter.step(f"{parent.component}: {label} candidate vs its fp32 parent, alternated timing"):
            timing = timer()
        facts["speedup_over_parent"] = timing
    line = gain_verdict(counted, bool(facts.get("gate_passed")), timing, min_speedup, facts.get("error_carriers"))
    if not line:
        return replace(artifact, facts=facts)
    for relative in [artifact.path, *artifact.extra_files]:
        if relative != parent.path:
            (ctx.folder / relative).unlink(missing_ok=True)
    shipped = fallback_artifact() if fallback_artifact is not None else parent
    ctx.reporter.line(f"  {parent.component}: {line}")
    lowering = lowering_fact(counted["precision"], line, counted, timing, facts)
    return replace(shipped, facts={**shipped.facts, "lowering": lowering})

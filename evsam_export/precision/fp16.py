"""fp16 ONNX with fp32 islands: `encoder.fp16.onnx` / `decoder.fp16.onnx` (target "onnx", precision "fp16").

Precision lives in the graph: the fp32 ONNX is converted by ONNX Runtime's
`onnxruntime.transformers.float16.convert_float_to_float16`, which handles our raw TorchScript graphs
(onnxconverter_common fails to load on them unless onnxsim removed the no-op Casts first), with

* `keep_io_types=True`, always: inputs and outputs stay float32, so the IO contract in the manifest is the
  parent's (Olive's silent fp16 IO is a lesson, not a default);
* an explicit block list, by op type and by region (evsam_export.export.regions), of everything that
  must compute in fp32 (the "islands", each commented below);
* a structural check afterwards, `fp32_islands`, that every fragile node still reads and writes float32
  (no fp16 tensor crosses into an island), plus an ORT CPU load and a finite-output check;
* optionally (the default) the calibration-gate parity suite on the candidate, and automatic fallback
  that keeps further groups at fp32 until it passes (evsam_export.steps.fallback).

Caveat, measured: ORT's CPU EP has few fp16 kernels and runs most fp16 nodes through casts to fp32 that
it inserts at session start (L0 encoder.fp16.onnx: 19 Casts in the file, 133 in the session graph, ORT
1.32), so a CPU parity run sees fp16 *storage* rounding but not fp16 accumulation or overflow inside an
op. The islands are what protects GPU runtimes (CUDA EP, TensorRT strongly typed); CPU parity is
necessary, not sufficient.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from evsam_export.errors import ExportError
from evsam_export.export import regions
from evsam_export.manifest import Artifact
from evsam_export.precision import lowered
from evsam_export.steps.fallback import FallbackGroup, build_with_fallback, graph_nodes, nodes_matching
from evsam_export.steps.settings import PrecisionSettings
from evsam_export.steps.step import StepContext, artifact_filename

# Op types that always compute in fp32, in every component.
FP32_OP_TYPES = (
    "Softmax",  # decoder attention: exp() saturates fp16 past 11.1 and small weights vanish; extreme outliers
    "LayerNormalization",  # decoder transformer norms: fp16 LayerNorm overflows (maintainers, efficientvit#142)
    "ReduceMean",  # hand-written LayerNorm2d (encoder /norm/, decoder mask_downscaling.1/.4, output_upscaling.1):
    "Sqrt",  # mean of squares overflows fp16 once |x| > 256, and its Sqrt/Pow follow it
    "Pow",
    "Resize",  # decoder mask upscaling; the encoder's bicubic neck upsample when exported without graph passes
    "Sin",  # decoder random-Fourier prompt encoding: fp16's 11 bits put a phase of ~10-20 rad off by up to ~1e-2 rad
    "Cos",
)

# Regions (evsam_export.export.regions) of the islands that op types cannot express. LiteMLA's qkv /
# aggregation / proj convs and the decoder's q/k/v/out projections are ordinary layers and stay fp16.
FP32_REGIONS = (
    "litemla-core",  # upstream runs it under autocast(enabled=False); its 1e-15 eps underflows to 0 in fp16
    "neck-upsample",  # upstream runs the bicubic upsample with autocast off
    "encoder-norm",  # the maintainers' "force the LayerNorm layers to FP32" (efficientvit#142)
    "decoder-attention-products",
    "decoder-attention-softmax",
    "decoder-upscaling-norm",
    "decoder-mask-downscaling-norms",
)

# Fallback order when the gate fails, most sensitive first (cumulative: round k keeps groups 1..k at fp32).
FALLBACK_GROUPS = (
    FallbackGroup(("decoder-attention",), "SAM decoder activations have extreme outliers"),
    FallbackGroup(("decoder-output-upscaling", "decoder-hypernetworks", "decoder-iou-head", "decoder-top-level"),
                  "they make the mask logits directly"),
    FallbackGroup(("litemla",), "LiteMLA convs feed the linear attention, whose sums amplify error"),
    FallbackGroup(("neck",), "the neck feeds the embedding directly: no later layer averages its error out"),
    FallbackGroup(("decoder-transformer",), "the rest of the two-way transformer (MLPs, norms' neighbours)"),
    FallbackGroup(("last-stage",), "the widest channels and the largest activations of the backbone"),
)


@dataclass(frozen=True)
class Settings(PrecisionSettings):
    # Op types kept fp32 everywhere (see FP32_OP_TYPES for why each is there).
    op_block_list: tuple[str, ...] = FP32_OP_TYPES
    # Regions kept fp32 (see FP32_REGIONS); each must match nodes of the graphs of its component.
    fp32_regions: tuple[str, ...] = FP32_REGIONS
    # Extra node-name regexes kept fp32 (searched in ONNX node names), for experiments outside the table.
    fp32_patterns: tuple[str, ...] = ()
    # The default lets every fallback group be tried.
    max_rounds: int = len(FALLBACK_GROUPS) + 1

    def check(self) -> None:
        super().check()
        regions.check_region_names("fp32_regions", self.fp32_regions)
        regions.check_patterns("fp32_patterns", self.fp32_patterns)


# ------------------------------------------------------------------------------------------ checks


def _tensor_types(model) -> dict[str, int]:
    """elem_type of every tensor in the graph, after ONNX shape inference."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {init.name: init.data_type for init in graph.initializer}
    for info in list(graph.input) + list(graph.value_info) + list(graph.output):
        if info.type.HasField("tensor_type"):
            types[info.name] = info.type.tensor_type.elem_type
    for node in graph.node:  # Constant outputs are not always in value_info
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = attr.t.data_type
    return types


def fp32_islands(model, op_types=FP32_OP_TYPES, region_names=FP32_REGIONS, patterns=(), strict: bool = True) -> dict:
    """Which fragile nodes (op type in `op_types`, in one of the named regions, or name matching `patterns`)
    really compute in fp32.

    A fragile node is an island node when every float tensor it reads or writes is float32 *and* no input
    arrives through an fp32 -> fp16 -> fp32 Cast round trip (a value that was rounded to fp16 on the way;
    see remove_cast_round_trips). Casts are the islands' boundaries and are not judged themselves.
    Raises ExportError when `strict` and any fragile node leaked."""
    from onnx import TensorProto

    types = _tensor_types(model)
    producer = {out: node for node in model.graph.node for out in node.output}

    def cast_to(node) -> int | None:
        if node is None or node.op_type != "Cast":
            return None
        return next((a.i for a in node.attribute if a.name == "to"), None)

    def round_trip(tensor: str) -> bool:
        cast = producer.get(tensor)
        return cast_to(cast) == TensorProto.FLOAT and cast_to(producer.get(cast.input[0])) == TensorProto.FLOAT16

    nodes = [(n.name, n.op_type) for n in model.graph.node]
    chosen = regions.select([regions.region(name) for name in region_names], nodes)
    names = set(chosen) | set(nodes_matching(nodes, patterns, op_types))
    islands, leaks, by_op = [], [], {}
    for node in model.graph.node:
        if node.name not in names or node.op_type in ("Constant", "Cast"):
            continue
        tensors = [t for t in list(node.input) + list(node.output) if t]
        half = [t for t in tensors if types.get(t) == TensorProto.FLOAT16]
        trips = [t for t in node.input if t and round_trip(t)]
        if half or trips:
            leaks.append({"node": node.name, "fp16_tensors": half[:2], "fp16_round_trips": trips[:2]})
        else:
            islands.append(node.name)
            by_op[node.op_type] = by_op.get(node.op_type, 0) + 1
    report = {
        "fragile_nodes": len(islands) + len(leaks),
        "fp32_nodes": len(islands),
        "fp32_by_op_type": dict(sorted(by_op.items())),
        "leaked": leaks,
        "casts": sum(1 for n in model.graph.node if n.op_type == "Cast"),
        "fp16_initializers": sum(1 for i in model.graph.initializer if i.data_type == TensorProto.FLOAT16),
    }
    if strict and leaks:
        raise ExportError(f"{len(leaks)} fp32 island node(s) leak fp16 after conversion, first: {leaks[0]}")
    return report


def io_types(model) -> dict[str, str]:
    """Graph input/output name -> ONNX element type name (FLOAT, FLOAT16, ...)."""
    from onnx import TensorProto

    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    return {vi.name: TensorProto.DataType.Name(vi.type.tensor_type.elem_type)
            for vi in list(graph.input) + list(graph.output) if vi.name not in initializers}


def smoke_feeds(artifact: Artifact, variant) -> dict[str, np.ndarray]:
    """One realistic feed for a quick run: a preprocessed synthetic scene for the encoder, a point prompt
    on Gaussian embeddings for the decoder (no encoder run needed)."""
    from evsam_export import contract
    from evsam_export.data.calibration import encoder_calibration_feeds

    if artifact.component == "encoder":
        return encoder_calibration_feeds(variant, 1, seed=0, photos=False)[0]
    rng = np.random.default_rng(0)
    return contract.decoder_feeds(
        artifact,
        image_embeddings=rng.standard_normal(contract.EMBEDDINGS_SHAPE).astype(np.float32),
        point_coords=np.array([[[400.0, 300.0], [0.0, 0.0]]], np.float32),
        point_labels=np.array([[contract.LABEL_FOREGROUND, contract.LABEL_PADDING]], np.float32),
        original_size=(480, 640),
    )


def run_compare(reference_path: Path, candidate_path: Path, feeds: dict[str, np.ndarray], threads: int | None) -> dict:
    """Load both graphs in ORT CPU, run one feed, return SNR per output and the non-finite count."""
    import onnxruntime as ort

    from evsam_export import metrics

    def session(path):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    ref, cand = session(reference_path), session(candidate_path)
    names = [o.name for o in ref.get_outputs()]
    expected = dict(zip(names, ref.run(names, feeds)))
    got = dict(zip(names, cand.run(names, feeds)))
    return {
        "snr_db": {n: round(metrics.snr_db(expected[n], got[n]), 2) for n in names},
        "nonfinite": int(sum(metrics.nonfinite_count(got[n]) for n in names)),
        "output_dtypes": {n: str(got[n].dtype) for n in names},
    }


# ------------------------------------------------------------------------------------------ build


def convert(model, op_block_list, node_block_list):
    """ORT's float16 conversion with our IO rule (inputs/outputs stay float32), then the island repair.

    Returns (model, number of fp32->fp16->fp32 round trips removed). ORT's own DEFAULT_OP_BLOCK_LIST (ops
    without fp16 kernels: TopK, Range, CumSum, Min/Max, ...) stays blocked too: passing a list replaces it."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    converted = convert_float_to_float16(
        model,
        keep_io_types=True,  # graph IO stays float32: the manifest's IO contract does not change
        op_block_list=sorted(set(op_block_list) | set(DEFAULT_OP_BLOCK_LIST)),
        node_block_list=list(node_block_list),
    )
    removed = remove_cast_round_trips(converted)
    topological_sort(converted)  # the converter appends its Casts at the end; ONNX requires node order
    return converted, removed


def topological_sort(model) -> None:
    """Reorder graph nodes so every input is produced before it is read (stable for sorted parts)."""
    graph = model.graph
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        progressed = []
        rest = []
        for node in pending:
            if all(name in ready for name in node.input):
                progressed.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if not progressed:
            raise ExportError(f"fp16 graph has a cycle or a dangling input at {rest[0].name} ({list(rest[0].input)})")
        ordered.extend(progressed)
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def remove_cast_round_trips(model) -> int:
    """Remove fp32 -> fp16 -> fp32 Cast pairs, so values flow between island nodes in fp32.

    ORT's converter (1.32) types every intermediate float tensor fp16: a blocked node gets a Cast to fp16
    after each output and every blocked consumer a Cast back to fp32. Between two island nodes (inside
    LiteMLA, the LayerNorm2d, into image_embeddings) the value is therefore rounded to fp16: measured, the
    LiteMLA eps constant 1e-15 went through fp16 (-> 0) and the (vk) MatMul output would saturate at
    65504, the very overflow the island exists to prevent. Each Cast-to-fp32 whose input is a Cast-to-fp16
    of an fp32 tensor is bypassed (consumers read the fp32 tensor; a graph output takes over the fp32
    tensor's name), and Casts left without consumers are dropped. Returns the number of pairs removed."""
    from onnx import TensorProto

    graph = model.graph
    outputs = {o.name for o in graph.output}

    def cast_to(node) -> int | None:
        if node.op_type != "Cast":
            return None
        return next((a.i for a in node.attribute if a.name == "to"), None)

    producer = {out: node for node in graph.node for out in node.output}
    fp32 = _tensor_types(model)
    removed = 0
    doomed = set()
    for node in list(graph.node):
        if cast_to(node) != TensorProto.FLOAT:
            continue
        half = producer.get(node.input[0])
        if half is None or cast_to(half) != TensorProto.FLOAT16 or fp32.get(half.input[0]) != TensorProto.FLOAT:
            continue
        source, target = half.input[0], node.output[0]
        if source in outputs:
            continue
        if target in outputs:  # the fp32 producer writes the graph output directly
            for other in graph.node:
                for i, name in enumerate(other.input):
                    if name == source:
                        other.input[i] = target
                for i, name in enumerate(other.output):
                    if name == source:
                        other.output[i] = target
        else:
            for other in graph.node:
                for i, name in enumerate(other.input):
                    if name == target:
                        other.input[i] = source
        doomed.add(id(node))
        removed += 1
    kept = [n for n in graph.node if id(n) not in doomed]
    # Casts to fp16 whose output nobody reads any more
    while True:
        used = {name for n in kept for name in n.input} | outputs
        dead = {id(n) for n in kept if n.op_type == "Cast" and not any(o in used for o in n.output)}
        if not dead:
            break
        kept = [n for n in kept if id(n) not in dead]
    del graph.node[:]
    graph.node.extend(kept)
    present = {name for n in graph.node for name in list(n.input) + list(n.output)}
    stale = [vi for vi in graph.value_info if vi.name not in present]
    for vi in stale:
        graph.value_info.remove(vi)
    return removed


def build(ctx: StepContext, parent: Artifact, settings: Settings) -> list[Artifact]:
    import onnx

    started = time.perf_counter()
    if parent.precision != "fp32" or not parent.path.endswith(".onnx"):
        raise ExportError(f"fp16 conversion needs an fp32 ONNX parent, got {parent.id}")
    source = onnx.load(str(ctx.path_of(parent)))
    nodes = graph_nodes(source)
    groups = FALLBACK_GROUPS if settings.fallback else ()
    base_names = regions.protected_nodes(nodes, parent.component, settings.fp32_regions, settings.fp32_patterns,
                                         [r for g in groups for r in g.regions], where="fp16")
    base_regions = [r.name for r in regions.regions_of(settings.fp32_regions, parent.component)]
    path = ctx.folder / artifact_filename(parent.component, "onnx", "fp16", "onnx")

    def candidate(kept: tuple[FallbackGroup, ...]) -> Artifact:
        extra = sorted({name for group in kept for name in group.select(nodes)})
        converted, round_trips = convert(source, settings.op_block_list, sorted(set(base_names) | set(extra)))
        kept_regions = base_regions + [r.name for g in kept for r in g.regions]
        islands = fp32_islands(converted, settings.op_block_list, kept_regions, settings.fp32_patterns)
        types = io_types(converted)
        if any(t != "FLOAT" for t in types.values()):
            raise ExportError(f"fp16 conversion changed graph IO types: {types}")
        onnx.save(converted, str(path))
        run = run_compare(ctx.path_of(parent), path, smoke_feeds(parent, ctx.variant), ctx.threads)
        if run["nonfinite"]:
            raise ExportError(f"{parent.component}.fp16: {run['nonfinite']} non-finite output values on ORT CPU")
        fp32_types = {}
        for name, op_type in nodes:
            if name in set(base_names) | set(extra) or op_type in settings.op_block_list:
                fp32_types[op_type] = fp32_types.get(op_type, 0) + 1
        facts = {
            "converter": "onnxruntime.transformers.float16",
            "keep_io_types": True,
            "io_types": types,
            "nodes": len(converted.graph.node),
            "parent_nodes": len(nodes),
            "kept_fp32": {
                "op_types": list(settings.op_block_list),
                "regions": kept_regions,
                "patterns": list(settings.fp32_patterns),
                "nodes_by_op_type": dict(sorted(fp32_types.items())),
                "nodes": sorted(set(base_names) | set(extra)),
            },
            "fp32_islands": islands,
            "cast_round_trips_removed": round_trips,
            "ort_cpu_check": run,
            "lowered": lowered.fp16_census(converted),  # what runs in fp16, for the summary line and the tables
        }
        return ctx.new_artifact(parent, path, target="onnx", precision="fp16", step="fp16",
                                settings=asdict(settings), facts=facts, started=started)

    if not settings.fallback:
        return [candidate(())]
    return [build_with_fallback(ctx, parent, candidate, settings.max_rounds, groups, nodes, suite=settings.gate_suite)]


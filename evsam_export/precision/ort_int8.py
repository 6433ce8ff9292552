"""Static QDQ INT8 ONNX: `encoder.ort.int8.onnx` (ONNX Runtime CPU) or `encoder.trt.int8.onnx` (symmetric
Q/DQ, the input of a TensorRT explicit-quantization build).

`onnxruntime.quantization.quantize_static` with QuantFormat.QDQ, per-channel weights and MinMax ranges
from `evsam_export.data.calibration` (real images through the shared preprocessing; for the decoder,
embeddings the fp32 encoder really produces). Precision lives in the graph: every quantized tensor is a
QuantizeLinear/DequantizeLinear pair that ORT (and TensorRT) fuse into int8 kernels at load time.

Why not `quantize_dynamic`: it rewrites every Conv into ConvInteger + DynamicQuantizeLinear, which ORT
has no fast kernels for: measured on L0 2.4x *slower* than fp32 with QInt8 weights, about equal with
QUInt8, while static per-channel QDQ measured 2.15x faster (ORT maintainers: "use
static quantization for CNN based models", microsoft/onnxruntime#12854). Dynamic quantization also
computes activation ranges at run time, so the graph would not say what it computes.

Why Conv only by default: quantizing every default op type (Conv *and* LiteMLA's MatMuls) measured an
embedding SNR of -3.8 dB (error larger than signal, box-mask IoU 0.62) for a 3.1x speed-up, while
Conv-only QDQ measured 12.6-12.7 dB and mask IoU 0.90-0.91 for 2.3x (L0, image-
dependent model); the encoder's only MatMuls are the linear-attention ones, which need fp32 range.

Decoder INT8 works (`decoder_calibration_feeds`), but default recipes keep the decoder fp32: SAM decoder
attention "exhibits extreme outliers" (optimum-intel keeps it fp32, Geti saw no gain).
With op_types_to_quantize = ["Conv"] only the three mask_downscaling convs would qualify, and they are
excluded (calibration feeds carry no mask input), so a decoder recipe should name ["Gemm", "MatMul"].

When the gate fails, the "rank" fallback (the default) ranks every block of quantized ops by the output noise
it causes quantized alone and bisects over how many of the worst to take back, stripping their Q/DQ pairs from
the once-quantized graph (`strip_qdq`); the "groups" fallback keeps INT8_GROUPS in fp32 one round at a time and
re-quantizes from the cached calibration ranges. Either way the calibration pass runs once per build.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from evsam_export.cache import cache_key, cache_root
from evsam_export.environment import cpu_flags
from evsam_export.errors import ExportError, RecipeError
from evsam_export.export import regions
from evsam_export.export.graph_passes import ORT_PASSES, check_pass_names
from evsam_export.files import replacing
from evsam_export.manifest import Artifact
from evsam_export.precision import lowered
from evsam_export.steps.fallback import FallbackGroup, build_with_fallback, graph_nodes
from evsam_export.steps.settings import PrecisionSettings, SettingValueError
from evsam_export.steps.step import StepContext, artifact_filename

# Regions (evsam_export.export.regions) never quantized, whatever op_types_to_quantize says.
FP32_REGIONS = (
    "litemla-core",  # its MatMuls need fp32 range (see the module docstring)
    "encoder-norm",  # normalises with a per-pixel variance; its output is the embedding
    "decoder-attention-products",  # extreme outliers
    "decoder-prompt-encoding",
    "decoder-mask-product",
    "decoder-mask-downscaling",
)

# Fallback order, most sensitive first (cumulative). The neck was measured the most sensitive part and its
# 1x1 convs carry that sensitivity at a fraction of the cost; its 3x3 convs are a quarter of the encoder's
# time, so they go back only after the cheap 1x1 groups (docs/precision.md "Measurements behind the defaults").
INT8_GROUPS = (
    FallbackGroup(("neck-pointwise",), "the neck's 1x1 convs carry most of its sensitivity at little fp32 cost"),
    FallbackGroup(("neck-inputs", "stem"), "four more cheap convs: the neck's input projections and the stem conv on "
                  "the raw image"),
    FallbackGroup(("neck",), "the rest of the neck (its 3x3 convs), a quarter of the encoder's time"),
    FallbackGroup(("last-stage",), "the last backbone stage (LiteMLA qkv/aggregation/proj and its MBConvs)"),
    FallbackGroup(("second-last-stage",), "the stage before it"),
    FallbackGroup(("early-stages",), "the fused-MBConv stages after the stem stage (the stem went back with "
                  "neck-inputs+stem)"),
    FallbackGroup(("decoder-output-upscaling", "decoder-hypernetworks", "decoder-iou-head"),
                  "output upscaling, hypernetwork MLPs and IoU head make the logits directly"),
    FallbackGroup(("decoder-attention",), "the q/k/v/out projections of the attention blocks"),
)


CALIBRATE_METHODS = ("minmax", "percentile", "entropy")


@dataclass(frozen=True)
class Settings(PrecisionSettings):
    # Op types to quantize. Conv only: see the module docstring for why not LiteMLA's MatMuls.
    op_types_to_quantize: tuple[str, ...] = ("Conv",)
    # Regions never quantized (see FP32_REGIONS); each must match nodes of the graphs of its component.
    fp32_regions: tuple[str, ...] = FP32_REGIONS
    # Extra node-name regexes never quantized (searched in ONNX node names), for experiments outside the table.
    fp32_patterns: tuple[str, ...] = ()
    # False: ORT CPU flavour, QUInt8 activations / QInt8 weights, target "ort" (encoder.ort.int8.onnx).
    # True: TensorRT flavour, QInt8/QInt8 with zero points 0 (ActivationSymmetric/WeightSymmetric), which
    # TensorRT requires ("x_zero_point must be zero"); target "trt" (encoder.trt.int8.onnx).
    symmetric: bool = False
    # Per-output-channel weight scales (ORT's static QDQ speed-up on CPU is measured with them).
    per_channel: bool = True
    # 7-bit weights, for CPUs without VNNI, where ORT's u8s8 kernels (VPMADDUBSW) add pairs of products into
    # saturating int16. "auto": on when the build CPU has no VNNI (AVX512-VNNI, AVX-VNNI, AMX), off with it
    # (resolve_reduce_range); an artifact built with VNNI must be gated again before it ships to a CPU without.
    reduce_range: bool | str = "auto"
    # How activation ranges are chosen: "minmax" (observed extremes), "percentile" (the `percentile`-th
    # percentile of |x|, clipping the rare GELU/residual outliers MinMax spends the 8 bits on), "entropy"
    # (KL divergence, TensorRT's classic choice). Percentile measured best (docs/precision.md "Measurements behind the defaults").
    calibrate_method: str = "percentile"
    # Percentile of |activation| kept by calibrate_method = "percentile".
    percentile: float = 99.99
    # Activation memory one calibration pass may hold, in GiB. ORT's calibrators keep every calibrated tensor
    # of every image of a pass until the pass ends, so the images go through in passes of the largest divisor
    # of calibration_images whose tensors fit (ORT's CalibStridedMinMax; histograms merge across passes).
    calibration_memory_gib: float = 8.0
    # Use the offline scikit-image photos (falls back to synthetic scenes when scikit-image is missing).
    calibration_photos: bool = True
    # Run onnxruntime's quant_pre_process (shape inference + constant folding) first: fewer QuantizeLinear
    # nodes and a slightly better SNR.
    preprocess: bool = True
    # ONNX Runtime graph passes applied to the fp32 graph before quantization (graph_passes.py). None: the
    # flavour's default, ORT_PASSES for "ort" and none for "trt" (TensorRT cannot run com.microsoft ops).
    graph_passes: tuple[str, ...] | None = None
    # The default tries every group: re-quantizing from cached ranges is cheap next to a gate run.
    max_rounds: int = len(INT8_GROUPS) + 1
    # "rank": quantize once, rank every block of quantized ops by the output noise it causes quantized alone on
    # this checkpoint, and bisect over how many of the worst to keep fp32 (fallback.build_with_ranking);
    # "groups": INT8_GROUPS back to fp32 one round at a time, in their fixed order.
    fallback_method: str = "rank"
    # A gated build ships only when its INT8 graph is at least this many times faster than the fp32 parent
    # (alternated timing on the build machine, `speedup_runs` runs each); else the fp32 parent is the
    # artifact and `run` exits 11. 0: no timing.
    min_speedup: float = lowered.MIN_SPEEDUP
    speedup_runs: int = 5

    def check(self) -> None:
        super().check()
        regions.check_region_names("fp32_regions", self.fp32_regions)
        regions.check_patterns("fp32_patterns", self.fp32_patterns)
        if self.graph_passes is not None:
            runtimes = ("portable",) if self.symmetric else ("portable", "onnxruntime")
            try:
                object.__setattr__(self, "graph_passes", check_pass_names(self.graph_passes, runtimes))
            except RecipeError as exc:
                raise SettingValueError("graph_passes", exc.message, hint=exc.hint) from exc
        self.require_one_of("calibrate_method", CALIBRATE_METHODS)
        self.require_one_of("reduce_range", (True, False, "auto"))
        self.require_one_of("fallback_method", ("rank", "groups"))
        self.require_at_least("min_speedup", 0.0)
        self.require_at_least("speedup_runs", 1)
        self.require_between("percentile", 90.0, 100.0)
        if self.calibration_memory_gib <= 0:
            raise SettingValueError("calibration_memory_gib", f"{self.calibration_memory_gib!r} must be > 0")

    @property
    def target(self) -> str:
        return "trt" if self.symmetric else "ort"

    @property
    def passes(self) -> tuple[str, ...]:
        if self.graph_passes is not None:
            return self.graph_passes
        return () if self.symmetric else ORT_PASSES


_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def resolve_reduce_range(setting: bool | str, flags: list[str]) -> tuple[bool, str]:
    """(reduce_range, why) for the setting on a CPU with `flags` (manifest.cpu_flags)."""
    if setting != "auto":
        return bool(setting), "set explicitly"
    vnni = [flag for flag in _VNNI_FLAGS if flag in flags]
    if vnni:
        return False, f"build CPU has {vnni[0]}: u8s8 dot products accumulate in int32 and do not saturate"
    return True, ("build CPU has no VNNI: ORT's u8s8 kernels add product pairs in saturating int16, so weights "
                  "keep 7 bits (onnxruntime quantization docs, reduce_range)")


# ------------------------------------------------------------------------------------------ structure


def qdq_structure(model) -> dict:
    """QDQ counts and which Conv/ConvTranspose/Gemm/MatMul nodes are quantized: a Conv/Gemm whose weight
    (input 1) comes from a DequantizeLinear, a MatMul whose two inputs both do. (A node kept fp32 may
    still read a dequantized activation that another, quantized consumer shares.)"""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1

    def dequantized(name: str) -> bool:
        source = producer.get(name)
        return source is not None and source.op_type == "DequantizeLinear"

    quantized: dict[str, list[str]] = {}
    float_ops: dict[str, list[str]] = {}
    for node in graph.node:
        if node.op_type not in ("Conv", "MatMul", "Gemm", "ConvTranspose"):
            continue
        is_q = all(dequantized(n) for n in node.input[:2]) if node.op_type == "MatMul" else dequantized(node.input[1])
        (quantized if is_q else float_ops).setdefault(node.op_type, []).append(node.name)
    zero_points_nonzero = 0
    inits = {i.name: i for i in graph.initializer}
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2 and node.input[2] in inits:
            from onnx import numpy_helper

            if numpy_helper.to_array(inits[node.input[2]]).any():
                zero_points_nonzero += 1
    return {
        "quantize_linear": counts.get("QuantizeLinear", 0),
        "dequantize_linear": counts.get("DequantizeLinear", 0),
        "integer_ops": {op: counts[op] for op in ("ConvInteger", "MatMulInteger", "DynamicQuantizeLinear") if op in counts},
        "quantized": {op: len(names) for op, names in quantized.items()},
        "float": {op: len(names) for op, names in float_ops.items()},
        "float_nodes": {op: names for op, names in float_ops.items()},
        "nonzero_zero_points": zero_points_nonzero,
        "nodes": len(graph.node),
    }


def quantized_nodes(model) -> list[str]:
    """Names of the Conv/ConvTranspose/Gemm/MatMul nodes of a QDQ graph whose input 1 (the weights, a MatMul's
    second operand) is a DequantizeLinear output: what runs in INT8 and what a fallback can take back. (Other
    readers of a dequantized activation, a residual Add, only share the pair quantize_static made for these.)"""
    dequantized = {output for node in model.graph.node if node.op_type == "DequantizeLinear" for output in node.output}
    return [node.name for node in model.graph.node
            if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and node.input[1] in dequantized]


@contextlib.contextmanager
def _working_directory(path: Path):
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


# ------------------------------------------------------------------------------------------ range cache


def ranges_cache_dir() -> Path:
    """Where MinMax calibration ranges are kept between builds ($EVSAM_CACHE_DIR/calibration-ranges)."""
    return cache_root("calibration-ranges")


def calibrated_bytes_per_image(model, op_types: Sequence[str]) -> int:
    """Bytes of the tensors ORT's calibrator collects for one image (`model` is consumed: its weights'
    data is dropped): the float inputs and outputs of every `op_types` node that are not initializers (as
    ORT's select_tensors_to_calibrate picks them), sized with batch 1 by ORT's symbolic shape inference
    (ONNX's own loses LiteMLA's shapes after its Reshape; it is the fallback where symbolic inference fails,
    as on the decoder, and then a dimension without a static size counts as 1)."""
    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    floats = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2}
    for initializer in model.graph.initializer:  # inference needs their dims only (xl1: 760 MB less to copy)
        if initializer.data_type in floats and math.prod(initializer.dims) > 1024:
            for field in ("raw_data", "float_data", "int32_data"):
                initializer.ClearField(field)
    try:
        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception:  # ORT raises a bare Exception ("Incomplete symbolic shape inference")
        inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    infos = {vi.name: vi for vi in [*graph.value_info, *graph.output, *graph.input]}
    initializers = {init.name for init in graph.initializer}
    tensors = {name for node in graph.node if node.op_type in op_types
               for name in [*node.input, *node.output] if name and name not in initializers}
    total = 0
    for name in tensors:
        tensor_type = infos[name].type.tensor_type if name in infos else None
        if tensor_type is None or tensor_type.elem_type not in floats:
            continue
        elements = math.prod(max(dim.dim_value, 1) for dim in tensor_type.shape.dim)
        total += elements * floats[tensor_type.elem_type]
    return total


def calibration_pass_size(images: int, bytes_per_image: int, budget_bytes: float) -> int:
    """Images per calibration pass: the largest divisor of `images` (ORT's strided calibration needs equal
    passes) whose activations fit in `budget_bytes`; at least 1."""
    fitting = [size for size in range(1, images + 1) if images % size == 0 and size * bytes_per_image <= budget_bytes]
    return max(fitting, default=1)


def _ranges_key(parent: Artifact, settings: Settings, fingerprint: str, pass_size: int) -> str:
    """Everything the collected tensor ranges depend on, and nothing they do not (zero points, symmetry,
    per-channel weights and excluded nodes are applied after calibration, so the fallback rounds share one
    calibration pass; the ort/trt flavours share it when they run the same graph passes). Full 64 hex digits."""
    import onnxruntime

    payload = {
        "what": "ort-minmax-ranges-v1",
        "parent_sha256": parent.sha256,
        "preprocess": settings.preprocess,
        "graph_passes": list(settings.passes),  # tensor names and values of the calibrated graph
        "op_types_to_quantize": sorted(settings.op_types_to_quantize),
        "calibrate_method": settings.calibrate_method,
        **({"percentile": settings.percentile} if settings.calibrate_method == "percentile" else {}),
        "calibration_fingerprint": fingerprint,
        # Histograms merged across passes use the first pass's bin width: the pass size changes the ranges.
        "images_per_pass": pass_size,
        "onnxruntime": onnxruntime.__version__,
    }
    return cache_key(payload)


def _store_atomically(source: Path, target: Path) -> None:
    with replacing(target) as temporary:
        shutil.copyfile(source, temporary)


# ------------------------------------------------------------------------------------------ build


def _calibration_feeds(ctx: StepContext, parent: Artifact, settings: Settings) -> tuple[list[dict], dict]:
    from evsam_export.data import calibration as data

    count, seed, photos, folder = (settings.calibration_images, settings.calibration_seed, settings.calibration_photos,
                                   settings.calibration_data)
    described = data.describe_calibration(count, seed, photos, folder)
    data.warn_skipped(described, ctx.reporter)
    if parent.component == "encoder":
        return data.encoder_calibration_feeds(ctx.variant, count, seed, photos, folder), described
    from evsam_export.runners.ort_runner import OrtRunner

    encoder = next((a for a in ctx.manifest.artifacts if a.id == "encoder.onnx.fp32"), None)
    if encoder is None:
        raise ExportError("decoder INT8 calibration needs encoder.onnx.fp32 in the folder (its real embeddings)")
    with OrtRunner(ctx.path_of(encoder), encoder.inputs, encoder.outputs, threads=ctx.threads) as runner:
        feeds = data.decoder_calibration_feeds(runner, ctx.variant, count, seed, parent.inputs, photos=photos, folder=folder)
    described["prompt_kinds"] = list(data.DECODER_PROMPT_KINDS)
    described["embeddings_from"] = encoder.id
    return feeds, described


def build(ctx: StepContext, parent: Artifact, settings: Settings, source_copy: Path | None = None) -> list[Artifact]:
    """The INT8 artifact of `parent` (quantize_static, QDQ; the fallback per settings). source_copy: also save
    the fp32 graph the quantizer read (pre-processed, graph passes applied) there, for strip_qdq."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from evsam_export.data.calibration import as_ort_reader, calibration_fingerprint

    started = time.perf_counter()
    if parent.precision != "fp32" or not parent.path.endswith(".onnx"):
        raise ExportError(f"INT8 quantization needs an fp32 ONNX parent, got {parent.id}")
    path = ctx.folder / artifact_filename(parent.component, settings.target, "int8", "onnx")
    scratch = Path(tempfile.mkdtemp(prefix=".int8-", dir=ctx.folder)).resolve()
    try:
        source = ctx.path_of(parent).resolve()
        preprocess_note = None
        if settings.preprocess:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            with ctx.reporter.step(f"{parent.component}: quant_pre_process"), _working_directory(scratch):
                # (in scratch: on failure ORT's symbolic shape inference writes sym_shape_infer_temp.onnx
                # into the current directory)
                try:
                    quant_pre_process(str(source), str(scratch / "pre.onnx"))
                except Exception as exc:  # ORT raises a bare Exception; recorded in facts, not hidden
                    # The decoder's dynamic prompt axes defeat ORT's symbolic shape inference ("Incomplete
                    # symbolic shape inference"); ONNX shape inference + graph optimization still apply.
                    preprocess_note = f"symbolic shape inference skipped: {str(exc).splitlines()[0][:120]}"
                    quant_pre_process(str(source), str(scratch / "pre.onnx"), skip_symbolic_shape=True)
            source = scratch / "pre.onnx"
        pass_facts = {"passes": {}}
        if settings.passes:
            from evsam_export.export.graph_passes import apply_checked
            from evsam_export.export.onnx_export import artifact_spec

            # On the fp32 graph, where the equivalence check is meaningful (after QDQ, a 1e-6 change
            # can move a value across a quantization step).
            with ctx.reporter.step(f"{parent.component}: graph passes ({', '.join(settings.passes)})"):
                rewritten, pass_facts = apply_checked(onnx.load(str(source)), settings.passes, artifact_spec(parent))
            if any(pass_facts["passes"].values()):
                source = scratch / "passes.onnx"
                onnx.save(rewritten, str(source))
        if source_copy is not None:
            shutil.copyfile(source, source_copy)
        nodes = graph_nodes(source)
        groups = INT8_GROUPS if settings.fallback else ()
        excluded = regions.protected_nodes(nodes, parent.component, settings.fp32_regions, settings.fp32_patterns,
                                           [r for g in groups for r in g.regions], where="int8")
        # Fallback groups only matter through the nodes that could be quantized (a group with no Conv
        # left to un-quantize is skipped without a gate round).
        quantizable = [(name, op) for name, op in nodes if op in settings.op_types_to_quantize]
        with ctx.reporter.step(f"{parent.component}: calibration feeds ({settings.calibration_images} images)"):
            feeds, described = _calibration_feeds(ctx, parent, settings)
        fingerprint = calibration_fingerprint(feeds)
        bytes_per_image = calibrated_bytes_per_image(onnx.load(str(source)), settings.op_types_to_quantize)
        pass_size = calibration_pass_size(len(feeds), bytes_per_image, settings.calibration_memory_gib * 2**30)
        ranges_key = _ranges_key(parent, settings, fingerprint, pass_size)
        shared = ranges_cache_dir() / f"{ranges_key}.json"
        cache = scratch / "ranges.json"
        if shared.is_file():
            shutil.copyfile(shared, cache)
        ranges_reused = cache.exists()
        reduce_range, reduce_range_why = resolve_reduce_range(settings.reduce_range, cpu_flags())
        activation = QuantType.QInt8 if settings.symmetric else QuantType.QUInt8
        extra = {"ActivationSymmetric": True, "WeightSymmetric": True} if settings.symmetric else {}
        method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                  "entropy": CalibrationMethod.Entropy}[settings.calibrate_method]
        if settings.calibrate_method == "percentile":
            extra["CalibPercentile"] = settings.percentile
        if pass_size < len(feeds):
            extra["CalibStridedMinMax"] = pass_size  # (despite the name, strides every calibrator's collect_data)
        passes_note = f"{len(feeds)} feeds" + (f" in passes of {pass_size}" if pass_size < len(feeds) else "")

        def candidate(kept: tuple[FallbackGroup, ...]) -> Artifact:
            kept_nodes = sorted({n for g in kept for n in g.select(quantizable)})
            quantize(sorted(set(excluded) | set(kept_nodes)))
            return describe(kept_nodes)

        def quantize(exclude: list[str]) -> None:
            first = not cache.exists()
            step = f"{parent.component}: quantize_static" + (
                f" + {settings.calibrate_method} calibration ({passes_note})" if first else " (cached ranges)"
            )
            # ORT's histogram calibrators print progress with print(); our reporter says the same in one line.
            with ctx.reporter.step(step), contextlib.redirect_stdout(io.StringIO()):
                quantize_static(
                    str(source),
                    str(path),
                    as_ort_reader(feeds),
                    quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(settings.op_types_to_quantize),
                    per_channel=settings.per_channel,
                    reduce_range=reduce_range,
                    activation_type=activation,
                    weight_type=QuantType.QInt8,
                    nodes_to_exclude=exclude,
                    calibrate_method=method,
                    extra_options=dict(extra),
                    calibration_cache_path=str(cache),
                )

        def describe(kept_nodes: list[str], taken_back: str | None = None) -> Artifact:
            model = onnx.load(str(path))
            structure = qdq_structure(model)
            exclude = sorted(set(excluded) | set(kept_nodes))
            problems = []
            if structure["integer_ops"]:
                problems.append(f"integer ops {structure['integer_ops']} (dynamic-quantization form)")
            if not structure["quantize_linear"] and not kept_nodes:  # (a fallback round may take every op back)
                problems.append(f"nothing was quantized: no {list(settings.op_types_to_quantize)} node outside the exclusions"
                                + (' (the decoder has no eligible Conv; set op_types_to_quantize = ["Gemm", "MatMul"])'
                                   if parent.component == "decoder" else ""))
            if settings.symmetric and structure["nonzero_zero_points"]:
                problems.append(f"{structure['nonzero_zero_points']} non-zero zero points (TensorRT needs symmetric Q/DQ)")
            if problems:
                raise ExportError(f"{parent.component} INT8 graph is not a usable static QDQ graph: " + "; ".join(problems))
            facts = {
                "tool": "onnxruntime.quantization.quantize_static",
                "format": "QDQ",
                "activation_type": activation.name,
                "weight_type": "QInt8",
                "symmetric": settings.symmetric,
                "calibrate_method": settings.calibrate_method,
                "calibration": {**described, "feeds": len(feeds), "fingerprint": fingerprint,
                                "ranges_key": ranges_key, "ranges_reused": ranges_reused,
                                "images_per_pass": pass_size,
                                "calibrated_mib_per_image": round(bytes_per_image / 2**20, 1)},
                "preprocessed": settings.preprocess,
                "graph_passes": pass_facts,
                **({"preprocess_note": preprocess_note} if preprocess_note else {}),
                "op_types_to_quantize": list(settings.op_types_to_quantize),
                "excluded_nodes": exclude,
                "excluded_by_region": len(excluded),
                "kept_fp32_by_fallback": kept_nodes,
                **({"taken_back": taken_back} if taken_back else {}),
                "reduce_range": {"setting": settings.reduce_range, "resolved": reduce_range, "why": reduce_range_why},
                "qdq": {k: v for k, v in structure.items() if k != "float_nodes"},
                "lowered": lowered.qdq_census(structure),
                "float_nodes": structure["float_nodes"],
                "parent_nodes": len(nodes),
                "cpu_flags": cpu_flags(),
            }
            return ctx.new_artifact(parent, path, target=settings.target, precision="int8", step="int8",
                                    settings=asdict(settings), facts=facts, started=started)

        def timer() -> dict:
            from evsam_export.runners.ort_runner import OrtRunner

            # Against the fp32 graph the quantizer read (pre-processed, the same graph passes): the ratio is what
            # INT8 gains, not what the passes on the way gained (those ship with cpu-ort-fp32 too).
            feed = feeds[0]
            with OrtRunner(source, parent.inputs, parent.outputs, threads=ctx.threads) as fp32, \
                    OrtRunner(path, parent.inputs, parent.outputs, threads=ctx.threads) as int8:
                timing = lowered.measure_speedup(lambda: fp32.infer(feed), lambda: int8.infer(feed), settings.speedup_runs)
            return {**timing, "baseline": "the fp32 graph the quantizer read (pre-processed, same graph passes)"}

        timing = None if settings.symmetric else timer  # a TensorRT input's speed is the engine's, not ORT's on this CPU
        if not settings.fallback:
            artifacts = [candidate(())]
        elif settings.fallback_method == "rank":
            built = ranked_build(ctx, parent, settings, source, path, quantize, describe, excluded, feeds[0])
            artifacts = [lowered.settle(ctx, parent, built, settings.min_speedup, timing)]
        else:
            built = build_with_fallback(ctx, parent, candidate, settings.max_rounds, groups, quantizable, suite=settings.gate_suite)
            artifacts = [lowered.settle(ctx, parent, built, settings.min_speedup, timing)]
        if cache.is_file() and not shared.is_file():  # only ranges of a calibration that completed
            _store_atomically(cache, shared)
        return artifacts
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# ------------------------------------------------------------------------------------------ taking ops back


def ranked_build(ctx: StepContext, parent: Artifact, settings: Settings, source: Path, path: Path, quantize, describe,
                 excluded: list[str], feed: dict) -> Artifact:
    """The "rank" fallback: quantize once (base exclusions, cached ranges), rank every block of quantized ops by
    the output noise it causes quantized alone, and search how many of the worst to take back (strip_qdq),
    gating each candidate (fallback.build_with_ranking; the build suite's answer again on the release suite)."""
    import onnx

    from evsam_export.steps.fallback import build_with_ranking, rank_units

    quantize(sorted(excluded))
    full = onnx.load(str(path))
    fp32 = onnx.load(str(source))
    ops = quantized_nodes(full)

    def stripped(back) -> object:
        model = onnx.ModelProto()
        model.CopyFrom(full)
        strip_qdq(model, fp32, back)
        return model

    def ranking():
        reference = _run(fp32, feed, ctx.threads)
        return rank_units(ctx, f"{parent.component} INT8", ops, lambda only: _run(stripped(set(ops) - only), feed, ctx.threads),
                          reference)

    def candidate(kept: frozenset) -> Artifact:
        if not kept:
            onnx.save(full, str(path))
            return describe([])
        onnx.save(stripped(kept), str(path))
        return describe(sorted(kept), taken_back="Q/DQ pairs stripped from the once-quantized graph (no re-quantization)")

    target = ctx.load_suite(settings.gate_suite).tolerance("int8").embedding_snr_db_min + SNR_MARGIN_DB
    return build_with_ranking(ctx, parent, candidate, ranking, settings.max_rounds, target, suite=settings.gate_suite,
                              release_suite=ctx.suite)


# The ranking's additive noise model is an estimate: the first probe aims this far above the gate's SNR floor.
SNR_MARGIN_DB = 1.0


def _run(model, feed: dict, threads: int | None) -> dict:
    """The outputs of an in-memory ONNX model on one feed (ONNX Runtime, CPU)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {k: v for k, v in feed.items() if k in {i.name for i in session.get_inputs()}})))


def strip_qdq(model, source, names) -> list[str]:
    """Take the nodes `names` of a QDQ `model` back to fp32 in place, without re-quantizing: each gets the
    inputs it has in `source` (the fp32 graph quantize_static read; node names are kept), so a quantized
    activation is read before its QuantizeLinear and a weight or bias from its fp32 initializer again. Q/DQ
    nodes and initializers nothing reads any more are removed. Returns the names it found."""
    wanted = set(names)
    original = {node.name: node for node in source.graph.node if node.name in wanted}
    initializers = {init.name for init in model.graph.initializer}
    produced = {output for node in model.graph.node for output in node.output}
    quantized_before = set(quantized_nodes(model))
    source_initializers = {init.name: init for init in source.graph.initializer}
    done = []
    for node in model.graph.node:
        if node.name not in original:
            continue
        inputs = []
        for name in original[node.name].input:
            if name in source_initializers:
                # quantize_static names a weight's DequantizeLinear output after the weight: the fp32 copy
                # gets a name of its own
                own = f"{name}.fp32" if name in produced else name
                if own not in initializers:
                    tensor = model.graph.initializer.add()
                    tensor.CopyFrom(source_initializers[name])
                    tensor.name = own
                    initializers.add(own)
                name = own
            inputs.append(name)
        del node.input[:]
        node.input.extend(inputs)
        done.append(node.name)
    _unshare_pairs(model, quantized_before - set(done))
    _drop_unread(model)
    return done


def _unshare_pairs(model, still_quantized: set[str]) -> None:
    """quantize_static quantizes the activations a quantized node reads and the outputs it writes, and lets every
    reader of such a tensor read its DequantizeLinear output (a residual Add as well as the Conv). A Q/DQ pair
    that neither a still-quantized node reads nor one writes is taken out: its readers get the fp32 tensor back."""
    graph = model.graph
    producer = {output: node for node in graph.node for output in node.output}
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    for dq in list(graph.node):
        if dq.op_type != "DequantizeLinear":
            continue
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            continue  # a weight's DequantizeLinear: its initializer goes with its last reader
        source = producer.get(q.input[0])
        if source is not None and source.name in still_quantized:
            continue
        users = readers.get(dq.output[0], [])
        if any(user.name in still_quantized for user in users):
            continue
        for user in users:
            for index, name in enumerate(user.input):
                if name == dq.output[0]:
                    user.input[index] = q.input[0]


def _drop_unread(model) -> None:
    """Remove nodes none of whose outputs is read (by a node or as a graph output), then unread initializers."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    while True:
        read = {name for node in graph.node for name in node.input} | outputs
        dead = [i for i, node in enumerate(graph.node) if not any(o in read for o in node.output)]
        if not dead:
            break
        for index in reversed(dead):
            del graph.node[index]
    read = {name for node in graph.node for name in node.input}
    for index in reversed([i for i, init in enumerate(graph.initializer) if init.name not in read]):
        del graph.initializer[index]

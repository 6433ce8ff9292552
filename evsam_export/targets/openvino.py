"""OpenVINO target: IR from the fp32 ONNX (fp32 or fp16-compressed weights) and NNCF post-training INT8.

    build(ctx, parent, Settings(precision="int8"))  ->  [encoder.openvino.int8.xml (+ .bin)]

Three things decide whether an OpenVINO artifact is what its name says (RUNTIMES.md §3):
  * `ov.save_model` compresses weights to fp16 by default; an fp32 IR is saved with compress_to_fp16=False.
    Storage only: the CPU computes an fp16 IR in f32 ("inference precision no longer depends on the IR").
  * The CPU plugin silently computes in bf16 on AVX512_BF16/AMX CPUs when no INFERENCE_PRECISION_HINT is
    given. The runner always sets it; this step records the exact compile config the runner will use and the
    precision the compiled model reports on the build machine.
  * NNCF INT8 of this encoder needs an ignored scope: quantizing LiteMLA's linear attention gives an
    embedding SNR of -2.7 dB (§3.1). The scope below is explicit and commented, and when the parity gate
    refuses a candidate, `targets.fallback` widens it group by group (ordered below) and records each round.
"""

from __future__ import annotations

import re
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

from evsam_export.errors import ExportError, RecipeError
from evsam_export.manifest import Artifact, TensorSpec
from evsam_export.pipeline.step import StepContext, artifact_filename
from evsam_export.pipeline.fallback import FallbackGroup

PRECISIONS = ("fp32", "fp16", "int8")
PRESETS = ("mixed", "performance")
MODEL_TYPES = ("transformer", None)
OVERFLOW_FIXES = ("auto", "first_layer", "enable", "disable")
FALLBACK_METHODS = ("widen", "accuracy_control")

# LayerNorm nodes, by name (NNCF matches these regexes from the start of OpenVINO's friendly names, which keep
# the ONNX scoped names). The hand-written LayerNorm2d is ReduceMean/Sub/Sqrt/Div (ARCHITECTURE.md: it
# overflows fp16 and must stay fp32); nn.LayerNorm arrives as MVN + affine, whose affine Add keeps the name.
LAYERNORM_PATTERNS = (
    r".*/image_encoder/norm/.*",  # encoder: the LayerNorm2d that produces the embeddings
    r".*/norm(\d+|_final_attn)/.*",  # decoder: two-way transformer nn.LayerNorms (norm1..norm4, norm_final_attn)
    r".*/(mask_downscaling\.[14]|output_upscaling\.1)/.*",  # decoder: LayerNorm2d in mask in/out paths
)
# Op types kept out of INT8 in every round:
#   MatMul - the encoder's only MatMuls are LiteMLA's linear attention (v·kᵀ and (vk)·q, ratio of sums, meant
#            to run in fp32 upstream); in the decoder they are the attention products and the Gemm-converted
#            linear layers, which the note's recipe keeps fp32 ("decoder FP32", optimum-intel).
#   MVN    - OpenVINO turns ONNX LayerNormalization into MVN with generated names (MVN_312) that no name
#            pattern reaches; it is the normalisation core of the decoder's LayerNorms.
IGNORED_TYPES = ("MatMul", "MVN")

# Fallback groups, most sensitive first: round k keeps groups[:k] in fp32 on top of the base scope.
# Measured on L0 (synthetic:0 weights, 8 calibration images, MIXED + TRANSFORMER, embedding SNR vs ORT fp32 on
# a synthetic scene / the coffee photo; 2026-11, openvino 2026.4.1 + nncf 3.4.0):
#   base scope 3.4 / 4.8 dB; + litemla-qkv 25.4 / 18.0 dB; + neck 27.9 / 21.2; + last-stage (L0's stage 4)
#   28.7 / 21.3; + second-last-stage (stage 3) 30.5 / 21.5 (each later group on top of the earlier ones).
# With the build-time gate (calibration-gate suite, 16 calibration feeds) round 0 failed (embedding SNR 3.4 dB,
# end-to-end mask IoU 0.73-0.80) and round 1 (+ litemla-qkv) passed every INT8 gate.
ENCODER_GROUPS = (
    FallbackGroup(
        "litemla-qkv",
        "LiteMLA's q/k/v producers (qkv conv + multi-scale aggregation convs): their INT8 error is summed over "
        "all tokens in the linear attention; alone they took the embedding SNR from ~4 dB to 18-25 dB",
        patterns=(r"/context_module/main/(qkv|aggreg)",),
    ),
    FallbackGroup(
        "neck",
        "the fusion neck writes the embeddings directly (bicubic upsampling + convs): +0.5..4 dB",
        patterns=(r"/image_encoder/neck/",),
    ),
    FallbackGroup(
        "last-stage",
        "the rest of the last backbone stage (LiteMLA projections, local MBConvs, downsampling block) at 16x16 "
        "tokens on l (stage 4; xl: stage 5)",
        stages="-1",
    ),
    FallbackGroup(
        "second-last-stage",
        "the stage before it (l: stage-3 MBConvs at 32x32, the last group with a measurable gain; xl: the first "
        "attention stage)",
        stages="-2",
    ),
    FallbackGroup(
        "early-stages",
        "the MBConv stages between stage 0 and those two (l: 1-2, xl: 1-3), as ORT's encoder-early-stages: on l2 "
        "(synthetic weights) the four groups above still left boxes16 mask IoU p5 at 0.80 (session 4)",
        stages="1:-2",
    ),
    FallbackGroup(
        "stem",
        "the stem conv that reads the normalised image (ORT reverts it with encoder-neck-inputs-stem). Last, so "
        "the rounds measured on l0-l2 stand: xl1 (synthetic weights) failed all five groups above with only "
        "stage 0 left INT8 (boxes16 mask IoU p5 0.885; 3 FakeQuantize: the image input and the next block)",
        patterns=(r"backbone/stages\.0/op_list\.0/",),
    ),
)
# The decoder has little INT8 left after the base scope (its MatMuls are excluded): the mask_input convs and
# the output upscaling. One group only, so a fallback round can never leave an "int8" decoder without INT8.
DECODER_GROUPS = (
    FallbackGroup(
        "output-upscaling",
        "the transposed convs that make the mask features multiplied with the hypernetwork tokens",
        patterns=(r"/output_upscaling/",),
    ),
)
FALLBACK_GROUPS = {"encoder": ENCODER_GROUPS, "decoder": DECODER_GROUPS}

# Ops a value passes through without leaving its precision (OpenVINO's low-precision transformations move
# dequantization across them), so an FQ behind one of these still feeds the next op's input in INT8.
_TRANSPARENT_OPS = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Pad", "Slice", "StridedSlice", "VariadicSplit",
                    "Split", "Concat", "Gather", "Relu", "MaxPool"}
_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@dataclass(frozen=True)
class Settings:
    # Artifact precision: "fp32" (IR weights stored fp32), "fp16" (IR weights stored fp16, computed in f32 on
    # CPU: a storage format, RUNTIMES.md §3.1) or "int8" (NNCF PTQ: FakeQuantize IR).
    precision: str = "fp32"
    # Reshape the encoder to batch 1 before saving (latency builds; the manifest IO then says [1,...]).
    # False keeps the ONNX's dynamic batch. The decoder is never reshaped: its prompt axes are the API.
    static_batch: bool = False
    # INFERENCE_PRECISION_HINT the runner compiles this IR with. Must equal the runner's table
    # (runners/openvino_runner.PRECISION_HINTS: f32 for fp32/fp16/int8): without an explicit f32 the CPU
    # plugin runs bf16 on AVX512_BF16/AMX CPUs and an "fp32" artifact would not be fp32.
    inference_precision: str = "f32"
    # --- int8 only (NNCF 3.x nncf.quantize) ---
    # NNCF preset: "mixed" = symmetric weights, asymmetric activations (GELU outputs are not symmetric).
    preset: str = "mixed"
    # nncf.ModelType: "transformer" (87 vs 238 FakeQuantize on L0: no FQ inside GELU/Add chains, §3.2) or
    # None. Its SmoothQuant only touches MatMuls with weights, of which the encoder has none.
    model_type: str | None = "transformer"
    # Number of calibration samples built (evsam_export.calibration.data) and all handed to NNCF. Decoder:
    # images, each with a point and a box prompt (2 feeds per image).
    subset_size: int = 32
    # Seed of the calibration images (recorded with the feeds' fingerprint).
    calibration_seed: int = 0
    # Op types never quantized (see IGNORED_TYPES for why each is there).
    ignored_types: tuple[str, ...] = IGNORED_TYPES
    # Node-name regexes never quantized (LayerNorms, see LAYERNORM_PATTERNS).
    ignored_patterns: tuple[str, ...] = LAYERNORM_PATTERNS
    # NNCF FastBiasCorrection (True) or the slower full BiasCorrection (False).
    fast_bias_correction: bool = True
    # NNCF OverflowFix: "first_layer" (NNCF's default: 7-bit weights for the first convs, the AVX2/AVX-512
    # saturation fix), "enable" (all layers), "disable" (full 8-bit range). "auto": "disable" when the build
    # CPU has VNNI (no saturation), else "first_layer". An artifact shipped to a non-VNNI CPU must be gated
    # there (RUNTIMES.md §0.9).
    overflow_fix: str = "auto"
    # Gate each INT8 candidate (targets.fallback, calibration-gate suite) and fall back when it fails; a
    # candidate that never passes comes back with facts["gate_passed"] = False (never a silent downgrade).
    # L0 on 2 cores: ~1 min quantization + ~1-3 min gate per round. False: build once with the base scope;
    # the recipe's validate step is then the only gate.
    fallback: bool = True
    # "widen": put ENCODER_GROUPS / DECODER_GROUPS back to fp32 one round at a time; "accuracy_control":
    # one nncf.quantize_with_accuracy_control round whose validation_fn is mask IoU vs the fp32 ONNX.
    # Measured on L0 (8 feeds, 2 iterations): 7 min, 1 of 87 quantizers reverted, SNR 4.3 dB, gate failed;
    # "widen" passed in its second round, so it is the default.
    fallback_method: str = "widen"
    # At most this many gated rounds (round 0 = base scope); the default lets every encoder group be tried.
    fallback_max_rounds: int = len(ENCODER_GROUPS) + 1
    # accuracy_control: NNCF's limit on quantizer-reverting iterations (each one re-validates).
    accuracy_control_max_iterations: int = 8


def check_settings(settings: Settings, parent: Artifact) -> None:
    from evsam_export.runners.openvino_runner import PRECISION_HINTS

    def refuse(key: str, value, allowed) -> RecipeError:
        return RecipeError(f"[target.openvino] {key}: {value!r} is not one of {', '.join(map(str, allowed))}")

    for key, allowed in (("precision", PRECISIONS), ("preset", PRESETS), ("model_type", MODEL_TYPES),
                         ("overflow_fix", OVERFLOW_FIXES), ("fallback_method", FALLBACK_METHODS)):
        if getattr(settings, key) not in allowed:
            raise refuse(key, getattr(settings, key), allowed)
    expected = PRECISION_HINTS[settings.precision]
    if settings.inference_precision != expected:
        raise RecipeError(
            f"[target.openvino] inference_precision: {settings.inference_precision!r} but the OpenVINO runner "
            f"compiles {settings.precision} IRs with INFERENCE_PRECISION_HINT={expected!r}",
            hint="a different compute precision is a different artifact precision (e.g. bf16), not a hint",
        )
    if settings.subset_size < 1 or settings.fallback_max_rounds < 1 or settings.accuracy_control_max_iterations < 1:
        raise RecipeError("[target.openvino] subset_size, fallback_max_rounds and accuracy_control_max_iterations must be >= 1")
    if parent.target != "onnx" or parent.precision != "fp32":
        raise RecipeError(
            f"openvino builds from the fp32 ONNX, got {parent.id}",
            hint="precision lives in the OpenVINO step (fp16 IR, NNCF INT8), not in a prepared ONNX",
        )
    if parent.component not in FALLBACK_GROUPS:
        raise RecipeError(f"openvino: unknown component {parent.component!r}")


# ------------------------------------------------------------------------------------------ helpers


def resolve_overflow_fix(setting: str, flags: list[str]) -> tuple[str, str]:
    """(resolved value, why) for the OverflowFix setting on a CPU with `flags`."""
    if setting != "auto":
        return setting, "set explicitly"
    vnni = [flag for flag in _VNNI_FLAGS if flag in flags]
    if vnni:
        return "disable", f"build CPU has {vnni[0]}: INT8 dot products do not saturate; gate again on non-VNNI CPUs"
    return "first_layer", "build CPU has no VNNI: NNCF's saturation fix for the first convs (AVX2/AVX-512)"


def precision_name(value) -> str:
    """"f32" for ov.Type.f32 (whose str() is "<Type: 'float32'>"), strings unchanged."""
    return value.to_string() if hasattr(value, "to_string") else str(value)


def op_histogram(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for op in model.get_ops():
        counts[op.get_type_name()] = counts.get(op.get_type_name(), 0) + 1
    return dict(sorted(counts.items()))


def int8_fed_matmuls(model) -> list[str]:
    """MatMuls with a FakeQuantize on an input path (through precision-preserving ops): these would run in
    INT8. The ignored scope keeps this empty."""
    fed = []
    for op in model.get_ops():
        if op.get_type_name() != "MatMul":
            continue
        stack = [op.input_value(i).get_node() for i in range(op.get_input_size())]
        seen: set[int] = set()
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            kind = node.get_type_name()
            if kind == "FakeQuantize":
                fed.append(op.get_friendly_name())
                break
            if kind in _TRANSPARENT_OPS:
                inputs = range(node.get_input_size()) if kind == "Concat" else (0,)
                stack.extend(node.input_value(i).get_node() for i in inputs)
    return sorted(fed)


def model_nodes(model) -> list[tuple[str, str]]:
    """(friendly name, op type) of every op: what ignored-scope patterns and fallback groups match."""
    return [(op.get_friendly_name(), op.get_type_name()) for op in model.get_ops()]


@dataclass(frozen=True)
class Scope:
    """The ignored scope of one round: base types/patterns plus the fallback groups kept in fp32."""

    types: tuple[str, ...]
    patterns: tuple[str, ...]
    groups: tuple[str, ...] = ()
    names: tuple[str, ...] = ()  # exact friendly names: the kept fallback groups' nodes

    def nncf(self):
        import nncf

        # validate=False: one scope serves encoder and decoder, so some patterns match nothing in a graph
        # (the matched counts are recorded in the facts instead).
        return nncf.IgnoredScope(types=list(self.types), patterns=list(self.patterns), names=list(self.names),
                                 validate=False)

    def matched(self, nodes: list[tuple[str, str]]) -> int:
        compiled = [re.compile(p) for p in self.patterns]  # NNCF matches patterns with re.match
        names = set(self.names)
        return sum(1 for name, kind in nodes if kind in self.types or name in names or any(p.match(name) for p in compiled))

    def to_json(self, nodes: list[tuple[str, str]]) -> dict:
        return {"types": list(self.types), "patterns": list(self.patterns), "fallback_groups": list(self.groups),
                "names": len(self.names), "matched_nodes": self.matched(nodes)}


def round_scope(settings: Settings, kept: tuple[FallbackGroup, ...], nodes: list[tuple[str, str]]) -> Scope:
    """Base scope + the kept groups' nodes, by name. FallbackGroup.select is the one definition of a group
    (patterns, op types, stages by position); translating groups into NNCF patterns instead dropped the
    stage groups, which have none, so they changed nothing in sessions 3-4 (l1/l2 rounds 3-4 measured the
    same mask IoU to four digits)."""
    names = tuple(sorted({n for g in kept for n in g.select(nodes)}))
    return Scope(types=tuple(settings.ignored_types), patterns=tuple(settings.ignored_patterns),
                 groups=tuple(g.name for g in kept), names=names)


def _io_specs(parent: Artifact, static: bool) -> tuple[list[TensorSpec], list[TensorSpec]]:
    if not static:
        return list(parent.inputs), list(parent.outputs)
    fix = lambda spec: replace(spec, shape=(1,) + tuple(spec.shape[1:]))  # noqa: E731
    return [fix(s) for s in parent.inputs], [fix(s) for s in parent.outputs]


def read_parent(ctx: StepContext, parent: Artifact, settings: Settings):
    """The fp32 ONNX as an ov.Model (the frontend keeps the dynamic batch, RUNTIMES.md §3.1)."""
    import openvino as ov

    model = ov.Core().read_model(str(ctx.path_of(parent)))
    if settings.static_batch and parent.component == "encoder":
        model.reshape({spec.name: [1, *spec.shape[1:]] for spec in parent.inputs})
    return model


def calibration_feeds(ctx: StepContext, parent: Artifact, settings: Settings) -> list[dict]:
    """Shared calibration feeds (evsam_export.calibration.data). The decoder's embeddings are what the fp32
    ONNX encoder of this folder really produces (ONNX Runtime)."""
    from evsam_export.calibration.data import decoder_calibration_feeds, encoder_calibration_feeds

    if parent.component == "encoder":
        return encoder_calibration_feeds(ctx.variant, settings.subset_size, settings.calibration_seed)
    from evsam_export.runners.ort_runner import OrtRunner

    encoder = ctx.manifest.artifact("encoder.onnx.fp32")
    with OrtRunner(ctx.path_of(encoder), encoder.inputs, encoder.outputs, threads=ctx.threads) as runner:
        return decoder_calibration_feeds(runner, ctx.variant, settings.subset_size, settings.calibration_seed,
                                         decoder_inputs=parent.inputs)


@contextmanager
def quiet_nncf():
    """NNCF logs every ignored node at INFO on stdout; keep warnings only, for this call only."""
    import logging

    from nncf.common.logging import nncf_logger

    level = nncf_logger.level
    nncf_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        nncf_logger.setLevel(level)


def quantize_kwargs(settings: Settings, overflow_fix: str, feeds: int) -> dict:
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    fixes = {"first_layer": OverflowFix.FIRST_LAYER, "enable": OverflowFix.ENABLE, "disable": OverflowFix.DISABLE}
    return {
        "preset": {"mixed": nncf.QuantizationPreset.MIXED, "performance": nncf.QuantizationPreset.PERFORMANCE}[settings.preset],
        "model_type": nncf.ModelType.TRANSFORMER if settings.model_type == "transformer" else None,
        "subset_size": feeds,  # every feed built (the decoder has two per calibration image)
        "fast_bias_correction": settings.fast_bias_correction,
        "advanced_parameters": AdvancedQuantizationParameters(overflow_fix=fixes[overflow_fix]),
    }


# ------------------------------------------------------------------------------------------ writing


def write_ir(ctx: StepContext, parent: Artifact, model, settings: Settings, started: float, facts: dict) -> Artifact:
    """Save `model` as <component>.openvino.<precision>.xml/.bin and return its manifest entry."""
    import openvino as ov

    from evsam_export.runners.openvino_runner import OpenVINORunner

    xml = ctx.folder / artifact_filename(parent.component, "openvino", settings.precision, "xml")
    binary = xml.with_suffix(".bin")
    # fp16: weights stored as fp16 (half the file). fp32 and int8: weights stored exactly (the INT8 IR's
    # non-quantized islands are fp32 islands; its quantized weights are folded to int8 by the serializer).
    ov.save_model(model, str(xml), compress_to_fp16=settings.precision == "fp16")
    inputs, outputs = _io_specs(parent, settings.static_batch and parent.component == "encoder")
    runner = OpenVINORunner(xml, inputs, outputs, precision=settings.precision)
    saved = ov.Core().read_model(str(xml))
    with runner:
        actual = precision_name(runner.compiled.get_property("INFERENCE_PRECISION_HINT"))
    histogram = op_histogram(saved)
    facts = {
        "ir_bytes": {"xml": xml.stat().st_size, "bin": binary.stat().st_size},
        "op_types": histogram,
        "fake_quantize": histogram.get("FakeQuantize", 0),
        "compile_config": runner.compile_config(),  # what runners/openvino_runner.py compiles with (no threads)
        "compiled_inference_precision": actual,  # what the build machine's CPU plugin reported for it
        "weights_storage": "fp16" if settings.precision == "fp16" else "fp32 (int8 where quantized)" if settings.precision == "int8" else "fp32",
        "static_batch": bool(settings.static_batch and parent.component == "encoder"),
        "openvino_version": ov.get_version(),
        **facts,
    }
    if settings.static_batch and parent.component != "encoder":
        facts["static_batch_note"] = "decoder prompt axes stay dynamic; static_batch applies to the encoder"
    if settings.precision == "int8":
        facts["int8_fed_matmuls"] = int8_fed_matmuls(saved)
    recorded = asdict(settings)
    recorded["inference_precision"] = runner.compile_config()["INFERENCE_PRECISION_HINT"]
    return ctx.new_artifact(
        parent,
        xml,
        target="openvino",
        precision=settings.precision,
        step="openvino",
        settings=recorded,
        facts=facts,
        started=started,
        inputs=inputs,
        outputs=outputs,
        extra_files=[binary.relative_to(ctx.folder).as_posix()],
    )


# ------------------------------------------------------------------------------------------ build


def build(ctx: StepContext, parent: Artifact, settings: Settings) -> list[Artifact]:
    check_settings(settings, parent)
    started = time.perf_counter()
    try:
        import openvino  # noqa: F401
    except ImportError as exc:
        from evsam_export.errors import RuntimeUnavailable

        raise RuntimeUnavailable(f"openvino target needs openvino ({exc})", hint="pip install 'evsam-export[openvino]'") from exc
    with ctx.reporter.step(f"{parent.component}: ONNX -> OpenVINO IR"):
        model = read_parent(ctx, parent, settings)
    if settings.precision != "int8":
        return [write_ir(ctx, parent, model, settings, started, {})]
    return [build_int8(ctx, parent, model, settings, started)]


def build_int8(ctx: StepContext, parent: Artifact, model, settings: Settings, started: float) -> Artifact:
    try:
        import nncf
    except ImportError as exc:
        from evsam_export.errors import RuntimeUnavailable

        raise RuntimeUnavailable(f"openvino int8 needs nncf ({exc})", hint="pip install 'evsam-export[openvino]'") from exc

    from evsam_export.calibration.data import as_nncf_dataset, calibration_fingerprint, describe_calibration
    from evsam_export.manifest import cpu_flags
    from evsam_export.pipeline.fallback import build_with_fallback

    with ctx.reporter.step(f"{parent.component}: calibration feeds ({settings.subset_size})"):
        feeds = calibration_feeds(ctx, parent, settings)
    flags = cpu_flags()
    overflow_fix, overflow_why = resolve_overflow_fix(settings.overflow_fix, flags)
    nodes = model_nodes(model)
    common = {
        "calibration": {**describe_calibration(settings.subset_size, settings.calibration_seed),
                        "feeds": len(feeds), "fingerprint": calibration_fingerprint(feeds)},
        "overflow_fix": {"setting": settings.overflow_fix, "resolved": overflow_fix, "why": overflow_why},
        "cpu_flags": flags,
        "nncf_version": nncf.__version__,
    }
    dataset = as_nncf_dataset(feeds)

    def candidate(kept: tuple[FallbackGroup, ...]) -> Artifact:
        scope = round_scope(settings, kept, nodes)
        with ctx.reporter.step(f"{parent.component}: NNCF INT8 (fp32 groups: {', '.join(scope.groups) or 'base scope'})"), quiet_nncf():
            quantized = nncf.quantize(model.clone(), dataset, ignored_scope=scope.nncf(), **quantize_kwargs(settings, overflow_fix, len(feeds)))
        artifact = write_ir(ctx, parent, quantized, settings, started, {**common, "ignored_scope": scope.to_json(nodes)})
        require_int8(artifact)
        return artifact

    if not settings.fallback:
        artifact = candidate(())
        return replace(artifact, facts={**artifact.facts, "fallback": "disabled (not gated at build time)"})
    if settings.fallback_method == "accuracy_control":
        return build_with_fallback(
            ctx, parent, lambda kept: accuracy_controlled(ctx, parent, model, settings, feeds, overflow_fix, common, nodes, started),
            max_rounds=1,
        )
    return build_with_fallback(ctx, parent, candidate, max_rounds=settings.fallback_max_rounds,
                               groups=FALLBACK_GROUPS[parent.component], nodes=nodes)


# ------------------------------------------------------------------------------------------ accuracy control


def accuracy_controlled(ctx, parent, model, settings, feeds, overflow_fix, common, nodes, started) -> Artifact:
    """One nncf.quantize_with_accuracy_control round. The metric is the mean mask IoU (low-res logits > 0,
    all four tokens) against the fp32 ONNX pipeline on validation images disjoint from calibration, and
    max_drop is 1 - the suite's INT8 mask_iou_mean_min, so NNCF aims where the gate looks."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    from evsam_export.parity.suites import load_suite
    from evsam_export.pipeline.fallback import GATE_SUITE

    items, metric = validation_items(ctx, parent, settings)
    max_drop = round(1.0 - load_suite(GATE_SUITE).tolerance("int8").mask_iou_mean_min, 6)
    scope = round_scope(settings, (), nodes)
    kwargs = quantize_kwargs(settings, overflow_fix, len(feeds))
    with ctx.reporter.step(f"{parent.component}: NNCF INT8 with accuracy control (max_drop {max_drop:.3f})"), quiet_nncf():
        quantized = nncf.quantize_with_accuracy_control(
            model.clone(),
            nncf.Dataset(feeds),
            nncf.Dataset(items, lambda item: item["feed"]),
            metric,
            max_drop=max_drop,
            drop_type=nncf.DropType.ABSOLUTE,
            preset=kwargs["preset"],
            model_type=kwargs["model_type"],
            subset_size=kwargs["subset_size"],
            fast_bias_correction=settings.fast_bias_correction,
            ignored_scope=scope.nncf(),
            advanced_quantization_parameters=kwargs["advanced_parameters"],
            advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
                max_num_iterations=settings.accuracy_control_max_iterations),
        )
    facts = {**common, "ignored_scope": scope.to_json(nodes),
             "accuracy_control": {"metric": "mean low-res mask IoU vs fp32 ONNX", "max_drop": max_drop,
                                  "validation_items": len(items),
                                  "max_num_iterations": settings.accuracy_control_max_iterations}}
    artifact = write_ir(ctx, parent, quantized, settings, started, facts)
    require_int8(artifact)
    return artifact


def require_int8(artifact: Artifact) -> None:
    """An "int8" artifact without a single FakeQuantize would be fp32 under an INT8 name: refuse it."""
    if not artifact.facts.get("fake_quantize"):
        raise ExportError(
            f"{artifact.id}: NNCF left no FakeQuantize (ignored scope {artifact.facts['ignored_scope']['fallback_groups']})",
            hint="this graph has nothing INT8 left to run; ship the fp32/fp16 IR instead",
        )


def validation_items(ctx: StepContext, parent: Artifact, settings: Settings):
    """(items, validation_fn) for accuracy control: each item carries the candidate's feed and the fp32
    ONNX reference masks; validation_fn returns (mean IoU, per-item IoU)."""
    import numpy as np

    from evsam_export.calibration.data import decoder_calibration_feeds
    from evsam_export.parity import metrics
    from evsam_export.runners.ort_runner import OrtRunner

    encoder = ctx.manifest.artifact("encoder.onnx.fp32")
    decoder = ctx.manifest.artifact("decoder.onnx.fp32")
    count = max(2, settings.subset_size // 4)
    seed = settings.calibration_seed + 1  # other images than the calibration set
    enc = OrtRunner(ctx.path_of(encoder), encoder.inputs, encoder.outputs, threads=ctx.threads).load()
    dec = OrtRunner(ctx.path_of(decoder), decoder.inputs, decoder.outputs, threads=ctx.threads).load()
    images = []
    prompt_feeds = decoder_calibration_feeds(lambda image: images.append(image) or enc.infer({"input_image": image})["image_embeddings"],
                                             ctx.variant, count, seed, decoder_inputs=decoder.inputs)
    per_image = len(prompt_feeds) // len(images)
    items = []
    for index, image in enumerate(images):
        prompts = prompt_feeds[index * per_image:(index + 1) * per_image]
        if parent.component == "encoder":
            refs = [dec.infer(p)["low_res_masks"] for p in prompts]
            items.append({"feed": {"input_image": image}, "prompts": prompts, "refs": refs})
        else:
            items.extend({"feed": p, "refs": [dec.infer(p)["low_res_masks"]]} for p in prompts)

    def iou(ref, test) -> float:
        return float(np.mean(metrics.mask_iou(ref > 0, test > 0)))

    def validate(compiled, data) -> tuple[float, list[float]]:
        scores = []
        for item in data:
            out = compiled(item["feed"])
            if parent.component == "encoder":
                embeddings = np.asarray(out["image_embeddings"])
                tests = [dec.infer({**p, "image_embeddings": embeddings})["low_res_masks"] for p in item["prompts"]]
            else:
                tests = [np.asarray(out["low_res_masks"])]
            scores.append(float(np.mean([iou(r, t) for r, t in zip(item["refs"], tests)])))
        return float(np.mean(scores)), scores

    return items, validate


__all__ = ["Settings", "build", "ENCODER_GROUPS", "DECODER_GROUPS", "int8_fed_matmuls", "resolve_overflow_fix"]

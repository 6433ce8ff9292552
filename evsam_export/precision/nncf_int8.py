"""NNCF post-training INT8 of an OpenVINO model: the precision stage of the OpenVINO target.

    quantize(ctx, parent, model, settings, started, write_ir)  ->  encoder.openvino.int8.xml (+ .bin)

targets/openvino.py reads the fp32 ONNX into an ov.Model and saves IRs; this module decides what is
quantized. NNCF INT8 of this encoder needs an ignored scope: quantizing LiteMLA's linear attention wrecks
the embedding. The scope is built from op types and regions (evsam_export.export.regions). NNCF runs once
per build (`quantize_once`, cached by content); when the parity gate refuses a candidate, a round takes the
FakeQuantize nodes of the ops it reverts out of that model (`strip_quantizers`): which ops, the "rank" fallback
decides from a ranking measured on the checkpoint (evsam_export.steps.fallback.build_with_ranking), the
"widen" fallback from the group order below. Every round is recorded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from evsam_export.errors import ExportError, RecipeError, RuntimeUnavailable
from evsam_export.export import regions
from evsam_export.manifest import Artifact
from evsam_export.precision import lowered
from evsam_export.steps.fallback import FallbackGroup, build_with_fallback
from evsam_export.steps.settings import PrecisionSettings
from evsam_export.steps.step import StepContext

PRESETS = ("mixed", "performance")
MODEL_TYPES = ("transformer", None)
OVERFLOW_FIXES = ("auto", "first_layer", "enable", "disable")
FALLBACK_METHODS = ("rank", "widen", "accuracy_control")
# nncf RangeEstimatorParametersSet members for the activation quantizers (weights stay MINMAX).
ACTIVATION_RANGES = ("mean_minmax", "minmax", "mean_quantile", "mean_no_outliers_minmax", "median_minmax", "histogram")

# Regions kept out of INT8 in every round: the LayerNorms. The hand-written LayerNorm2d is
# ReduceMean/Sub/Sqrt/Div and must stay fp32; nn.LayerNorm arrives as MVN + affine, whose affine Add keeps
# the name.
FP32_REGIONS = ("encoder-norm", "decoder-transformer-norms", "decoder-mask-downscaling-norms", "decoder-upscaling-norm")
# Op types kept out of INT8 in every round:
#   MatMul - the encoder's only MatMuls are LiteMLA's linear attention (v·kᵀ and (vk)·q, ratio of sums, meant
#            to run in fp32 upstream); in the decoder they are the attention products and the Gemm-converted
#            linear layers, which stay fp32 ("decoder FP32", optimum-intel).
#   MVN    - OpenVINO turns ONNX LayerNormalization into MVN with generated names (MVN_312) that no region
#            reaches; it is the normalisation core of the decoder's LayerNorms.
IGNORED_TYPES = ("MatMul", "MVN")

# Fallback groups, most sensitive first: round k keeps groups[:k] in fp32 on top of the base scope (the
# measured gain of each is in docs/precision.md, "Measurements behind the defaults").
ENCODER_GROUPS = (
    FallbackGroup(("litemla-qkv",), "their INT8 error is summed over all tokens in the linear attention; alone they "
                  "lift the embedding SNR the most"),
    FallbackGroup(("neck",), "the fusion neck writes the embeddings directly (bicubic upsampling + convs)"),
    FallbackGroup(("last-stage",), "the rest of the last backbone stage (LiteMLA projections, local MBConvs, "
                  "downsampling block)"),
    FallbackGroup(("second-last-stage",), "the stage before it, the last group with a measurable gain on l0"),
    FallbackGroup(("early-stages",), "the MBConv stages between stage 0 and those two, as ORT's early-stages: l2 "
                  "still failed box prompts with the four groups above"),
    FallbackGroup(("stem",), "the stem conv that reads the normalised image; last, so the rounds measured on l0-l2 "
                  "stand: xl1 failed all five groups above with only stage 0 left INT8"),
)
# The decoder has little INT8 left after the base scope (its MatMuls are excluded): the mask_input convs and
# the output upscaling. One group only, so a fallback round can never leave an "int8" decoder without INT8.
DECODER_GROUPS = (
    FallbackGroup(("decoder-output-upscaling",), "the transposed convs that make the mask features multiplied "
                  "with the hypernetwork tokens"),
)
FALLBACK_GROUPS = {"encoder": ENCODER_GROUPS, "decoder": DECODER_GROUPS}

# Ops a value passes through without leaving its precision (OpenVINO's low-precision transformations move
# dequantization across them), so an FQ behind one of these still feeds the next op's input in INT8.
_TRANSPARENT_OPS = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Pad", "Slice", "StridedSlice", "VariadicSplit",
                    "Split", "Concat", "Gather", "Relu", "MaxPool"}
_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@dataclass(frozen=True)
class Settings(PrecisionSettings):
    """nncf.quantize settings (NNCF 3.x); the OpenVINO target's Settings extend them."""

    # Calibration images built (evsam_export.data.calibration) and all handed to NNCF. Decoder: each image
    # with a point and a box prompt (2 feeds per image).
    calibration_images: int = 32
    # NNCF preset: "mixed" = symmetric weights, asymmetric activations (GELU outputs are not symmetric).
    preset: str = "mixed"
    # nncf.ModelType: "transformer" (far fewer FakeQuantize: none inside GELU/Add chains) or None. Its
    # SmoothQuant only touches MatMuls with weights, of which the encoder has none.
    model_type: str | None = "transformer"
    # Op types never quantized (see IGNORED_TYPES for why each is there).
    ignored_types: tuple[str, ...] = IGNORED_TYPES
    # Regions never quantized (see FP32_REGIONS); each must match nodes of the graphs of its component.
    fp32_regions: tuple[str, ...] = FP32_REGIONS
    # Extra node-name regexes never quantized (searched in friendly names), for experiments outside the table.
    fp32_patterns: tuple[str, ...] = ()
    # Activation ranges over the calibration feeds: "mean_minmax" (NNCF's default: the mean of each feed's min and
    # max, clipping what only some images reach) or "minmax" (the extremes of all feeds, as ORT's MinMax), etc.
    activations_range: str = "mean_minmax"
    # NNCF FastBiasCorrection (True) or the slower full BiasCorrection (False).
    fast_bias_correction: bool = True
    # NNCF OverflowFix: "first_layer" (NNCF's default: 7-bit weights for the first convs, the AVX2/AVX-512
    # saturation fix), "enable" (all layers), "disable" (full 8-bit range). "auto": "disable" when the build
    # CPU has VNNI (no saturation), else "first_layer". An artifact shipped to a non-VNNI CPU must be gated
    # there.
    overflow_fix: str = "auto"
    # "rank": quantize once, rank every block of quantized ops by the output noise it causes quantized alone on
    # this checkpoint, and bisect over how many of the worst to take back (fallback.build_with_ranking);
    # "widen": put ENCODER_GROUPS / DECODER_GROUPS back to fp32 one round at a time (fallback_groups' order);
    # "accuracy_control": one nncf.quantize_with_accuracy_control round whose validation_fn is mask IoU vs the
    # fp32 ONNX (it recollects statistics; measured slower than widening, docs/precision.md).
    fallback_method: str = "rank"
    # The groups the rounds revert, in order: names of ENCODER_GROUPS / DECODER_GROUPS or regions joined by "+"
    # (reverted together), e.g. an order measured on your checkpoint with `evsam-export sensitivity --backend
    # openvino`. A component none of them belongs to keeps its table order; () = the tables' order.
    fallback_groups: tuple[str, ...] = ()
    # The default lets every encoder group be tried (round 0 = base scope).
    max_rounds: int = len(ENCODER_GROUPS) + 1
    # accuracy_control: NNCF's limit on quantizer-reverting iterations (each one re-validates).
    accuracy_control_max_iterations: int = 8
    # A gated build ships only when its INT8 IR is at least this many times faster than the fp32 parent compiled
    # by OpenVINO (alternated timing on the build machine, `speedup_runs` runs each); else the fp32 IR is the
    # artifact and `run` exits 11. 0: no timing.
    min_speedup: float = lowered.MIN_SPEEDUP
    speedup_runs: int = 5

    def check(self) -> None:
        super().check()
        for name, allowed in (("preset", PRESETS), ("model_type", MODEL_TYPES), ("overflow_fix", OVERFLOW_FIXES),
                              ("fallback_method", FALLBACK_METHODS), ("activations_range", ACTIVATION_RANGES)):
            self.require_one_of(name, allowed)
        self.require_at_least("accuracy_control_max_iterations", 1)
        self.require_at_least("min_speedup", 0.0)
        self.require_at_least("speedup_runs", 1)
        regions.check_region_names("fp32_regions", self.fp32_regions)
        regions.check_patterns("fp32_patterns", self.fp32_patterns)
        for name in self.fallback_groups:
            regions.check_region_names("fallback_groups", name.split("+"))
            if len({regions.region(part).component for part in name.split("+")}) > 1:
                from evsam_export.steps.settings import SettingValueError

                raise SettingValueError("fallback_groups", f"{name!r} mixes encoder and decoder regions",
                                        hint="a group reverts regions of one component")


def fallback_order(settings: Settings, component: str) -> tuple[FallbackGroup, ...]:
    """The groups the rounds of `component` revert, in order: the settings' fallback_groups of that component
    (a table group keeps its reason), else the component's table."""
    table = {g.name: g for g in FALLBACK_GROUPS[component]}
    named = [name for name in settings.fallback_groups if regions.region(name.split("+")[0]).component == component]
    if not named:
        return FALLBACK_GROUPS[component]
    return tuple(table.get(name) or FallbackGroup(tuple(name.split("+")), "placed here by the settings' fallback_groups "
                                                  "(a measured order)") for name in named)


def check_parent(parent: Artifact) -> None:
    """The checks that need the parent artifact (the settings' own values are checked when they are built)."""
    if parent.component not in FALLBACK_GROUPS:
        raise RecipeError(f"NNCF INT8: unknown component {parent.component!r}")


# ------------------------------------------------------------------------------------------ helpers


def resolve_overflow_fix(setting: str, flags: list[str]) -> tuple[str, str]:
    """(resolved value, why) for the OverflowFix setting on a CPU with `flags`."""
    if setting != "auto":
        return setting, "set explicitly"
    vnni = [flag for flag in _VNNI_FLAGS if flag in flags]
    if vnni:
        return "disable", f"build CPU has {vnni[0]}: INT8 dot products do not saturate; gate again on non-VNNI CPUs"
    return "first_layer", "build CPU has no VNNI: NNCF's saturation fix for the first convs (AVX2/AVX-512)"


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
    """(friendly name, op type) of every op: what regions and fallback groups select from."""
    return [(op.get_friendly_name(), op.get_type_name()) for op in model.get_ops()]


@dataclass(frozen=True)
class Scope:
    """The ignored scope of one round: op types, plus the nodes of the base regions and the kept groups."""

    types: tuple[str, ...]
    names: tuple[str, ...]  # exact friendly names: the base regions' and the kept fallback groups' nodes
    regions: tuple[str, ...] = ()  # the base regions (of this component)
    patterns: tuple[str, ...] = ()  # extra raw node-name regexes
    groups: tuple[str, ...] = ()

    def nncf(self):
        import nncf

        # validate=False: the names come from this very model, and one op type list serves both components.
        return nncf.IgnoredScope(types=list(self.types), names=list(self.names), validate=False)

    def matched(self, nodes: list[tuple[str, str]]) -> int:
        names = set(self.names)
        return sum(1 for name, kind in nodes if kind in self.types or name in names)

    def to_json(self, nodes: list[tuple[str, str]]) -> dict:
        return {"types": list(self.types), "regions": list(self.regions), "patterns": list(self.patterns),
                "fallback_groups": list(self.groups), "names": len(self.names), "matched_nodes": self.matched(nodes)}


def round_scope(settings: Settings, kept: tuple[FallbackGroup, ...], nodes: list[tuple[str, str]], component: str,
                base: list[str] | None = None) -> Scope:
    """Base scope + the kept groups' nodes, all by name: FallbackGroup.select is the one definition of a
    group (regions by pattern, op type or stage position), so a stage group reaches NNCF as surely as a
    pattern group. `base`: the base regions' nodes when already resolved (protected_nodes checks them)."""
    if base is None:
        base = regions.protected_nodes(nodes, component, settings.fp32_regions, settings.fp32_patterns, where="nncf")
    names = tuple(sorted(set(base) | {n for g in kept for n in g.select(nodes)}))
    base_regions = tuple(r.name for r in regions.regions_of(settings.fp32_regions, component))
    return Scope(types=tuple(settings.ignored_types), names=names, regions=base_regions,
                 patterns=tuple(settings.fp32_patterns), groups=tuple(g.name for g in kept))


def calibration_feeds(ctx: StepContext, parent: Artifact, settings: Settings) -> list[dict]:
    """Shared calibration feeds (evsam_export.data.calibration). The decoder's embeddings are what the fp32
    ONNX encoder of this folder really produces (ONNX Runtime)."""
    from evsam_export.data.calibration import decoder_calibration_feeds, encoder_calibration_feeds

    if parent.component == "encoder":
        return encoder_calibration_feeds(ctx.variant, settings.calibration_images, settings.calibration_seed,
                                         folder=settings.calibration_data)
    from evsam_export.runners.ort_runner import OrtRunner

    encoder = ctx.manifest.artifact("encoder.onnx.fp32")
    with OrtRunner(ctx.path_of(encoder), encoder.inputs, encoder.outputs, threads=ctx.threads) as runner:
        return decoder_calibration_feeds(runner, ctx.variant, settings.calibration_images, settings.calibration_seed,
                                         decoder_inputs=parent.inputs, folder=settings.calibration_data)


@contextmanager
def quiet_nncf():
    """NNCF logs every ignored node at INFO on stdout; keep warnings only, for this call only. Its progress bars
    go to stderr, the progress stream, so a command's stdout stays its result."""
    import logging
    import sys
    from contextlib import redirect_stdout

    from nncf.common.logging import nncf_logger

    level = nncf_logger.level
    nncf_logger.setLevel(logging.WARNING)
    try:
        with redirect_stdout(sys.stderr):
            yield
    finally:
        nncf_logger.setLevel(level)


def quantize_kwargs(settings: Settings, overflow_fix: str, feeds: int) -> dict:
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    fixes = {"first_layer": OverflowFix.FIRST_LAYER, "enable": OverflowFix.ENABLE, "disable": OverflowFix.DISABLE}
    return {
        "preset": {"mixed": nncf.QuantizationPreset.MIXED, "performance": nncf.QuantizationPreset.PERFORMANCE}[settings.preset],
        "model_type": nncf.ModelType.TRANSFORMER if settings.model_type == "transformer" else None,
        "subset_size": feeds,  # every feed built (the decoder has two per calibration image)
        "fast_bias_correction": settings.fast_bias_correction,
        "advanced_parameters": AdvancedQuantizationParameters(
            overflow_fix=fixes[overflow_fix],
            activations_range_estimator_params=getattr(RangeEstimatorParametersSet, settings.activations_range.upper())),
    }


# ------------------------------------------------------------------------------------------ build

# write_ir(ctx, parent, model, settings, started, facts) -> Artifact: the target's IR writer.
WriteIR = Callable[[StepContext, Artifact, object, Settings, float, dict], Artifact]


def quantize(ctx: StepContext, parent: Artifact, model, settings: Settings, started: float, write_ir: WriteIR) -> Artifact:
    """NNCF INT8 of `model` (the parent's fp32 ov.Model), gated with fallback unless settings.fallback is off."""
    try:
        import nncf
    except ImportError as exc:
        raise RuntimeUnavailable(f"openvino int8 needs nncf ({exc})", hint="pip install 'evsam-export[openvino]'") from exc

    from evsam_export.data.calibration import as_nncf_dataset, calibration_fingerprint, describe_calibration, warn_skipped
    from evsam_export.environment import cpu_flags

    check_parent(parent)
    nodes = model_nodes(model)
    groups = fallback_order(settings, parent.component) if settings.fallback and settings.fallback_method == "widen" else ()
    base = regions.protected_nodes(nodes, parent.component, settings.fp32_regions, settings.fp32_patterns,
                                   [r for g in groups for r in g.regions], where="nncf")
    with ctx.reporter.step(f"{parent.component}: calibration feeds ({settings.calibration_images})"):
        feeds = calibration_feeds(ctx, parent, settings)
    flags = cpu_flags()
    overflow_fix, overflow_why = resolve_overflow_fix(settings.overflow_fix, flags)
    described = describe_calibration(settings.calibration_images, settings.calibration_seed, folder=settings.calibration_data)
    warn_skipped(described, ctx.reporter)
    common = {
        "calibration": {**described, "feeds": len(feeds), "fingerprint": calibration_fingerprint(feeds)},
        "overflow_fix": {"setting": settings.overflow_fix, "resolved": overflow_fix, "why": overflow_why},
        "cpu_flags": flags,
        "nncf_version": nncf.__version__,
    }
    dataset = as_nncf_dataset(feeds)
    once: dict = {}

    def quantized_once():
        if not once:  # statistics collected once; every round takes quantizers out of this model
            once["model"], once["facts"] = quantize_once(ctx, parent, model, settings, dataset, len(feeds), overflow_fix,
                                                         round_scope(settings, (), nodes, parent.component, base),
                                                         common["calibration"]["fingerprint"])
            once["ops"] = quantized_ops(once["model"])
        return once["model"]

    def candidate(kept: tuple[FallbackGroup, ...]) -> Artifact:
        return build_round({n for g in kept for n in g.select(nodes)}, kept)

    def build_round(kept_names: set[str], kept: tuple[FallbackGroup, ...] = ()) -> Artifact:
        from openvino._offline_transformations import compress_quantize_weights_transformation

        scope = round_scope(settings, kept, nodes, parent.component, base)
        quantized = quantized_once().clone()
        taken = strip_quantizers(quantized, model, [n for n in once["ops"] if n in kept_names])
        compress_quantize_weights_transformation(quantized)
        facts = {**common, "ignored_scope": scope.to_json(nodes), "quantized_once": once["facts"],
                 "quantizers_taken_back": {"ops": len(taken), "of": len(once["ops"])}}
        artifact = write_ir(ctx, parent, quantized, settings, started, facts)
        if not settings.fallback:
            require_int8(artifact)
        return artifact

    if not settings.fallback:
        artifact = candidate(())
        return replace(artifact, facts={**artifact.facts, "fallback": "disabled (not gated at build time)"})
    if settings.fallback_method == "accuracy_control":
        def controlled(kept: tuple[FallbackGroup, ...]) -> Artifact:
            return accuracy_controlled(ctx, parent, model, settings, feeds, overflow_fix, common, nodes, base, started, write_ir)

        built = build_with_fallback(ctx, parent, controlled, max_rounds=1, suite=settings.gate_suite)
        return settle(ctx, parent, model, built, settings, started, write_ir, feeds[0])
    if settings.fallback_method == "rank":
        built = ranked(ctx, parent, model, settings, quantized_once, lambda: once["ops"], build_round, feeds[0])
        return settle(ctx, parent, model, built, settings, started, write_ir, feeds[0])
    built = build_with_fallback(ctx, parent, candidate, max_rounds=settings.max_rounds, groups=groups, nodes=nodes,
                                suite=settings.gate_suite)
    return settle(ctx, parent, model, built, settings, started, write_ir, feeds[0])


def ranked(ctx: StepContext, parent: Artifact, model, settings: Settings, quantized_once, ops_of, build_round, feed: dict) -> Artifact:
    """The "rank" fallback: every block of quantized ops ranked by the output noise it causes quantized alone,
    then a search over how many of the worst to take back (fallback.build_with_ranking)."""
    from evsam_export.runners.openvino_runner import openvino_core
    from evsam_export.steps.fallback import build_with_ranking, rank_units

    core = openvino_core()
    config = {"INFERENCE_PRECISION_HINT": "f32", **({"INFERENCE_NUM_THREADS": ctx.threads} if ctx.threads else {})}

    def run(candidate) -> dict:
        compiled = core.compile_model(candidate, "CPU", config)
        inputs = {port.get_any_name() for port in compiled.inputs}
        outputs = compiled({k: v for k, v in feed.items() if k in inputs})
        return {port.get_any_name(): outputs[port] for port in compiled.outputs}

    full = quantized_once()
    ops = ops_of()

    def only(names: set[str]) -> dict:
        candidate = full.clone()
        strip_quantizers(candidate, model, [n for n in ops if n not in names])
        return run(candidate)

    target = ctx.load_suite(settings.gate_suite).tolerance("int8").embedding_snr_db_min + SNR_MARGIN_DB
    def ranking():
        return rank_units(ctx, f"{parent.component} INT8", ops, only, run(model))

    return build_with_ranking(ctx, parent, lambda kept: build_round(set(kept)), ranking, settings.max_rounds,
                              target, suite=settings.gate_suite, release_suite=ctx.suite)


# The ranking's additive noise model is an estimate: the first probe aims this far above the gate's SNR floor.
SNR_MARGIN_DB = 1.0


def settle(ctx: StepContext, parent: Artifact, model, built: Artifact, settings: Settings, started: float, write_ir: WriteIR,
           feed: dict) -> Artifact:
    """`built` when it earned its INT8 name (lowered.settle), else the fp32 IR of the parent."""
    from evsam_export.runners.openvino_runner import OpenVINORunner

    def timer() -> dict:
        with OpenVINORunner(ctx.path_of(parent), parent.inputs, parent.outputs, precision="fp32", threads=ctx.threads) as fp32, \
                OpenVINORunner(ctx.path_of(built), built.inputs, built.outputs, precision="int8", threads=ctx.threads) as int8:
            return lowered.measure_speedup(lambda: fp32.infer(feed), lambda: int8.infer(feed), settings.speedup_runs)

    def fp32_ir() -> Artifact:
        return write_ir(ctx, parent, model, replace(settings, precision="fp32"), started, {})

    return lowered.settle(ctx, parent, built, settings.min_speedup, timer, fallback_artifact=fp32_ir)


# ------------------------------------------------------------------------------------------ accuracy control


def accuracy_controlled(ctx, parent, model, settings, feeds, overflow_fix, common, nodes, base, started, write_ir) -> Artifact:
    """One nncf.quantize_with_accuracy_control round. The metric is the mean mask IoU (low-res logits > 0,
    all four tokens) against the fp32 ONNX pipeline on validation images disjoint from calibration, and
    max_drop is 1 - the gate suite's INT8 mask_iou_mean_min, so NNCF aims where the gate looks."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    items, metric = validation_items(ctx, parent, settings)
    max_drop = round(1.0 - ctx.load_suite(settings.gate_suite).tolerance("int8").mask_iou_mean_min, 6)
    scope = round_scope(settings, (), nodes, parent.component, base)
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
    return write_ir(ctx, parent, quantized, settings, started, facts)


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

    from evsam_export import metrics
    from evsam_export.data.calibration import decoder_calibration_feeds
    from evsam_export.runners.ort_runner import OrtRunner

    encoder = ctx.manifest.artifact("encoder.onnx.fp32")
    decoder = ctx.manifest.artifact("decoder.onnx.fp32")
    count = max(2, settings.calibration_images // 4)
    seed = settings.calibration_seed + 1  # other images than the calibration set
    enc = OrtRunner(ctx.path_of(encoder), encoder.inputs, encoder.outputs, threads=ctx.threads).load()
    dec = OrtRunner(ctx.path_of(decoder), decoder.inputs, decoder.outputs, threads=ctx.threads).load()
    images = []
    prompt_feeds = decoder_calibration_feeds(lambda image: images.append(image) or enc.infer({"input_image": image})["image_embeddings"],
                                             ctx.variant, count, seed, decoder_inputs=decoder.inputs, folder=settings.calibration_data)
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


# ------------------------------------------------------------------------------------------ quantize once


def strip_quantizers(quantized, original, names) -> list[str]:
    """Take the ops `names` of `quantized` (an NNCF model before weight compression) back to fp32 in place,
    without recalibrating: each of their inputs fed by a FakeQuantize is rewired to that quantizer's input
    (the activation, or the fp32 weight constant), and a bias Add right after the op gets the original
    model's bias back (bias correction tuned it for the quantization error that is gone). Quantizers still
    feeding other ops stay; an unused one drops out of the graph. Returns the names it found."""
    import openvino as ov

    wanted = set(names)
    originals = {op.get_friendly_name(): op for op in original.get_ops()}
    done = []
    for op in quantized.get_ops():
        name = op.get_friendly_name()
        if name not in wanted:
            continue
        for index in range(op.get_input_size()):
            source = op.input_value(index).get_node()
            if source.get_type_name() == "FakeQuantize":
                op.input(index).replace_source_output(source.input_value(0))
        for target in op.output(0).get_target_inputs():
            consumer = target.get_node()
            before = originals.get(consumer.get_friendly_name())
            if consumer.get_type_name() != "Add" or before is None or consumer.input_value(1).get_node().get_type_name() != "Constant":
                continue
            bias = before.input_value(1).get_node()
            if bias.get_type_name() == "Constant":
                consumer.input(1).replace_source_output(ov.op.Constant(bias.get_data().copy()).output(0))
        done.append(name)
    quantized.validate_nodes_and_infer_types()
    return done


def quantized_ops(model) -> list[str]:
    """Friendly names of the ops with a FakeQuantize directly on an input, in graph order: what a fallback can
    take back one by one (Convolutions, and whatever else NNCF put a quantizer in front of)."""
    return [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() != "FakeQuantize"
            and any(op.input_value(i).get_node().get_type_name() == "FakeQuantize" for i in range(op.get_input_size()))]


def quantized_cache_dir() -> Path:
    """Where NNCF-quantized models (before weight compression) are kept between builds
    ($EVSAM_CACHE_DIR/nncf-quantized/<key>/)."""
    from evsam_export.cache import cache_root

    return cache_root("nncf-quantized")


def quantize_key(parent: Artifact, model, settings: Settings, overflow_fix: str, scope: Scope, fingerprint: str) -> str:
    """Everything the quantized model depends on: the parent's bytes and input shapes, the quantization settings,
    the base scope, the calibration feeds, this code and the tools' versions (full 64 hex digits)."""
    import nncf
    import openvino as ov

    from evsam_export.cache import cache_key, module_code_hash

    return cache_key({
        "what": "nncf-quantized-v1", "parent_sha256": parent.sha256,
        "inputs": [str(port.get_partial_shape()) for port in model.inputs],
        "preset": settings.preset, "model_type": settings.model_type, "activations_range": settings.activations_range,
        "fast_bias_correction": settings.fast_bias_correction, "overflow_fix": overflow_fix,
        "ignored_types": list(scope.types), "ignored_names": list(scope.names),
        "calibration_fingerprint": fingerprint, "code": module_code_hash(__name__),
        "nncf": nncf.__version__, "openvino": ov.get_version(),
    })


def quantize_once(ctx: StepContext, parent: Artifact, model, settings: Settings, dataset, feeds: int, overflow_fix: str,
                  scope: Scope, fingerprint: str):
    """(model, facts): `model` quantized by NNCF with the base scope and its weight quantizers left as
    FakeQuantize (so `strip_quantizers` can put the fp32 weights back), read from the cache when the same
    content was quantized before; written there atomically otherwise."""
    import shutil
    import tempfile

    import nncf
    import openvino as ov

    from evsam_export.runners.openvino_runner import openvino_core

    key = quantize_key(parent, model, settings, overflow_fix, scope, fingerprint)
    folder = quantized_cache_dir() / key
    facts = {"key": key, "reused": False}
    if (folder / "model.xml").is_file() and (folder / "model.bin").is_file():
        try:
            with ctx.reporter.step(f"{parent.component}: NNCF-quantized model from the cache ({key[:12]})"):
                quantized = openvino_core().read_model(str(folder / "model.xml"))
            return quantized, {**facts, "reused": True}
        except RuntimeError:  # a damaged entry: quantize again and replace it
            shutil.rmtree(folder, ignore_errors=True)
    kwargs = quantize_kwargs(settings, overflow_fix, feeds)
    kwargs["advanced_parameters"].backend_params = {"compress_weights": False}
    started = time.perf_counter()
    with ctx.reporter.step(f"{parent.component}: NNCF INT8 statistics and quantizers (once per build)"), quiet_nncf():
        quantized = nncf.quantize(model.clone(), dataset, ignored_scope=scope.nncf(), **kwargs)
    facts["seconds"] = round(time.perf_counter() - started, 1)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=folder.parent))
        ov.save_model(quantized, str(scratch / "model.xml"), compress_to_fp16=False)
        try:
            scratch.rename(folder)
        except OSError:  # another build stored the same key meanwhile
            shutil.rmtree(scratch, ignore_errors=True)
    except OSError as exc:
        ctx.reporter.line(f"warning: the NNCF-quantized model was not cached ({exc})")
    return quantized, facts

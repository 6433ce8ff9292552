"""NNCF post-training INT8 of an OpenVINO model: the precision stage of the OpenVINO target.

    quantize(ctx, parent, model, settings, started, write_ir)  ->  encoder.openvino.int8.xml (+ .bin)

targets/openvino.py reads the fp32 ONNX into an ov.Model and saves IRs; this module decides what is
quantized. NNCF INT8 of this encoder needs an ignored scope: quantizing LiteMLA's linear attention wrecks
the embedding. The scope is built from op types and regions (evsam_export.export.regions), and when the
parity gate refuses a candidate, evsam_export.steps.fallback widens it group by group (ordered below)
and records each round.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace

from evsam_export.errors import ExportError, RecipeError, RuntimeUnavailable
from evsam_export.export import regions
from evsam_export.manifest import Artifact
from evsam_export.steps.fallback import FallbackGroup, build_with_fallback
from evsam_export.steps.settings import PrecisionSettings
from evsam_export.steps.step import StepContext

PRESETS = ("mixed", "performance")
MODEL_TYPES = ("transformer", None)
OVERFLOW_FIXES = ("auto", "first_layer", "enable", "disable")
FALLBACK_METHODS = ("widen", "accuracy_control")
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
# measured gain of each is in docs/benchmarks.md, "OpenVINO INT8 fallback groups").
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
    # "widen": put ENCODER_GROUPS / DECODER_GROUPS back to fp32 one round at a time; "accuracy_control":
    # one nncf.quantize_with_accuracy_control round whose validation_fn is mask IoU vs the fp32 ONNX.
    # "widen" is the default: it passed where accuracy control did not (docs/benchmarks.md).
    fallback_method: str = "widen"
    # The groups the rounds revert, in order: names of ENCODER_GROUPS / DECODER_GROUPS or regions joined by "+"
    # (reverted together), e.g. an order measured on your checkpoint with `evsam-export sensitivity --backend
    # openvino`. A component none of them belongs to keeps its table order; () = the tables' order.
    fallback_groups: tuple[str, ...] = ()
    # The default lets every encoder group be tried (round 0 = base scope).
    max_rounds: int = len(ENCODER_GROUPS) + 1
    # accuracy_control: NNCF's limit on quantizer-reverting iterations (each one re-validates).
    accuracy_control_max_iterations: int = 8

    def check(self) -> None:
        super().check()
        for name, allowed in (("preset", PRESETS), ("model_type", MODEL_TYPES), ("overflow_fix", OVERFLOW_FIXES),
                              ("fallback_method", FALLBACK_METHODS), ("activations_range", ACTIVATION_RANGES)):
            self.require_one_of(name, allowed)
        self.require_at_least("accuracy_control_max_iterations", 1)
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

    def candidate(kept: tuple[FallbackGroup, ...]) -> Artifact:
        scope = round_scope(settings, kept, nodes, parent.component, base)
        with ctx.reporter.step(f"{parent.component}: NNCF INT8 (fp32 groups: {', '.join(scope.groups) or 'base scope'})"), quiet_nncf():
            quantized = nncf.quantize(
                model.clone(), dataset, ignored_scope=scope.nncf(), **quantize_kwargs(settings, overflow_fix, len(feeds))
            )
        artifact = write_ir(ctx, parent, quantized, settings, started, {**common, "ignored_scope": scope.to_json(nodes)})
        require_int8(artifact)
        return artifact

    if not settings.fallback:
        artifact = candidate(())
        return replace(artifact, facts={**artifact.facts, "fallback": "disabled (not gated at build time)"})
    if settings.fallback_method == "accuracy_control":
        def controlled(kept: tuple[FallbackGroup, ...]) -> Artifact:
            return accuracy_controlled(ctx, parent, model, settings, feeds, overflow_fix, common, nodes, base, started, write_ir)

        return build_with_fallback(ctx, parent, controlled, max_rounds=1, suite=settings.gate_suite)
    return build_with_fallback(ctx, parent, candidate, max_rounds=settings.max_rounds, groups=groups, nodes=nodes,
                               suite=settings.gate_suite)


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

"""The capability table: which targets exist, what they run on, which precisions they build and with
which step modules (imported here, so readers and tools follow them). Kept apart from the code that drives
it, so `targets`, `doctor`, recipe validation and the runner all read one table, and impossible combinations
are refused before any work starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType

from evsam_export.errors import RecipeError
from evsam_export.precision import fp16, ort_int8
from evsam_export.targets import openvino, ort, tensorrt, web


@dataclass(frozen=True)
class TargetInfo:
    name: str
    runtime: str  # the backend that runs its artifacts: a key of evsam_export.runners.BACKENDS
    device: str  # cpu | gpu
    precisions: tuple[str, ...]
    description: str
    # precision -> step module that turns the fp32 ONNX into that precision (absent: the target step does it)
    precision_steps: dict[str, ModuleType]
    target_step: ModuleType  # module whose build() makes the deployable artifact from the precision graph
    decoder_profile: str | None = None  # required export decoder profile, if any
    # precision -> CPU flags of which at least one must be present to build and gate it honestly (a bf16
    # artifact built where the CPU computes f32 would be an fp32 artifact labelled bf16)
    cpu_features: dict = field(default_factory=dict)
    # The target module defines preflight(target_settings) (checked before any export) and finish(folder,
    # manifest) (called once all artifacts are built).
    hooks: bool = False


TARGETS: dict[str, TargetInfo] = {
    "ort": TargetInfo(
        name="ort",
        runtime="onnxruntime",
        device="cpu",
        precisions=("fp32", "fp16", "int8"),
        description="ONNX Runtime: ONNX graphs (fp32, fp16 with fp32 islands, static QDQ INT8), optimized offline",
        precision_steps={"fp16": fp16, "int8": ort_int8},
        target_step=ort,
    ),
    "openvino": TargetInfo(
        name="openvino",
        runtime="openvino",
        device="cpu",
        precisions=("fp32", "fp16", "int8", "bf16"),
        description="OpenVINO IR (fp32, fp16-compressed, fp32 compiled for bf16) and NNCF post-training INT8",
        precision_steps={},
        target_step=openvino,
        cpu_features={"bf16": ("avx512_bf16", "amx_bf16")},
    ),
    "tensorrt": TargetInfo(
        name="tensorrt",
        runtime="tensorrt",
        device="gpu",
        precisions=("fp32", "fp16", "int8"),
        description="TensorRT engines, strongly typed from the precision-prepared ONNX (or a trtexec build kit without TensorRT/GPU)",
        precision_steps={"fp16": fp16, "int8": ort_int8},
        target_step=tensorrt,
        decoder_profile="tensorrt",
    ),
    "web": TargetInfo(
        name="web",
        runtime="onnxruntime-web",
        device="cpu",
        precisions=("fp32", "fp16", "int8"),
        description="onnxruntime-web in the browser (WASM, or WebGPU): standard-ONNX graphs (fp32, fp16 storage, QDQ INT8) "
                    "and the runtime's files, gated in headless Chromium",
        precision_steps={"int8": ort_int8},
        target_step=web,
        hooks=True,
    ),
}


def get_target(name: str) -> TargetInfo:
    if name not in TARGETS:
        raise RecipeError(f"unknown target {name!r}", hint=f"choose one of {', '.join(TARGETS)}")
    return TARGETS[name]


def missing_cpu_features(target: TargetInfo, precisions, flags) -> dict[str, tuple[str, ...]]:
    """precision -> the CPU flags it needs (any one of them) when `flags` has none of them."""
    present = set(flags)
    return {p: target.cpu_features[p] for p in dict.fromkeys(precisions)
            if p in target.cpu_features and not present & set(target.cpu_features[p])}


def check_cpu_features(target: TargetInfo, precisions, recipe_name: str) -> None:
    """Refuse, before any work, a recipe whose precision this CPU cannot compute."""
    from evsam_export.environment import cpu_flags

    flags = cpu_flags()
    missing = missing_cpu_features(target, precisions, flags)
    if missing:
        precision, needs = next(iter(missing.items()))
        raise RecipeError(
            f"{recipe_name}: {precision} needs a CPU with {' or '.join(needs)}; this CPU has none of them "
            f"(flags: {' '.join(flags) or 'none read'})",
            hint="use the fp32 or int8 recipe of the same target here, or build on a CPU with those flags",
        )

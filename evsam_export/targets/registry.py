"""The capability table: which targets exist, what they run on, which precisions they build and with
which step modules. Kept apart from the code that drives it, so `targets`, `doctor`, recipe validation
and the runner all read one table, and impossible combinations are refused before any work starts."""

from __future__ import annotations

from dataclasses import dataclass

from evsam_export.errors import RecipeError


@dataclass(frozen=True)
class TargetInfo:
    name: str
    runtime: str  # key of evsam_export.runners.runtime_availability()
    device: str  # cpu | gpu
    precisions: tuple[str, ...]
    description: str
    # precision -> step module that turns the fp32 ONNX into that precision (None: the target step does it)
    precision_steps: dict
    target_step: str | None  # module whose build() makes the deployable artifact from the precision graph
    decoder_profile: str | None = None  # required export decoder profile, if any
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
        precision_steps={"fp16": "evsam_export.precision.fp16", "int8": "evsam_export.precision.ort_int8"},
        target_step="evsam_export.targets.ort",
    ),
    "openvino": TargetInfo(
        name="openvino",
        runtime="openvino",
        device="cpu",
        precisions=("fp32", "fp16", "int8", "bf16"),
        description="OpenVINO IR (fp32, fp16-compressed, fp32 compiled for bf16) and NNCF post-training INT8",
        precision_steps={},
        target_step="evsam_export.targets.openvino",
    ),
    "tensorrt": TargetInfo(
        name="tensorrt",
        runtime="tensorrt",
        device="gpu",
        precisions=("fp32", "fp16", "int8"),
        description="TensorRT engines, strongly typed from the precision-prepared ONNX (or a trtexec build kit without TensorRT/GPU)",
        precision_steps={"fp16": "evsam_export.precision.fp16", "int8": "evsam_export.precision.ort_int8"},
        target_step="evsam_export.targets.tensorrt",
        decoder_profile="tensorrt",
    ),
    "web": TargetInfo(
        name="web",
        runtime="onnxruntime-web",
        device="cpu",
        precisions=("fp32", "fp16", "int8"),
        description="onnxruntime-web in the browser (WASM, or WebGPU): standard-ONNX graphs (fp32, fp16 storage, QDQ INT8) "
                    "and the runtime's files, gated in headless Chromium",
        precision_steps={"int8": "evsam_export.precision.ort_int8"},
        target_step="evsam_export.targets.web",
        hooks=True,
    ),
}


def get_target(name: str) -> TargetInfo:
    if name not in TARGETS:
        raise RecipeError(f"unknown target {name!r}", hint=f"choose one of {', '.join(TARGETS)}")
    return TARGETS[name]
